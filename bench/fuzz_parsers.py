#!/usr/bin/env python3
"""Coverage-guided fuzzing of the receive path's parsers with atheris (not run in CI).

The property tests in ``tests/dicom_scp/test_scp_properties.py`` run a fixed set of
examples on every commit; this harness runs for as long as you let it, steered by which
branches each input reaches. A failure is any exception other than the parser's own
error type (:class:`HeaderError`, :class:`CodecError`, :class:`InflateError`), or an
input that takes longer than ``SLOW_S`` seconds. atheris writes the crashing input to
``crash-…``; replay it with ``bench/fuzz_parsers.py TARGET crash-…``.

Examples::

    .venv/bin/pip install atheris
    .venv/bin/python bench/fuzz_parsers.py header -max_total_time=600 corpus/header
    .venv/bin/python bench/fuzz_parsers.py codec -runs=1000000
    .venv/bin/python bench/fuzz_parsers.py deflate -max_total_time=60

Arguments after the target go to libFuzzer (``-help=1`` lists them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
import zlib
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    from dicom_scp.codec import CodecError, decode_command_set, decode_store_request, split_pdata
    from dicom_scp.deflate import InflateError, inflate_prefix, inflated_size
    from dicom_scp.header import HeaderError, parse_header

SLOW_S = 2.0
_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def fuzz_header(data: bytes) -> None:
    """The first byte picks the syntax; a deflated input is deflated here, so the fuzzer
    steers the data set rather than the compressed bits (bit-level damage to the stream is
    the ``deflate`` target's job)."""
    if not data:
        return
    syntax = _SYNTAXES[data[0] % len(_SYNTAXES)]
    body = data[1:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = _deflate(body)
    with contextlib.suppress(HeaderError):
        parse_header(body, syntax, max_header_bytes=1 << 20)


def fuzz_codec(data: bytes) -> None:
    """Command sets (then as a C-STORE-RQ) and P-DATA-TF bodies."""
    try:
        elements = decode_command_set(data)
    except CodecError:
        elements = None
    if elements is not None:
        elements.setdefault(0x0100, b"\x01\x00")
        with contextlib.suppress(CodecError):
            decode_store_request(elements)
    with contextlib.suppress(CodecError):
        split_pdata(data)


def fuzz_deflate(data: bytes) -> None:
    """Raw bytes as a deflate stream: prefixes and the bounded size count."""
    with contextlib.suppress(InflateError):
        inflate_prefix(data, 1 << 16)
    with contextlib.suppress(InflateError):
        inflated_size(data, 1 << 24)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "header": fuzz_header,
    "codec": fuzz_codec,
    "deflate": fuzz_deflate,
}


def _timed(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        started = time.perf_counter()
        target(data)
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_S:
            raise RuntimeError(f"input of {len(data)} bytes took {elapsed:.1f} s")

    return run


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer arguments]")
    target = TARGETS[sys.argv.pop(1)]
    warnings.simplefilter("ignore")  # pydicom warns about every odd value it meets
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, _timed(target))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
