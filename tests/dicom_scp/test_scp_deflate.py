"""Deflated data sets are inflated in bounded steps: a deflate bomb costs time, not memory."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, MRImageStorage

from dicom_scp.deflate import (
    InflateError,
    InflateLimitError,
    PrefixInflater,
    inflate_prefix,
    inflated_size,
)
from dicom_scp.header import HeaderError, parse_header

MIB = 1 << 20
GIB = 1 << 30
UID = "1.2.826.0.1.3680043.8.498.1"
PEAK_LIMIT = 64 * MIB


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _deflate_with_zeros(head: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """Deflate ``head``, ``zeros`` zero bytes and ``tail`` without holding the zeros."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
    block = bytes(MIB)
    parts = [deflater.compress(head)]
    for start in range(0, zeros, MIB):
        parts.append(deflater.compress(block[: min(MIB, zeros - start)]))
    parts.append(deflater.compress(tail))
    parts.append(deflater.flush())
    return b"".join(parts)


def _header_bytes(**extra: Any) -> bytes:
    """A small Explicit VR Little Endian data set with what the index needs."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = UID + ".1"
    ds.Modality = "MR"
    ds.SeriesDescription = "Wade calf T1 Müller"
    ds.StudyInstanceUID = UID + ".2"
    ds.SeriesInstanceUID = UID + ".3"
    ds.SeriesNumber = 4
    ds.NumberOfFrames = 1
    ds.Rows = ds.Columns = 16  # (0028,0010): past the last element the header needs
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    handle = DicomFileLike(buffer)
    handle.is_little_endian, handle.is_implicit_VR = True, False
    write_dataset(handle, ds)
    return buffer.getvalue()


def _ob_header(group: int, element: int, length: int) -> bytes:
    return struct.pack("<HH2sHI", group, element, b"OB", 0, length)


def _peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """Call ``call``; return its result (or exception) and the peak Python memory it used."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result: Any = call()
        except Exception as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def pixel_bomb() -> bytes:
    """A valid header before 1 GiB of zero pixel data, deflated to about 1 MiB."""
    return _deflate_with_zeros(_header_bytes() + _ob_header(0x7FE0, 0x0010, GIB), GIB)


def test_bomb_is_small_on_the_wire(pixel_bomb: bytes) -> None:
    assert len(pixel_bomb) < 2 * MIB


def test_header_of_a_bomb_parses_in_bounded_memory(pixel_bomb: bytes) -> None:
    header, peak = _peak(lambda: parse_header(pixel_bomb, DeflatedExplicitVRLittleEndian))
    assert not isinstance(header, Exception), header
    assert header.sop_instance_uid == UID + ".1"
    assert header.series_instance_uid == UID + ".3"
    assert header.series_description == "Wade calf T1 Müller"
    assert header.number_of_frames == 1
    assert peak < PEAK_LIMIT, f"peak {peak / MIB:.1f} MiB"


def test_inflated_size_refuses_a_bomb_in_bounded_memory(pixel_bomb: bytes) -> None:
    error, peak = _peak(lambda: inflated_size(pixel_bomb, 256 * MIB))
    assert isinstance(error, InflateLimitError)
    assert str(error).startswith("inflates to more than 256 MiB")
    assert error.limit == 256 * MIB
    assert isinstance(error, InflateError) and isinstance(error, ValueError)
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"


def test_header_larger_than_the_limit_is_refused_in_bounded_memory() -> None:
    head = _header_bytes()
    at = head.index(b"\x20\x00\x0d\x00")  # (0020,000D): the study UID, after the blob
    blob = 20 * MIB
    bomb = _deflate_with_zeros(head[:at] + _ob_header(0x0009, 0x1010, blob), blob, head[at:])
    error, peak = _peak(lambda: parse_header(bomb, DeflatedExplicitVRLittleEndian))
    assert isinstance(error, HeaderError)
    assert "larger than 16777216 bytes" in str(error)
    assert peak < PEAK_LIMIT, f"peak {peak / MIB:.1f} MiB"
    # a limit that fits the blob reads past it, inflating no more than the header needs
    header = parse_header(bomb, DeflatedExplicitVRLittleEndian, max_header_bytes=32 * MIB)
    assert header.study_instance_uid == UID + ".2"


def test_header_beyond_the_first_prefix_is_found() -> None:
    head = _header_bytes()
    at = head.index(b"\x20\x00\x0d\x00")
    blob = os.urandom(300_000)  # incompressible: the header spans several prefixes
    data = _deflate(head[:at] + _ob_header(0x0009, 0x1010, len(blob)) + blob + head[at:])
    header = parse_header(data, DeflatedExplicitVRLittleEndian)
    assert header.study_instance_uid == UID + ".2"
    with pytest.raises(HeaderError, match="larger than 131072 bytes"):
        parse_header(data, DeflatedExplicitVRLittleEndian, max_header_bytes=128 * 1024)


def test_truncated_and_corrupt_streams() -> None:
    data = _deflate(_header_bytes() + _ob_header(0x7FE0, 0x0010, 4096) + os.urandom(4096))
    full = len(zlib.decompress(data, -zlib.MAX_WBITS))
    assert inflated_size(data, full) == full
    with pytest.raises(InflateLimitError, match=r"^inflates to more than"):
        inflated_size(data, full - 1)
    cut = data[: len(data) - 100]
    with pytest.raises(InflateError, match="truncated") as caught:
        inflated_size(cut, GIB)
    assert not isinstance(caught.value, InflateLimitError)
    # the header is in what did arrive: it is read, the store decides about the rest
    assert parse_header(cut, DeflatedExplicitVRLittleEndian).sop_instance_uid == UID + ".1"
    with pytest.raises(InflateError, match="corrupt"):
        inflated_size(b"\xff" * 64, GIB)
    with pytest.raises(HeaderError, match="corrupt deflate stream"):
        parse_header(b"\xff" * 64, DeflatedExplicitVRLittleEndian)
    with pytest.raises(InflateError, match="truncated"):
        inflated_size(b"", GIB)


def _pieces(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    inflater = PrefixInflater(data)
    return [inflater.prefix(size) for size in sizes]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    payload=st.one_of(
        st.binary(max_size=3000),
        st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 300_000), st.integers(0, 255)),
    ),
    sizes=st.lists(st.integers(0, 400_000), max_size=6),
)
def test_prefixes_agree_with_zlib(payload: bytes, sizes: list[int]) -> None:
    data = _deflate(payload)
    assert inflated_size(data, len(payload)) == len(payload)
    for size, prefix in zip(sizes, _pieces(data, sizes), strict=True):
        assert prefix == payload[:size]
        assert inflate_prefix(data, size) == payload[:size]
    inflater = PrefixInflater(data)
    assert inflater.prefix(len(payload) + 1) == payload
    assert inflater.finished and not inflater.truncated


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=2000), st.integers(0, 5000))
def test_garbage_streams_raise_only_inflate_errors(data: bytes, size: int) -> None:
    with contextlib.suppress(InflateError):
        assert len(inflate_prefix(data, size)) <= size
    with contextlib.suppress(InflateError):
        assert 0 <= inflated_size(data, 10 * MIB) <= 10 * MIB


def test_header_pydicom_reads_is_found_in_a_prefix_too() -> None:
    """An element the walker cannot read (implicit VR inside an explicit data set, as some
    writers do) sends the prefix to pydicom, which must also stop only past (0028,0008)."""
    head = _header_bytes()
    at = head.index(b"\x20\x00\x0d\x00")
    blob = os.urandom(300_000)
    implicit = struct.pack("<HHI", 0x0009, 0x1010, len(blob)) + blob
    pixels = os.urandom(1_000_000)  # the stream goes on well past the header
    data = _deflate(head[:at] + implicit + head[at:] + _ob_header(0x7FE0, 0x0010, len(pixels))
                    + pixels)
    header = parse_header(data, DeflatedExplicitVRLittleEndian)
    assert header.study_instance_uid == UID + ".2"
    assert header.series_description == "Wade calf T1 Müller"
    assert (header.series_number, header.number_of_frames) == (4, 1)
    with pytest.raises(HeaderError, match="larger than 262144 bytes"):
        parse_header(data, DeflatedExplicitVRLittleEndian, max_header_bytes=256 * 1024)
