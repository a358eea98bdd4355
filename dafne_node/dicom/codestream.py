"""What a compressed frame says about itself, read before anyone decodes it.

A decoder believes the image size written in the frame's own codestream, not the
DICOM header: an RLE, JPEG or JPEG 2000 frame from a broken or hostile peer can
declare a far larger image than its header (a decompression bomb that makes the
decoder allocate gigabytes), and a frame cut short often decodes without any
error into an image with a hole. Reading the frame's header and its end marker
and comparing them with the DICOM header turns both into a refusal with a
reason, without allocating the image. Pure functions on bytes: no Dataset, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

JPEG_SYNTAXES = frozenset({
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
    JPEGLSNearLossless,
})
"""Transfer syntaxes whose frames are JPEG (ISO 10918) or JPEG-LS (ISO 14495) codestreams."""

J2K_SYNTAXES = frozenset({
    JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC, HTJ2KLossless,
    HTJ2KLosslessRPCL, HTJ2K,
})
"""Transfer syntaxes whose frames are JPEG 2000 (ISO 15444) codestreams."""

_END_MARKER = b"\xff\xd9"  # JPEG EOI and JPEG 2000 EOC are the same two bytes
_PADDING = b"\x00\xff"  # fragments are padded to even length; encoders use either byte
_JPEG_SOF = frozenset({
    0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
    0xF7,  # JPEG-LS SOF55
})
_JPEG_SOS = 0xDA
_J2K_START = b"\xff\x4f\xff\x51"  # SOC, then SIZ, which must come second
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_RLE_HEADER_BYTES = 64


@dataclass(frozen=True)
class FrameShape:
    """The image one frame must hold, from the DICOM header."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int


def frame_problem(transfer_syntax: str, frame: bytes, shape: FrameShape) -> str | None:
    """Return why ``frame`` cannot be one image of ``shape``, or None if it may be.

    Reads only the frame's own header and end. A transfer syntax this module
    does not know returns None: its decoder is the only judge.
    """
    if transfer_syntax == RLELossless:
        return _rle_problem(frame, shape)
    if transfer_syntax in JPEG_SYNTAXES:
        size = _jpeg_size(frame)
    elif transfer_syntax in J2K_SYNTAXES:
        size = _j2k_size(frame)
    else:
        return None
    if isinstance(size, str):
        return size
    declared = (shape.rows, shape.columns, shape.samples)
    if size != declared:
        rows, columns, samples = size
        return (f"its codestream declares a {rows}x{columns} image ({samples} sample(s) per "
                f"pixel) where the DICOM header declares {shape.rows}x{shape.columns} "
                f"({shape.samples})")
    if not frame.rstrip(_PADDING).endswith(_END_MARKER):
        return "its codestream ends without an end-of-image marker: the frame is truncated"
    return None


def _rle_problem(frame: bytes, shape: FrameShape) -> str | None:
    """The RLE header (PS3.5 G.5): segment count and 15 offsets, little endian."""
    if len(frame) < _RLE_HEADER_BYTES:
        return f"is {len(frame)} bytes, shorter than the {_RLE_HEADER_BYTES}-byte RLE header"
    count = int.from_bytes(frame[:4], "little")
    expected = shape.samples * shape.bits_allocated // 8
    if count != expected:
        return (f"its RLE header lists {count} segments, a {shape.bits_allocated}-bit image with "
                f"{shape.samples} sample(s) per pixel has {expected}")
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(count)]
    if (offsets[0] != _RLE_HEADER_BYTES or offsets[-1] >= len(frame)
            or any(later <= earlier for earlier, later in pairwise(offsets))):
        return f"its RLE segment offsets {offsets} do not fit a frame of {len(frame)} bytes"
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | str:
    """Rows, columns and components from the SOF segment of a JPEG or JPEG-LS codestream."""
    if not frame.startswith(b"\xff\xd8"):
        return "does not start with a JPEG start-of-image marker"
    offset = 2
    while offset + 4 <= len(frame):
        if frame[offset] != 0xFF:
            return f"its JPEG marker segments are corrupt at byte {offset}"
        marker = frame[offset + 1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
            continue
        if marker == _JPEG_SOS:
            return "its JPEG codestream has no frame header (SOF) before the scan"
        length = int.from_bytes(frame[offset + 2:offset + 4], "big")
        if marker in _JPEG_SOF:
            if length < 8 or offset + 2 + length > len(frame):
                return "its JPEG frame header (SOF) is truncated"
            rows = int.from_bytes(frame[offset + 5:offset + 7], "big")
            columns = int.from_bytes(frame[offset + 7:offset + 9], "big")
            return rows, columns, frame[offset + 9]
        offset += 2 + length
    return "its JPEG codestream ends before its frame header (SOF)"


def _j2k_size(frame: bytes) -> tuple[int, int, int] | str:
    """Rows, columns and components from the SIZ segment of a JPEG 2000 codestream."""
    offset = _jp2_codestream_offset(frame) if frame.startswith(_JP2_SIGNATURE) else 0
    if offset < 0 or frame[offset:offset + 4] != _J2K_START:
        return "does not start with a JPEG 2000 codestream (SOC and SIZ markers)"
    siz = frame[offset + 4:offset + 4 + 38]  # Lsiz, Rsiz, 8 x 32-bit sizes, Csiz
    if len(siz) < 38:
        return "its JPEG 2000 image header (SIZ) is truncated"

    def word(index: int) -> int:
        return int.from_bytes(siz[4 + 4 * index:8 + 4 * index], "big")

    width, height, x_offset, y_offset = word(0), word(1), word(2), word(3)
    if x_offset > width or y_offset > height:
        return "its JPEG 2000 image header (SIZ) has an image offset beyond the image"
    return height - y_offset, width - x_offset, int.from_bytes(siz[36:38], "big")


def _jp2_codestream_offset(frame: bytes) -> int:
    """Where the codestream starts inside a JP2 file (its ``jp2c`` box), or -1."""
    offset = 0
    while offset + 8 <= len(frame):
        length = int.from_bytes(frame[offset:offset + 4], "big")
        header = 8
        if length == 1:  # a 64-bit length follows the box type
            length, header = int.from_bytes(frame[offset + 8:offset + 16], "big"), 16
        if frame[offset + 4:offset + 8] == b"jp2c":
            return offset + header
        if length < header:  # 0 means "to the end of the file", and nothing valid is shorter
            return -1
        offset += length
    return -1
