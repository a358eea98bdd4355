"""Property-based tests: the hand-written parsers agree with pydicom and pynetdicom on
random valid input, and on hostile input raise their own error type and nothing else.

Every run tests the same examples (``derandomize``), so CI is deterministic; the example
counts keep the file to a few seconds.
"""

from __future__ import annotations

import datetime
import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

from dicom_scp.codec import (
    CodecError,
    StoreRequestCommand,
    decode_command_set,
    decode_store_request,
    encode_command_pdus,
    encode_store_response,
    split_pdata,
)
from dicom_scp.header import HeaderError, InstanceHeader, parse_header

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about invalid values

SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
SLOW_EXAMPLE_S = 5.0  # no single input may take this long: a hang, not a slow machine


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------- value strategies

_ASCII = "".join(chr(code) for code in range(0x20, 0x7F) if code != 0x5C)  # no backslash
_LATIN1 = _ASCII + "".join(chr(code) for code in range(0xA0, 0x100))
_CHARSETS: list[tuple[str | None, st.SearchStrategy[str]]] = [
    (None, st.text(_LATIN1, max_size=24)),  # no Specific Character Set: ISO-IR 6 / latin-1
    ("ISO_IR 100", st.text(_LATIN1, max_size=24)),
    ("ISO_IR 192", st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"),
                                         exclude_characters="\\"), max_size=24)),
    ("ISO_IR 144", st.text(_ASCII + "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдежзийклмнопрстуфхцчшщ",
                           max_size=24)),
    ("ISO_IR 126", st.text(_ASCII + "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩαβγδεζηθικλμνξοπρστυφχψωάέ",
                           max_size=24)),
    ("ISO 2022 IR 6\\ISO 2022 IR 87",
     st.text(_ASCII + "山田太郎日本語医院脚画像やまだ", max_size=16)),
    ("\\ISO 2022 IR 149", st.text(_ASCII + "홍길동한국어병원다리", max_size=16)),
    ("GB18030", st.text(_ASCII + "中文医院张三腿部图像", max_size=16)),
]


def _round_trips(text: str, encodings: list[str]) -> bool:
    """Whether pydicom encodes ``text`` faithfully and without a backslash byte.

    A multi-byte character whose encoding contains 0x5C would read as two values in
    pydicom; such text is not what these tests are about.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            raw = encode_string(text, encodings)
            return b"\\" not in raw and decode_bytes(raw, encodings, set()) == text
        except Exception:
            return False


_COMPONENT = st.integers(0, 10**12).map(str)
_UIDS = st.lists(_COMPONENT, min_size=2, max_size=8).map(lambda parts: "1." + ".".join(parts)
                                                       ).filter(lambda uid: len(uid) <= 64)
_CS_VALUE = st.from_regex(r"[A-Z0-9_]([A-Z0-9_ ]{0,14}[A-Z0-9_])?", fullmatch=True)
_DATES = st.dates(min_value=datetime.date(1900, 1, 1)).map(lambda day: day.strftime("%Y%m%d"))


@st.composite
def _integer_strings(draw: st.DrawFn) -> str:
    """IS values as senders write them: signs, leading zeros, a redundant ``.0``."""
    number = draw(st.integers(-(2**31), 2**31 - 1))
    form = draw(st.sampled_from(["plain", "plus", "zeros", "point"]))
    text = {
        "plain": str(number),
        "plus": f"+{number}" if number >= 0 else str(number),
        "zeros": f"{number:08d}",
        "point": f"{number}.0",
    }[form]
    assume(len(text) <= 12)
    return text


def _maybe(draw: st.DrawFn, values: st.SearchStrategy[Any], *, rarely: bool = False) -> Any:
    """A value, an empty value (which reads as absent) or no element at all (``None``)."""
    choice = draw(st.sampled_from(["value"] * (18 if rarely else 3) + ["empty", "absent"]))
    return draw(values) if choice == "value" else "" if choice == "empty" else None


# ---------------------------------------------------------------- data set strategies

_SEQUENCES = (  # before, between and after the wanted elements
    "LanguageCodeSequence",  # (0008,0006)
    "ReferencedStudySequence",  # (0008,1110)
    "ProcedureCodeSequence",  # (0008,1032)
    "ReferencedImageSequence",  # (0008,1140)
    "SourceImageSequence",  # (0008,2112)
    "DimensionIndexSequence",  # (0020,9222)
    "RequestAttributesSequence",  # (0040,0275)
    "SharedFunctionalGroupsSequence",  # (5200,9229)
)
_PRIVATE_GROUPS = (0x0009, 0x0011, 0x0019, 0x0021, 0x0029)


@st.composite
def _item(draw: st.DrawFn, text: st.SearchStrategy[str], depth: int) -> Dataset:
    """A sequence item, holding wanted keywords too: they must not be read from it."""
    item = Dataset()
    if draw(st.booleans()):
        item.SOPInstanceUID = draw(_UIDS)
    if draw(st.booleans()):
        item.SeriesDescription = draw(text)
    if draw(st.booleans()):
        item.CodeValue, item.CodeMeaning = draw(_CS_VALUE), draw(text)
    if depth < 3 and draw(st.booleans()):
        item.PurposeOfReferenceCodeSequence = draw(_sequence(text, depth + 1))
        item["PurposeOfReferenceCodeSequence"].is_undefined_length = draw(st.booleans())
    item.is_undefined_length_sequence_item = draw(st.booleans())
    return item


def _sequence(text: st.SearchStrategy[str], depth: int) -> st.SearchStrategy[Sequence]:
    return st.lists(_item(text, depth), max_size=3).map(Sequence)


def _implicit_items(items: list[Dataset], encodings: list[str]) -> bytes:
    """The items of a sequence as Implicit VR Little Endian, for a UN of undefined length."""
    out = [_write(item, implicit=True, little=True, encodings=encodings) for item in items]
    return b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) for body in out
    )


@st.composite
def _datasets(draw: st.DrawFn) -> tuple[Dataset, str]:
    """A data set with a random subset of what the header reads, and a syntax to send it in."""
    syntax = draw(st.sampled_from(SYNTAXES))
    charset, text = draw(st.sampled_from(_CHARSETS))
    encodings = convert_encodings(charset.split("\\") if charset else None)
    text = text.filter(lambda value: _round_trips(value, encodings))
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    wanted: dict[str, st.SearchStrategy[Any]] = {
        "ImageType": st.lists(_CS_VALUE, min_size=1, max_size=4),
        "SOPClassUID": _UIDS,
        "SOPInstanceUID": _UIDS,
        "StudyDate": _DATES,
        "AccessionNumber": text.map(lambda value: value[:16]),
        "Modality": _CS_VALUE,
        "StudyDescription": text,
        "SeriesDescription": text,
        "PatientID": text,
        "BodyPartExamined": _CS_VALUE,
        "StudyInstanceUID": _UIDS,
        "SeriesInstanceUID": _UIDS,
        "SeriesNumber": _integer_strings(),
        "InstanceNumber": _integer_strings(),
        "NumberOfFrames": _integer_strings(),
    }
    for keyword, values in wanted.items():
        value = _maybe(draw, values, rarely=keyword.endswith("UID"))
        if value is not None:
            setattr(ds, keyword, value)
    ds.PatientName = draw(text)
    for keyword in draw(st.lists(st.sampled_from(_SEQUENCES), unique=True, max_size=4)):
        setattr(ds, keyword, draw(_sequence(text, 0)))
        ds[keyword].is_undefined_length = draw(st.booleans())
    for group in draw(st.lists(st.sampled_from(_PRIVATE_GROUPS), unique=True, max_size=3)):
        block = ds.private_block(group, "DAFNE TEST", create=True)
        block.add_new(0x01, "LO", draw(text))
        block.add_new(0x02, "OB", draw(st.binary(max_size=300)))
        block.add_new(0x03, "US", draw(st.integers(0, 0xFFFF)))
        if draw(st.booleans()):
            block.add_new(0x04, "SQ", draw(_sequence(text, 1)))
            ds[block.get_tag(0x04)].is_undefined_length = draw(st.booleans())
        if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian) and draw(
            st.booleans()
        ):  # a sequence its sender did not know: UN of undefined length, implicit inside
            items = draw(st.lists(_item(text, 1), max_size=2))
            element = DataElement(block.get_tag(0x05), "UN", _implicit_items(items, encodings))
            element.is_undefined_length = True
            ds.add(element)
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = 8
    ds.PixelData = draw(st.binary(min_size=8, max_size=8))
    return ds, syntax


def _write(ds: Dataset, *, implicit: bool, little: bool, encodings: list[str] | None = None
           ) -> bytes:
    buffer = io.BytesIO()
    handle = DicomFileLike(buffer)
    handle.is_implicit_VR, handle.is_little_endian = implicit, little
    write_dataset(handle, ds, encodings or "iso8859")
    return buffer.getvalue()


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _encode(ds: Dataset, syntax: str) -> bytes:
    """The data set as the syntax's plain (not yet deflated) bytes."""
    return _write(ds, implicit=syntax == ImplicitVRLittleEndian,
                  little=syntax != ExplicitVRBigEndian)


def _send(plain: bytes, syntax: str) -> bytes:
    return _deflate(plain) if syntax == DeflatedExplicitVRLittleEndian else plain


# ---------------------------------------------------------------- pydicom's view

def _joined(value: Any) -> str:
    if isinstance(value, MultiValue | list):
        return "\\".join(str(part) for part in value)
    return str(value)


def _pydicom_view(plain: bytes, syntax: str) -> InstanceHeader | list[str]:
    """What pydicom reads from the same bytes, normalised as the header module documents:
    text stripped of surrounding blanks, code strings and UIDs of padding, empty as absent,
    integers from the first value. A list names the missing UIDs."""
    ds = read_dataset(io.BytesIO(plain), syntax == ImplicitVRLittleEndian,
                      syntax != ExplicitVRBigEndian)

    def raw(keyword: str) -> Any:
        if keyword not in ds:
            return None
        value = ds[keyword].value
        return None if value is None or value == "" else value

    def code(keyword: str) -> str | None:  # CS, UI, DA: padding, not meaning, at the ends
        value = raw(keyword)
        return None if value is None else (_joined(value).lstrip(" ") or None)

    def text(keyword: str) -> str | None:  # SH, LO: leading and trailing blanks insignificant
        value = raw(keyword)
        return None if value is None else (_joined(value).strip() or None)

    def integer(keyword: str) -> int | None:
        value = raw(keyword)
        if value is None:
            return None
        return int(value[0] if isinstance(value, MultiValue) else value)

    uids = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    missing = [keyword for keyword in uids if code(keyword) is None]
    if missing:
        return missing
    return InstanceHeader(
        sop_class_uid=str(code("SOPClassUID")),
        sop_instance_uid=str(code("SOPInstanceUID")),
        study_instance_uid=str(code("StudyInstanceUID")),
        series_instance_uid=str(code("SeriesInstanceUID")),
        modality=code("Modality"),
        body_part_examined=code("BodyPartExamined"),
        series_description=text("SeriesDescription"),
        study_description=text("StudyDescription"),
        image_type=code("ImageType"),
        series_number=integer("SeriesNumber"),
        instance_number=integer("InstanceNumber"),
        number_of_frames=integer("NumberOfFrames"),
        patient_id=text("PatientID"),
        study_date=code("StudyDate"),
        accession_number=text("AccessionNumber"),
    )


# ---------------------------------------------------------------- header: agreement

@_settings(150)
@given(_datasets())
def test_header_agrees_with_pydicom(example: tuple[Dataset, str]) -> None:
    ds, syntax = example
    plain = _encode(ds, syntax)
    expected = _pydicom_view(plain, syntax)
    data = _send(plain, syntax)
    if isinstance(expected, list):
        with pytest.raises(HeaderError, match="lacks " + ", ".join(expected)):
            parse_header(data, syntax)
    else:
        assert parse_header(data, syntax) == expected


_IS_JUNK = st.one_of(
    st.sampled_from(
        ["1e400", "-1e400", "inf", "nan", "1.5", "0x10", "1\\2", "+", "--1", "\uff11\uff12"]
    ),
    st.text(_ASCII, min_size=1, max_size=12),
)


@_settings(100)
@given(st.sampled_from(SYNTAXES), _IS_JUNK, _IS_JUNK)
def test_header_survives_unreadable_numbers(syntax: str, series: str, frames: str) -> None:
    """A number the node cannot read is absent, not a reason to refuse the instance."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.5", "1.2.3.6"
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    plain = _encode(ds, syntax)
    for tag, text in ((0x00200011, series), (0x00280008, frames)):  # raw: pydicom refuses them
        value = text.encode() + b" " * (len(text.encode()) % 2)
        if syntax == ImplicitVRLittleEndian:
            plain += struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
        else:
            plain += struct.pack(f"{order}HH2sH", tag >> 16, tag & 0xFFFF, b"IS", len(value))
            plain += value
    header = parse_header(_send(plain, syntax), syntax)
    assert header.sop_instance_uid == "1.2.3.4"
    assert header.series_number is None or isinstance(header.series_number, int)
    assert header.number_of_frames is None or isinstance(header.number_of_frames, int)


# ---------------------------------------------------------------- header: hostile input

def _only_header_errors(data: bytes, syntax: str) -> None:
    """Parse ``data``: a header or a HeaderError, promptly, and nothing else."""
    started = time.perf_counter()
    try:
        header = parse_header(data, syntax)
    except HeaderError as exc:
        assert str(exc)
    else:
        assert isinstance(header, InstanceHeader)
        assert header.sop_instance_uid and header.series_instance_uid
    assert time.perf_counter() - started < SLOW_EXAMPLE_S


_EXTREME_LENGTHS = (0, 1, 2, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid data set with bit flips, cuts, insertions and absurd lengths."""
    ds, syntax = draw(_datasets())
    data = bytearray(_encode(ds, syntax))
    deflate_first = syntax == DeflatedExplicitVRLittleEndian and draw(st.booleans())
    if deflate_first:  # damage the deflate stream itself, not what it holds
        data = bytearray(_deflate(bytes(data)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip"] * 3 + ["length"] * 3 + ["insert", "delete", "cut"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "length":
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from(_EXTREME_LENGTHS)))
        else:
            del data[at : at + draw(st.integers(1, 12))]
    if syntax == DeflatedExplicitVRLittleEndian and not deflate_first:
        data = bytearray(_deflate(bytes(data)))
    return bytes(data), syntax


@_settings(150)
@given(_mutated())
def test_header_of_damaged_data_sets_raises_only_header_error(example: tuple[bytes, str]
                                                              ) -> None:
    _only_header_errors(*example)


@_settings(200)
@given(st.binary(max_size=600), st.sampled_from(SYNTAXES))
def test_header_of_random_bytes_raises_only_header_error(data: bytes, syntax: str) -> None:
    _only_header_errors(data, syntax)


_SOUP_TAGS = (0x00080005, 0x00080008, 0x00080016, 0x00080018, 0x00081140, 0x0009_1001,
              0x0020000D, 0x0020000E, 0x00280008, 0x00280010, 0xFFFEE000, 0xFFFEE00D,
              0xFFFEE0DD, 0x7FE00010)
_SOUP_VRS = (b"SQ", b"UN", b"OB", b"UT", b"LO", b"UI", b"CS", b"IS", b"US", b"\x00\x00", b"ox")


@st.composite
def _element_soup(draw: st.DrawFn) -> tuple[bytes, str]:
    """Plausible element headers in random order with random lengths: the walker's paths."""
    syntax = draw(st.sampled_from(SYNTAXES))
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    out = []
    for _ in range(draw(st.integers(1, 30))):
        tag = draw(st.one_of(st.sampled_from(_SOUP_TAGS), st.integers(0, 0xFFFFFFFF)))
        vr = draw(st.sampled_from(_SOUP_VRS))
        length = draw(st.one_of(st.sampled_from(_EXTREME_LENGTHS), st.integers(0, 64)))
        form = draw(st.sampled_from(["implicit", "short", "long"]))
        if form == "implicit":
            head = struct.pack(f"{order}HHI", tag >> 16, tag & 0xFFFF, length)
        elif form == "short":
            head = struct.pack(f"{order}HH2sH", tag >> 16, tag & 0xFFFF, vr, length & 0xFFFF)
        else:
            head = struct.pack(f"{order}HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length)
        value = draw(st.binary(max_size=min(length, 64)))
        out.append(head + value)
    plain = b"".join(out)
    return _send(plain, syntax), syntax


@_settings(250)
@given(_element_soup())
def test_header_of_element_soup_raises_only_header_error(example: tuple[bytes, str]) -> None:
    _only_header_errors(*example)


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("depth", [40, 5000])
def test_deeply_nested_sequences_raise_header_error(syntax: str, depth: int) -> None:
    order = ">" if syntax == ExplicitVRBigEndian else "<"
    if syntax == ImplicitVRLittleEndian:
        open_sequence = struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF)
    else:
        open_sequence = struct.pack(f"{order}HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack(f"{order}HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    data = _send((open_sequence + open_item) * depth, syntax)
    with pytest.raises(HeaderError):
        parse_header(data, syntax)


# ---------------------------------------------------------------- codec

_MESSAGE_IDS = st.integers(0, 0xFFFF)
_AE_TITLES = st.text(_ASCII, min_size=1, max_size=16).filter(lambda title: title.strip())


def _pynetdicom_command_bytes(message: Any) -> bytes:
    first = next(iter(message.encode_msg(1, 0)))
    _context, fragment = first.presentation_data_value_list[0]
    return bytes(fragment[1:])


@_settings(200)
@given(_MESSAGE_IDS, _UIDS, _UIDS, st.integers(0, 0xFFFF),
       st.one_of(st.none(), st.text(_ASCII, min_size=1, max_size=64)))
def test_store_response_is_pynetdicoms_encoding(message_id: int, sop_class: str, sop_instance: str,
                                                status: int, comment: str | None) -> None:
    ours = encode_store_response(message_id=message_id, sop_class_uid=sop_class,
                                 sop_instance_uid=sop_instance, status=status,
                                 error_comment=comment)
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = status
    response.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    theirs = _pynetdicom_command_bytes(message)
    assert ours == theirs
    raw = read_dataset(io.BytesIO(ours), True, True)  # values left as the bytes they are
    assert decode_command_set(ours) == {
        element.tag & 0xFFFF: element.value for element in raw.elements()
    }


@_settings(200)
@given(_MESSAGE_IDS, st.integers(0, 0xFFFF), st.text(max_size=100))
def test_store_response_comment_is_always_a_valid_lo(message_id: int, status: int,
                                                      comment: str) -> None:
    ours = encode_store_response(message_id=message_id, sop_class_uid="1.2",
                                 sop_instance_uid="1.2.3", status=status, error_comment=comment)
    decoded = decode(io.BytesIO(ours), True, True)
    assert decoded.CommandGroupLength == len(ours) - 12
    assert (decoded.MessageIDBeingRespondedTo, decoded.Status) == (message_id, status)
    text = decoded.get("ErrorComment") or ""
    assert len(text) <= 64 and "\\" not in text and text.isascii() and text.isprintable()
    if comment and comment.isascii() and comment.isprintable() and "\\" not in comment:
        assert text == comment[:64].rstrip(" ")


@st.composite
def _store_requests(draw: st.DrawFn) -> C_STORE:
    request = C_STORE()
    request.MessageID = draw(_MESSAGE_IDS)
    request.AffectedSOPClassUID = draw(_UIDS)
    request.AffectedSOPInstanceUID = draw(_UIDS)
    request.Priority = draw(st.sampled_from([0, 1, 2]))
    if draw(st.booleans()):
        request.MoveOriginatorApplicationEntityTitle = draw(_AE_TITLES)
        request.MoveOriginatorMessageID = draw(_MESSAGE_IDS)
    request.DataSet = io.BytesIO(b"\x00" * 8)
    return request


@_settings(200)
@given(_store_requests())
def test_store_request_decodes_as_pynetdicom_does(request: C_STORE) -> None:
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    command = decode_store_request(decode_command_set(_pynetdicom_command_bytes(message)))
    theirs = C_STORE_RQ()
    theirs.command_set = decode(io.BytesIO(_pynetdicom_command_bytes(message)), True, True)
    primitive = theirs.message_to_primitive()
    ae = primitive.MoveOriginatorApplicationEntityTitle
    assert command == StoreRequestCommand(
        message_id=primitive.MessageID,
        sop_class_uid=str(primitive.AffectedSOPClassUID),
        sop_instance_uid=str(primitive.AffectedSOPInstanceUID),
        priority=primitive.Priority,
        has_dataset=True,
        move_originator_ae=ae.strip() if ae else None,
        move_originator_id=primitive.MoveOriginatorMessageID,
    )


_CONTEXT_IDS = st.integers(1, 255)
_FRAGMENTS = st.lists(
    st.tuples(_CONTEXT_IDS, st.integers(0, 3), st.binary(max_size=300)), max_size=6
)


@_settings(200)
@given(_FRAGMENTS)
def test_split_pdata_agrees_with_pynetdicom(fragments: list[tuple[int, int, bytes]]) -> None:
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = []
    for context_id, control, data in fragments:
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        item.presentation_data_value = bytes([control]) + data
        pdu.presentation_data_value_items.append(item)
    body = pdu.encode()[6:]
    ours = [(context_id, bytes(data)) for context_id, data in split_pdata(body)]
    decoded = P_DATA_TF()
    decoded.decode(pdu.encode())
    assert ours == [(item.context_id, item.presentation_data_value)
                    for item in decoded.presentation_data_value_items]


@_settings(200)
@given(_MESSAGE_IDS, _UIDS, _UIDS, _CONTEXT_IDS,
       st.one_of(st.just(0), st.integers(7, 200), st.integers(200, 70_000)))
def test_command_pdus_are_pynetdicoms(message_id: int, sop_class: str, sop_instance: str,
                                      context_id: int, max_pdu: int) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = 0
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    theirs = b""
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        theirs += pdu.encode()
    command = encode_store_response(message_id=message_id, sop_class_uid=sop_class,
                                    sop_instance_uid=sop_instance, status=0)
    assert encode_command_pdus(context_id, command, max_pdu) == theirs


def _only_codec_errors(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except CodecError as exc:
        assert isinstance(exc, ValueError) and str(exc)
        return None


_COMMAND_SOUP = st.lists(
    st.tuples(st.sampled_from([0x0000, 0x0000, 0x0000, 0x0008]),
              st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030,
                               0x1031, 0x0900]),
              st.binary(max_size=20),
              st.sampled_from([None, 0xFFFFFFFF, 0, 1, 3, 1000])),
    max_size=12,
).map(lambda elements: b"".join(
    struct.pack("<HHI", group, element, len(value) if length is None else length) + value
    for group, element, value, length in elements
))


@_settings(300)
@given(st.one_of(st.binary(max_size=200), _COMMAND_SOUP))
def test_command_decoders_raise_only_codec_error(data: bytes) -> None:
    elements = _only_codec_errors(lambda: decode_command_set(data))
    if elements is not None:
        assert all(isinstance(value, bytes) for value in elements.values())
        elements[0x0100] = b"\x01\x00"  # claim to be a C-STORE-RQ, whatever else it holds
        command = _only_codec_errors(lambda: decode_store_request(elements))
        assert command is None or isinstance(command, StoreRequestCommand)


@_settings(300)
@given(st.dictionaries(st.sampled_from([0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000,
                                        0x1030, 0x1031]), st.binary(max_size=8)))
def test_store_request_decoder_raises_only_codec_error(elements: dict[int, bytes]) -> None:
    command = _only_codec_errors(lambda: decode_store_request(elements))
    assert command is None or isinstance(command, StoreRequestCommand)


@_settings(300)
@given(st.binary(max_size=300))
def test_split_pdata_raises_only_codec_error(body: bytes) -> None:
    items = _only_codec_errors(lambda: split_pdata(body))
    if items is not None:
        assert sum(len(fragment) + 5 for _, fragment in items) == len(body)
