"""Read just enough of a received dataset to file and index it.

The receiver stores the dataset bytes exactly as they arrived; it only needs the UIDs that
place the instance in its study and series plus the few attributes that routing rules
match on. Parsing stops after (0028,0008) Number of Frames, so the pixel data (and the
enhanced multi-frame functional groups behind it) are never looked at, and values are read
raw (no value conversion or validation). Little-endian data sets (all but the retired
big-endian syntax) are walked element by element here, skipping sequences unread; what the
walker does not recognise goes to pydicom, which knows the odd encodings of real files.

The bytes come from whoever connects, so every failure is a :class:`HeaderError` and no
input makes the parser hold more than the data set (or, for a deflated one, a bounded
inflated prefix of it: :mod:`dicom_scp.deflate`).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from dicom_scp.deflate import InflateError, PrefixInflater

__all__ = ["MAX_HEADER_BYTES", "HeaderError", "InstanceHeader", "parse_header"]

_LAST_TAG = 0x00280008  # Number of Frames; everything the index needs comes before it

_SPECIFIC_CHARACTER_SET = 0x00080005
_IMAGE_TYPE = 0x00080008
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_DATE = 0x00080020
_ACCESSION_NUMBER = 0x00080050
_MODALITY = 0x00080060
_STUDY_DESCRIPTION = 0x00081030
_SERIES_DESCRIPTION = 0x0008103E
_PATIENT_ID = 0x00100020
_BODY_PART = 0x00180015
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_NUMBER_OF_FRAMES = 0x00280008

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""How much of a deflated data set :func:`parse_header` inflates, at most, by default."""
_FIRST_PREFIX = 64 * 1024  # a deflated header is looked for in this much, then twice that…


class HeaderError(ValueError):
    """The dataset cannot be parsed or lacks an attribute the node needs."""


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The attributes of a received instance that the node files and routes on."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    image_type: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    patient_id: str | None = None
    study_date: str | None = None
    accession_number: str | None = None


class _UnhandledEncodingError(Exception):
    """An encoding the fast walker leaves to pydicom (it has heuristics for odd files)."""


class _TruncatedError(HeaderError):
    """The bytes end inside an element: a longer prefix of a deflated stream may do."""


_WANTED = frozenset(
    {
        _SPECIFIC_CHARACTER_SET, _IMAGE_TYPE, _SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_DATE,
        _ACCESSION_NUMBER, _MODALITY, _STUDY_DESCRIPTION, _SERIES_DESCRIPTION, _PATIENT_ID,
        _BODY_PART, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID, _SERIES_NUMBER,
        _INSTANCE_NUMBER, _NUMBER_OF_FRAMES,
    }
)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_MAX_DEPTH = 32
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _element(view: memoryview, offset: int, implicit: bool) -> tuple[int, int, int, bytes]:
    """Tag, value offset, value length and VR (``b""`` if implicit) at ``offset``."""
    end = len(view)
    if offset + 8 > end:
        raise _TruncatedError("data set truncated inside an element header")
    group, number = _TAG.unpack_from(view, offset)
    tag = group << 16 | number
    if implicit or group == 0xFFFE:  # item and delimiter tags never have a VR
        return tag, offset + 8, _U32.unpack_from(view, offset + 4)[0], b""
    vr = bytes(view[offset + 4 : offset + 6])
    if vr in _LONG_VRS:
        if offset + 12 > end:
            raise _TruncatedError("data set truncated inside an element header")
        return tag, offset + 12, _U32.unpack_from(view, offset + 8)[0], vr
    if not (vr.isalpha() and vr.isupper()):
        raise _UnhandledEncodingError(f"no VR at {_tag(tag)}")
    return tag, offset + 8, _U16.unpack_from(view, offset + 6)[0], vr


def _skip_items(view: memoryview, offset: int, implicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence; return the offset after its end."""
    if depth > _MAX_DEPTH:
        raise HeaderError("sequences nested too deeply")
    while True:
        tag, offset, length, _ = _element(view, offset, True)
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise HeaderError(f"malformed sequence: {_tag(tag)} where an item belongs")
        if length == _UNDEFINED_LENGTH:
            offset = _skip_item_elements(view, offset, implicit, depth + 1)
        elif offset + length > len(view):
            raise _TruncatedError("data set truncated inside a sequence item")
        else:
            offset += length


def _skip_item_elements(view: memoryview, offset: int, implicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item; return the offset after its end."""
    while True:
        tag, offset, length, vr = _element(view, offset, implicit)
        if tag == _ITEM_END:
            return offset
        if length == _UNDEFINED_LENGTH:  # UN of undefined length is implicit VR inside
            offset = _skip_items(view, offset, implicit or vr == b"UN", depth)
        elif offset + length > len(view):
            raise _TruncatedError("data set truncated inside a sequence item")
        else:
            offset += length


def _walk(data: bytes | memoryview, implicit: bool, partial: bool = False) -> dict[int, bytes]:
    """The raw values of the wanted top-level elements of a little-endian data set.

    Why not pydicom: reading these few elements through ``read_dataset`` costs ~85 µs per
    instance, a tenth of the node's whole receive budget; walking the element headers and
    skipping everything else costs a few µs. Sequences are skipped, not read. A
    ``partial`` data set (a prefix of a longer one) must reach an element past the last
    wanted one, or the wanted elements may lie beyond it.
    """
    view = memoryview(data)
    end = len(view)
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= end:  # fewer bytes left is trailing padding, as pydicom reads it
        tag, offset, length, vr = _element(view, offset, implicit)
        if tag > _LAST_TAG:
            return values
        if length == _UNDEFINED_LENGTH:
            offset = _skip_items(view, offset, implicit or vr == b"UN", 0)
            continue
        if offset + length > end:
            raise _TruncatedError(f"{_tag(tag)} runs past the end of the data set")
        if length and tag in _WANTED:  # an empty value reads as absent, as in pydicom
            values[tag] = bytes(view[offset : offset + length])
        offset += length
    if partial:
        raise _TruncatedError("data set truncated before (0028,0008)")
    return values


def _stop(tag: int, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG


def _read_with_pydicom(
    data: bytes | memoryview, implicit: bool, little: bool, partial: bool = False
) -> dict[int, bytes]:
    if not partial:
        ds = read_dataset(io.BytesIO(data), implicit, little, stop_when=_stop)
    else:  # pydicom reads a cut-off data set quietly: only stopping proves it saw enough
        stopped: list[int] = []

        def stop(tag: int, vr: str | None, length: int) -> bool:
            if tag > _LAST_TAG:
                stopped.append(tag)
            return tag > _LAST_TAG

        try:
            ds = read_dataset(io.BytesIO(data), implicit, little, stop_when=stop)
        except Exception as exc:
            raise _TruncatedError(f"{type(exc).__name__}: {exc}") from exc
        if not stopped:
            raise _TruncatedError("data set truncated before (0028,0008)")
    values: dict[int, bytes] = {}
    for tag in _WANTED:
        if tag not in ds:
            continue
        value = ds.get_item(tag).value
        if isinstance(value, bytes):
            values[tag] = value
        elif value is not None:  # already converted (not on a fresh read): its text form
            values[tag] = str(value).encode("utf-8")
    return values


def _read(data: bytes | memoryview, transfer_syntax_uid: str, max_header_bytes: int
          ) -> dict[int, bytes]:
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return _read_deflated(data, max_header_bytes)
    return _read_plain(
        data,
        implicit=transfer_syntax_uid == ImplicitVRLittleEndian,
        little=transfer_syntax_uid != ExplicitVRBigEndian,
    )


def _read_plain(
    data: bytes | memoryview, *, implicit: bool, little: bool, partial: bool = False
) -> dict[int, bytes]:
    """An uncompressed data set (or a ``partial`` prefix): the walker, else pydicom."""
    if little:
        try:
            return _walk(data, implicit, partial)
        except _UnhandledEncodingError:
            pass
    return _read_with_pydicom(data, implicit, little, partial)


def _read_deflated(data: bytes | memoryview, max_header_bytes: int) -> dict[int, bytes]:
    """Read the header from ever longer inflated prefixes, never more than the limit.

    Why prefixes: the elements the index needs are a few KiB at the front, while the whole
    data set may inflate a thousandfold (a deflate bomb); inflating it whole would let any
    peer exhaust memory.
    """
    inflater = PrefixInflater(data)
    size = min(_FIRST_PREFIX, max_header_bytes)
    while True:
        try:
            prefix = inflater.prefix(size)
        except InflateError as exc:
            raise HeaderError(str(exc)) from exc
        final = inflater.finished or len(prefix) < size
        try:
            return _read_plain(prefix, implicit=False, little=True, partial=not final)
        except _TruncatedError:
            if final:
                raise
            if size >= max_header_bytes:
                raise HeaderError(
                    f"header larger than {max_header_bytes} bytes inflated: the elements "
                    "up to (0028,0008) do not fit the limit"
                ) from None
        size = min(size * 2, max_header_bytes)


def _ascii(values: dict[int, bytes], tag: int) -> str | None:
    raw = values.get(tag)
    if raw is None:
        return None
    text = raw.rstrip(b"\x00 ").lstrip(b" ").decode("latin-1")
    return text or None


def _text(values: dict[int, bytes], tag: int, encodings: list[str] | None) -> str | None:
    raw = values.get(tag)
    if raw is None:
        return None
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return None
    if encodings is None or (raw.isascii() and b"\x1b" not in raw):  # ESC: ISO 2022 switch
        return raw.decode("latin-1").strip() or None
    return decode_bytes(raw, encodings, set()).strip() or None


def _int(values: dict[int, bytes], tag: int) -> int | None:
    text = _ascii(values, tag)
    if text is None:
        return None
    try:
        return int(float(text.split("\\")[0]))
    except (ValueError, OverflowError):  # not a number, or "inf"
        return None


def parse_header(
    data: bytes | memoryview,
    transfer_syntax_uid: str,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> InstanceHeader:
    """Parse the identifying attributes of a dataset encoded in ``transfer_syntax_uid``.

    Parameters
    ----------
    data : bytes or memoryview
        The dataset as received in the C-STORE (without File Meta Information).
    transfer_syntax_uid : str
        The transfer syntax of the accepted presentation context.
    max_header_bytes : int, optional
        For a deflated data set, how many inflated bytes to look through, at most, for the
        elements up to (0028,0008); the rest of the stream is not inflated (use
        :func:`dicom_scp.deflate.inflated_size` to check it).

    Returns
    -------
    InstanceHeader

    Raises
    ------
    HeaderError
        If the bytes cannot be parsed, a deflated header is larger than
        ``max_header_bytes``, or the SOP Class, SOP Instance, Study Instance or Series
        Instance UID is missing. Nothing else: any byte string gives a header or this.
    """
    try:
        values = _read(data, transfer_syntax_uid, max_header_bytes)
    except HeaderError as exc:
        raise HeaderError(f"cannot parse dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on garbage input
        raise HeaderError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc

    try:
        charset = _ascii(values, _SPECIFIC_CHARACTER_SET)
        encodings = convert_encodings(charset.split("\\")) if charset else None
        uids = {
            "SOPClassUID": _ascii(values, _SOP_CLASS_UID),
            "SOPInstanceUID": _ascii(values, _SOP_INSTANCE_UID),
            "StudyInstanceUID": _ascii(values, _STUDY_INSTANCE_UID),
            "SeriesInstanceUID": _ascii(values, _SERIES_INSTANCE_UID),
        }
        missing = [name for name, value in uids.items() if not value]
        if missing:
            raise HeaderError(f"dataset lacks {', '.join(missing)}")
        for name, value in uids.items():
            if len(str(value)) > 64 or not str(value).isprintable() or not str(value).isascii():
                raise HeaderError(f"dataset has an unreadable {name} (corrupt data set?)")
        return InstanceHeader(
            sop_class_uid=str(uids["SOPClassUID"]),
            sop_instance_uid=str(uids["SOPInstanceUID"]),
            study_instance_uid=str(uids["StudyInstanceUID"]),
            series_instance_uid=str(uids["SeriesInstanceUID"]),
            modality=_ascii(values, _MODALITY),
            body_part_examined=_ascii(values, _BODY_PART),
            series_description=_text(values, _SERIES_DESCRIPTION, encodings),
            study_description=_text(values, _STUDY_DESCRIPTION, encodings),
            image_type=_ascii(values, _IMAGE_TYPE),
            series_number=_int(values, _SERIES_NUMBER),
            instance_number=_int(values, _INSTANCE_NUMBER),
            number_of_frames=_int(values, _NUMBER_OF_FRAMES),
            patient_id=_text(values, _PATIENT_ID, encodings),
            study_date=_ascii(values, _STUDY_DATE),
            accession_number=_text(values, _ACCESSION_NUMBER, encodings),
        )
    except HeaderError:
        raise
    except Exception as exc:  # a malformed value, e.g. a bad character set
        raise HeaderError(f"cannot read dataset attributes: {type(exc).__name__}: {exc}") from exc
