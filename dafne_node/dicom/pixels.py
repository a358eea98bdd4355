"""Decode one image's pixel data, but only after its header and its bytes agree.

Pixel data from a peer can be broken in many ways: a file cut short, an element
length that does not match the image, a compressed frame that is garbage, cut
short or of another size, bit depths no decoder reads, or a header that declares
a 65535x65535 image or two billion frames. Decoders trust the header and the
codestream: they allocate what is declared first and fail (or not) later, and
some fail by panicking. So the header is checked against :data:`MAX_MATRIX` and
:data:`MAX_IMAGE_VOXELS`, the bytes present against the header, and every
compressed frame's own header against the DICOM header
(:mod:`dafne_node.dicom.codestream`), all before anything is decoded. Every refusal is
a :class:`PixelDataError` whose message says, on one line, what is wrong; the
caller adds which file.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.datadict import dictionary_description
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from dafne_node.dicom.codestream import FrameShape, frame_problem

LOGGER = logging.getLogger(__name__)

MAX_MATRIX = 2048
"""Largest Rows or Columns read. MR images are 64 to 1024 pixels a side, interpolated
reconstructions included; a larger value is a broken or hostile header, and a single
65535x65535 16-bit image would make a decoder allocate 8 GiB."""

MAX_IMAGE_VOXELS = 2**28
"""Most voxels in one image, all frames together: 1 GiB as float32, e.g. an enhanced
multi-frame image of 1024 slices of 512x512, ten times a large lower-leg series.
The volume, its label map and the model's batches then fit a worker's memory."""

BITS_ALLOCATED = (8, 16, 32)
"""Bits Allocated values of the greyscale images the models read."""

_UNDEFINED_LENGTH = 0xFFFFFFFF
_NOT_THE_FILES_FAULT = (MemoryError, KeyboardInterrupt, SystemExit)
"""Raised while decoding, but not because of the file: passed on so the worker retries or
stops."""


class PixelDataError(ValueError):
    """Pixel data that cannot be (or must not be) decoded; the message says why."""


@dataclass(frozen=True)
class PixelLayout:
    """What an image's header says its pixel data holds, checked against the limits."""

    rows: int
    columns: int
    frames: int
    bits_allocated: int
    transfer_syntax: UID

    @property
    def voxels(self) -> int:
        """Pixels over all frames."""
        return self.rows * self.columns * self.frames

    @property
    def native_bytes(self) -> int:
        """Length of the pixel data uncompressed, without the padding to even length."""
        return self.voxels * self.bits_allocated // 8

    @property
    def encapsulated(self) -> bool:
        """Whether the transfer syntax compresses pixel data into encapsulated frames."""
        return bool(self.transfer_syntax) and self.transfer_syntax.is_encapsulated

    @property
    def syntax_name(self) -> str:
        """The transfer syntax for people."""
        return self.transfer_syntax.name if self.transfer_syntax else "unknown transfer syntax"

    @property
    def shape(self) -> tuple[int, ...]:
        """The array the pixel data decodes to: ``(rows, cols)`` or ``(frames, rows, cols)``."""
        if self.frames == 1:
            return self.rows, self.columns
        return self.frames, self.rows, self.columns


def read_layout(ds: Dataset, *, multiframe: bool) -> PixelLayout:
    """Read and check an image's pixel description; nothing is decoded.

    Parameters
    ----------
    ds:
        The image's data set; its pixel data may still be deferred.
    multiframe:
        Whether its SOP class may hold more than one frame.

    Raises
    ------
    PixelDataError
        If the image has no pixel data, describes pixels the models do not read
        (colour, odd bit depths), has an unknown or undecodable transfer syntax,
        or is larger than :data:`MAX_MATRIX` or :data:`MAX_IMAGE_VOXELS`.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDataError("float pixel data (a parametric map) is not an image the "
                                 "models read")
        raise PixelDataError("has no Pixel Data")
    file_meta = getattr(ds, "file_meta", None)
    syntax = UID(file_meta.get("TransferSyntaxUID", "") if file_meta is not None else "")
    if syntax:
        _check_decodable(syntax)
    samples = _int_attribute(ds, "SamplesPerPixel")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("", "MONOCHROME1", "MONOCHROME2"):
        raise PixelDataError(f"{samples}-sample {photometric or '?'} pixels are not a "
                             "greyscale MR image")
    rows, columns = _int_attribute(ds, "Rows"), _int_attribute(ds, "Columns")
    if not (0 < rows <= MAX_MATRIX and 0 < columns <= MAX_MATRIX):
        raise PixelDataError(f"the header declares a {rows}x{columns} image; the node reads "
                             f"images of at most {MAX_MATRIX}x{MAX_MATRIX}")
    bits = _int_attribute(ds, "BitsAllocated")
    stored = _int_attribute(ds, "BitsStored")
    representation = _int_attribute(ds, "PixelRepresentation")
    if bits not in BITS_ALLOCATED or not 0 < stored <= bits or representation not in (0, 1):
        raise PixelDataError(
            f"Bits Allocated {bits}, Bits Stored {stored}, Pixel Representation "
            f"{representation} do not describe a greyscale image (Bits Allocated "
            f"{', '.join(map(str, BITS_ALLOCATED))}; Bits Stored 1 to Bits Allocated; "
            "Pixel Representation 0 or 1)"
        )
    frames = _int_attribute(ds, "NumberOfFrames", default=1)
    if frames < 1 or (frames > 1 and not multiframe):
        raise PixelDataError(f"Number of Frames is {frames} in a single-frame image")
    layout = PixelLayout(rows, columns, frames, bits, syntax)
    if layout.voxels > MAX_IMAGE_VOXELS:
        raise PixelDataError(f"the header declares {frames} frames of {rows}x{columns}, "
                             f"{layout.voxels:,} voxels; the node reads at most "
                             f"{MAX_IMAGE_VOXELS:,} in a series")
    return layout


def decode(ds: Dataset, layout: PixelLayout) -> np.ndarray:
    """The pixel data of ``ds`` as stored values, shaped as ``layout`` says.

    The bytes present are checked against ``layout`` first (:func:`check_bytes`).

    Raises
    ------
    PixelDataError
        If the pixel data does not match the header or cannot be decoded.
    """
    check_bytes(ds, layout)
    try:
        with _QUIET_DECODER.failures_dropped(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
    except _NOT_THE_FILES_FAULT:
        raise
    except BaseException as exc:  # decoders raise many types; all mean "unusable"
        # BaseException too: a Rust decoder (pylibjpeg-rle) that panics on corrupt
        # segments raises pyo3's PanicException, which is not an Exception.
        raise PixelDataError(f"pixel data cannot be decoded ({layout.syntax_name}): "
                             f"{one_line(exc)}") from exc
    if array.shape != layout.shape:
        raise PixelDataError(f"pixel data decodes to an array of shape {array.shape}, the "
                             f"header declares {layout.shape}")
    return array


def check_bytes(ds: Dataset, layout: PixelLayout) -> None:
    """Compare the pixel data present with what the header declares; nothing is decoded.

    Raises
    ------
    PixelDataError
        If the file is truncated, the native pixel data has another length than
        the image needs, or the encapsulated frames are not the declared number
        of frames of the declared size (see :func:`~dafne_node.dicom.codestream.frame_problem`).
    """
    element = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(element, RawDataElement):
        declared = element.length
    else:
        declared = _UNDEFINED_LENGTH if element.is_undefined_length else None
    value = ds.PixelData  # read from the file here if the reader deferred it
    if not layout.encapsulated:
        if declared == _UNDEFINED_LENGTH:
            raise PixelDataError("Pixel Data is encapsulated, as if compressed, but the transfer "
                                 f"syntax is {layout.syntax_name}")
        _check_native_length(len(value), declared, layout)
        return
    if declared != _UNDEFINED_LENGTH:
        raise PixelDataError(f"Pixel Data is not encapsulated although {layout.syntax_name} is "
                             "a compressed transfer syntax")
    shape = FrameShape(layout.rows, layout.columns, 1, layout.bits_allocated)
    for index, frame in enumerate(_split_frames(ds, value, layout), start=1):
        problem = frame_problem(layout.transfer_syntax, frame, shape)
        if problem is not None:
            label = f"frame {index}" if layout.frames > 1 else "the compressed frame"
            raise PixelDataError(f"{label} ({layout.syntax_name}) cannot be this image: "
                                 f"{problem}")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: decoders list one failure per plugin and line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not isinstance(exc, Exception):  # a native library's panic
        lines[0] = f"the decoder crashed ({type(exc).__name__}): {lines[0]}"
    head, *rest = lines
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def _check_decodable(syntax: UID) -> None:
    if not syntax.is_transfer_syntax:
        raise PixelDataError(f"{syntax} is not a transfer syntax this node knows")
    if not syntax.is_encapsulated:
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise PixelDataError(f"the node has no decoder for {syntax.name}")


def _int_attribute(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value in (None, ""):
        if default is None:
            raise PixelDataError(f"no {dictionary_description(keyword)}; the pixel data cannot "
                                 "be read")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PixelDataError(f"{dictionary_description(keyword)} is {str(value)!r}, not a "
                             "number") from None


def _check_native_length(present: int, declared: int | None, layout: PixelLayout) -> None:
    if declared is not None and present < declared:
        raise PixelDataError(f"the file is truncated: its Pixel Data declares {declared:,} bytes "
                             f"and the file holds {present:,}")
    expected = layout.native_bytes
    if present not in (expected, expected + expected % 2):
        frames = f"{layout.frames} x " if layout.frames > 1 else ""
        raise PixelDataError(
            f"Pixel Data is {present:,} bytes, {'fewer' if present < expected else 'more'} than "
            f"the {expected:,} of the {frames}{layout.rows}x{layout.columns} "
            f"{layout.bits_allocated}-bit image the header declares"
        )


def _split_frames(ds: Dataset, value: bytes, layout: PixelLayout) -> list[bytes]:
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = list(generate_frames(value, number_of_frames=layout.frames,
                                          extended_offsets=extended))
    except Exception as exc:  # the parser raises several types; all mean "corrupt"
        raise PixelDataError("the encapsulated Pixel Data cannot be split into frames: "
                             f"{one_line(exc)}") from exc
    if len(frames) != layout.frames:
        raise PixelDataError(f"the encapsulated Pixel Data holds {len(frames)} frames, the "
                             f"header declares {layout.frames}")
    return frames


class _DecoderFailureFilter(logging.Filter):
    """Drops pydicom's per-plugin error tracebacks while this thread decodes.

    pydicom logs every failed decoding plugin with its traceback before raising;
    the :class:`PixelDataError` raised here carries the same messages on one line,
    and the worker logs that once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep a record unless this thread is decoding and it is an error."""
        return not (getattr(self._local, "active", False) and record.levelno >= logging.ERROR)

    @contextmanager
    def failures_dropped(self) -> Iterator[None]:
        """Drop decoder errors logged by this thread inside the block."""
        logging.getLogger("pydicom.pixels.decoders.base").addFilter(self)  # idempotent
        self._local.active = True
        try:
            yield
        finally:
            self._local.active = False


_QUIET_DECODER = _DecoderFailureFilter()
