"""The receiver's header walker reads what pydicom reads, and fails clearly on bad data."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_scp.header import HeaderError, parse_header
from tests.cli.test_segment_cli import real_world_files
from tests.dicom_scp.helpers import data_set_offset

_META_TRANSFER_SYNTAX = b"\x02\x00\x10\x00UI"


def _dataset_bytes(path: Path) -> tuple[bytes, str] | None:
    """The data set of a Part 10 file as a receiver gets it, and its transfer syntax."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        return None
    start = data_set_offset(raw)
    meta = raw[132:start]
    at = meta.find(_META_TRANSFER_SYNTAX)
    if at < 0:
        return None
    length = struct.unpack_from("<H", meta, at + 6)[0]
    syntax = meta[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode()
    return raw[start:], syntax


def _reference(path: Path) -> dict[str, object] | None:
    """What parse_header must find, read by pydicom from the whole file."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        return None
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "modality": ds.get("Modality") or None,
        "instance_number": int(ds.InstanceNumber) if ds.get("InstanceNumber") else None,
    }


def _little_endian_files() -> list[Path]:
    """Real files with File Meta Information in a little-endian syntax (what the walker reads)."""
    usable = []
    for path in real_world_files():
        found = _dataset_bytes(path)
        if found is not None and found[1] != ExplicitVRBigEndian:
            usable.append(path)
    return usable


@pytest.mark.parametrize("path", _little_endian_files(), ids=lambda path: path.name)
def test_walker_agrees_with_pydicom_on_real_files(path: Path) -> None:
    found = _dataset_bytes(path)
    assert found is not None
    data, syntax = found
    if syntax == DeflatedExplicitVRLittleEndian:
        data = _deflate(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data))
    expected = _reference(path)
    if expected is None:
        with pytest.raises(HeaderError):
            parse_header(data, syntax)
        return
    header = parse_header(data, syntax)
    assert {name: getattr(header, name) for name in expected} == expected


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _encode(ds: Dataset, *, implicit: bool, undefined_lengths: bool) -> bytes:
    buffer = io.BytesIO()
    handle = DicomFileLike(buffer)
    handle.is_little_endian = True
    handle.is_implicit_VR = implicit
    for keyword in ("ReferencedImageSequence", "ProcedureCodeSequence"):
        ds[keyword].is_undefined_length = undefined_lengths
        for item in ds[keyword].value:
            item.is_undefined_length_sequence_item = undefined_lengths
    write_dataset(handle, ds)
    return buffer.getvalue()


def _with_sequences(path: Path) -> Dataset:
    """An MR header with nested sequences before the attributes the index needs."""
    ds = dcmread(path)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "leg"
    procedure = Dataset()
    procedure.CodeValue = "MRLEG"
    procedure.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([procedure, Dataset()])  # (0008,1032)
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([reference])  # (0008,1140)
    ds.StudyDescription = "calves"  # (0008,1030): between the two sequences
    return ds


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_walker_skips_nested_sequences(mr_files: list[Path], implicit: bool, undefined: bool
                                       ) -> None:
    ds = _with_sequences(mr_files[0])
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    header = parse_header(_encode(ds, implicit=implicit, undefined_lengths=undefined), syntax)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.study_description == "calves"
    assert header.series_number == 3 and header.instance_number == 1


def test_walker_refuses_truncated_data_sets_with_the_element(mr_files: list[Path]) -> None:
    ds = _with_sequences(mr_files[0])
    data = _encode(ds, implicit=False, undefined_lengths=True)
    uid_at = data.index(str(ds.StudyInstanceUID).encode())
    with pytest.raises(HeaderError, match=r"cannot parse dataset: \(0020,000D\) runs past"):
        parse_header(data[: uid_at + 4], ExplicitVRLittleEndian)
    in_sequence = data.index(b"MRLEG")
    with pytest.raises(HeaderError, match="cannot parse dataset"):
        parse_header(data[:in_sequence], ExplicitVRLittleEndian)
    broken = bytearray(data)
    item = broken.index(b"\xfe\xff\x00\xe0")  # first sequence item tag
    broken[item : item + 4] = b"\x08\x00\x18\x00"
    with pytest.raises(HeaderError, match="malformed sequence"):
        parse_header(bytes(broken), ExplicitVRLittleEndian)
