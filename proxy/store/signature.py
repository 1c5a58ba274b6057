"""A completion's metadata as a 63-bit signature, kept on each of its metadata rows.

Each pair sets two bits chosen by a hash of the pair, so a completion whose signature lacks
any bit of a pair's cannot have that pair. A list with several metadata pairs walks one
pair's index range and drops the rows whose signature rules the others out without reading
anything else; only the few left (the matches, and about one in a hundred others with three
pairs stored) are checked exactly. The hash is CRC-32 (of the pair, and of it reversed),
fixed across processes and releases, never Python's ``hash``; it runs in C, so a
completion's signature costs well under a microsecond on the write path.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

BITS = 63  # both backends keep it as a signed 64-bit integer: bit 63 stays clear


def pair_bits(key: str, value: str) -> int:
    data = key.encode() + b"\0" + value.encode()
    return (1 << (zlib.crc32(data) % BITS)) | (1 << (zlib.crc32(data[::-1]) % BITS))


def signature(pairs: Iterable[tuple[str, str]]) -> int:
    """The bits of every pair, or-ed together."""
    bits = 0
    for key, value in pairs:
        bits |= pair_bits(key, value)
    return bits
