"""Read just enough of a received dataset to file and index it.

The receiver stores the dataset bytes exactly as they arrived; it only needs the UIDs that
place the instance in its study and series plus the few attributes that routing rules
match on. Parsing stops after (0028,0008) Number of Frames, so the pixel data (and the
enhanced multi-frame functional groups behind it) are never looked at, and values are read
raw (no pydicom value conversion or validation), which keeps this under ~0.1 ms for a
typical MR header.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

__all__ = ["HeaderError", "InstanceHeader", "parse_header"]

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


def _stop(tag: int, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG


def _raw(ds: Dataset, tag: int) -> bytes | None:
    if tag not in ds:
        return None
    value = ds.get_item(tag).value
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    # Already converted (should not happen on a fresh read); fall back to its text form
    return str(value).encode("utf-8")


def _ascii(ds: Dataset, tag: int) -> str | None:
    raw = _raw(ds, tag)
    if raw is None:
        return None
    text = raw.rstrip(b"\x00 ").lstrip(b" ").decode("latin-1")
    return text or None


def _text(ds: Dataset, tag: int, encodings: list[str] | None) -> str | None:
    raw = _raw(ds, tag)
    if raw is None:
        return None
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return None
    if encodings is None or raw.isascii():
        return raw.decode("latin-1").strip() or None
    return decode_bytes(raw, encodings, set()).strip() or None


def _int(ds: Dataset, tag: int) -> int | None:
    text = _ascii(ds, tag)
    if text is None:
        return None
    try:
        return int(float(text.split("\\")[0]))
    except ValueError:
        return None


def _read(data: bytes | memoryview, transfer_syntax_uid: str) -> Dataset:
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    little = transfer_syntax_uid != ExplicitVRBigEndian
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(data))
    return read_dataset(io.BytesIO(data), implicit, little, stop_when=_stop)


def parse_header(data: bytes | memoryview, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse the identifying attributes of a dataset encoded in ``transfer_syntax_uid``.

    Parameters
    ----------
    data : bytes or memoryview
        The dataset as received in the C-STORE (without File Meta Information).
    transfer_syntax_uid : str
        The transfer syntax of the accepted presentation context.

    Returns
    -------
    InstanceHeader

    Raises
    ------
    HeaderError
        If the bytes cannot be parsed or the SOP Class, SOP Instance, Study Instance or
        Series Instance UID is missing.
    """
    try:
        ds = _read(data, transfer_syntax_uid)
    except Exception as exc:  # pydicom raises many types on garbage input
        raise HeaderError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc

    try:
        charset = _ascii(ds, _SPECIFIC_CHARACTER_SET)
        encodings = convert_encodings(charset.split("\\")) if charset else None
        uids = {
            "SOPClassUID": _ascii(ds, _SOP_CLASS_UID),
            "SOPInstanceUID": _ascii(ds, _SOP_INSTANCE_UID),
            "StudyInstanceUID": _ascii(ds, _STUDY_INSTANCE_UID),
            "SeriesInstanceUID": _ascii(ds, _SERIES_INSTANCE_UID),
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
            modality=_ascii(ds, _MODALITY),
            body_part_examined=_ascii(ds, _BODY_PART),
            series_description=_text(ds, _SERIES_DESCRIPTION, encodings),
            study_description=_text(ds, _STUDY_DESCRIPTION, encodings),
            image_type=_ascii(ds, _IMAGE_TYPE),
            series_number=_int(ds, _SERIES_NUMBER),
            instance_number=_int(ds, _INSTANCE_NUMBER),
            number_of_frames=_int(ds, _NUMBER_OF_FRAMES),
            patient_id=_text(ds, _PATIENT_ID, encodings),
            study_date=_ascii(ds, _STUDY_DATE),
            accession_number=_text(ds, _ACCESSION_NUMBER, encodings),
        )
    except HeaderError:
        raise
    except Exception as exc:  # a malformed value, e.g. a bad character set
        raise HeaderError(f"cannot read dataset attributes: {type(exc).__name__}: {exc}") from exc
