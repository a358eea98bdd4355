"""Inflate Deflated Explicit VR Little Endian data sets without trusting their size.

Why this exists: a deflated data set (PS3.5 §A.5, raw deflate without a zlib header) can
inflate a thousandfold, so a peer that sends 1 MiB can make a naive ``decompress`` hold
1 GiB. Everything here inflates in bounded steps (``decompressobj.decompress`` with a
``max_length``) and feeds the compressed input in bounded chunks, so memory stays
bounded by the caller's limit whatever the stream claims. The module knows nothing of
DICOM: the header reader asks for prefixes, the store service for the total size.
"""

from __future__ import annotations

import logging
import zlib

__all__ = [
    "InflateError",
    "InflateLimitError",
    "PrefixInflater",
    "inflate_prefix",
    "inflated_size",
]

LOGGER = logging.getLogger(__name__)

_WBITS = -zlib.MAX_WBITS  # raw deflate, as PS3.5 §A.5 prescribes
_INPUT_CHUNK = 64 * 1024  # compressed bytes fed per call: bounds the unconsumed tail
_OUTPUT_CHUNK = 1024 * 1024  # inflated bytes produced per call when only counting


class InflateError(ValueError):
    """The deflate stream is corrupt or ends before its final block."""


class InflateLimitError(InflateError):
    """The stream inflates to more than the caller allows (a deflate bomb, or just too big).

    Attributes
    ----------
    limit : int
        The limit, in inflated bytes, that was exceeded.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"inflates to more than {_size(limit)}")
        self.limit = limit


def _size(count: int) -> str:
    """A byte count as people read it: ``256 MiB`` rather than ``268435456``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale and count % scale == 0:
            return f"{count // scale} {unit}"
    return f"{count} bytes"


class PrefixInflater:
    """Inflate a stream front to back, only as far as asked, keeping what was inflated.

    The header reader asks for ever longer prefixes until it has the elements it needs;
    each call inflates only the missing part, so finding a header costs what the header
    costs, not what the pixel data would. What has been inflated is kept, so memory is
    about twice the longest prefix asked for (the kept bytes and the one being returned).
    """

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._input = memoryview(data).cast("B")
        self._position = 0  # how much of the input has been handed to zlib
        self._inflater = zlib.decompressobj(_WBITS)
        self._chunks: list[bytes] = []
        self._length = 0
        self._tail = b""  # input zlib took but did not inflate for lack of max_length
        self._drained = False  # the input is used up and zlib has nothing more to give

    @property
    def finished(self) -> bool:
        """Whether everything there is has been inflated.

        A stream whose input runs out before its final block counts as finished: the
        prefix is then all there is (see :attr:`truncated`).
        """
        return self._inflater.eof or self._drained

    @property
    def truncated(self) -> bool:
        """Whether the input ran out before the stream's final block."""
        return self._drained and not self._inflater.eof

    def prefix(self, size: int) -> bytes:
        """The first ``size`` inflated bytes, or all of them if the stream is shorter.

        Raises
        ------
        InflateError
            If the stream is corrupt within what must be inflated to get the prefix.
        """
        while self._length < size and not self.finished:
            if self._tail:
                chunk: bytes | memoryview = self._tail
            else:
                chunk = self._input[self._position : self._position + _INPUT_CHUNK]
                self._position += len(chunk)
            try:
                more = self._inflater.decompress(chunk, size - self._length)
            except zlib.error as exc:
                raise InflateError(f"corrupt deflate stream: {exc}") from exc
            self._tail = self._inflater.unconsumed_tail
            if more:
                self._chunks.append(more)
                self._length += len(more)
            elif not chunk:  # no input left and zlib held nothing back
                self._drained = True
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        whole = self._chunks[0] if self._chunks else b""
        return whole[:size] if len(whole) > size else whole


def inflate_prefix(data: bytes | bytearray | memoryview, size: int) -> bytes:
    """Inflate at most the first ``size`` bytes of a raw deflate stream.

    A result shorter than ``size`` is the whole stream (or all that a truncated stream
    holds). Memory used is at most about twice ``size``, however far the stream would
    inflate.

    Raises
    ------
    InflateError
        If the stream is corrupt before ``size`` bytes of output.
    """
    return PrefixInflater(data).prefix(size)


def inflated_size(data: bytes | bytearray | memoryview, limit: int) -> int:
    """How many bytes a raw deflate stream inflates to, refusing to count past ``limit``.

    The stream is inflated 1 MiB at a time and the output thrown away, so a deflate bomb
    costs time proportional to ``limit`` and a constant ~1 MiB of memory. Use it before
    accepting a Deflated Explicit VR Little Endian instance whose consumers will inflate
    it whole. Bytes after the end of the stream (padding) are ignored.

    Parameters
    ----------
    data : bytes, bytearray or memoryview
        The deflated data set as received (raw deflate, no zlib header).
    limit : int
        The largest inflated size, in bytes, to accept.

    Returns
    -------
    int
        The inflated size, at most ``limit``.

    Raises
    ------
    InflateLimitError
        As soon as the output exceeds ``limit``; its message leads with the reason
        (``"inflates to more than 256 MiB"``).
    InflateError
        If the stream is corrupt or ends before its final block.
    """
    source = memoryview(data).cast("B")
    inflater = zlib.decompressobj(_WBITS)
    total = 0
    try:
        for start in range(0, len(source), _INPUT_CHUNK):
            chunk: bytes | memoryview = source[start : start + _INPUT_CHUNK]
            while chunk and not inflater.eof:
                total += len(inflater.decompress(chunk, _OUTPUT_CHUNK))
                if total > limit:
                    raise InflateLimitError(limit)
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break
        # zlib may hold back output it has the input for; drain it in bounded steps too
        while not inflater.eof:
            more = inflater.decompress(b"", _OUTPUT_CHUNK)
            if not more:
                break
            total += len(more)
            if total > limit:
                raise InflateLimitError(limit)
    except zlib.error as exc:
        raise InflateError(f"corrupt deflate stream: {exc}") from exc
    if not inflater.eof:
        raise InflateError("deflate stream truncated: it ends before its final block")
    return total
