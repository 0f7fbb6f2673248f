"""Measure zstd cost and gain per message size, to choose COMPRESSION_THRESHOLD and LEVEL."""

from __future__ import annotations

import os
import platform
import random
import sys
import time

import msgspec
import zstandard

SIZES = [64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20]
LEVELS = [-1, 1, 3]
SECONDS_PER_CELL = 0.15
WORDS = "alpha beta gamma delta user order item price status pending shipped paid".split()


def json_like(size: int, seed: int = 7) -> bytes:
    """MessagePack records with repeated keys, numbers and short words, like real API data."""
    rng = random.Random(seed)
    records: list[dict[str, object]] = []
    out = b""
    while len(out) < size:
        records.extend(
            {
                "id": rng.randrange(1 << 31),
                "name": f"{rng.choice(WORDS)}-{rng.randrange(10_000)}",
                "status": rng.choice(WORDS),
                "price": round(rng.uniform(0, 1000), 2),
                "tags": rng.sample(WORDS, 3),
                "created": 1_700_000_000 + rng.randrange(10_000_000),
            }
            for _ in range(max(1, size // 400))
        )
        out = msgspec.msgpack.encode(records)
    return out[:size]


def per_call(function: object, payload: bytes) -> float:
    """Seconds per call of ``function(payload)``, measured for about SECONDS_PER_CELL."""
    call = function  # keep the loop body minimal
    assert callable(call)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < SECONDS_PER_CELL or runs < 3:
        call(payload)
        runs += 1
    return elapsed / runs


def row(kind: str, size: int, level: int, payload: bytes) -> str:
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    decompressor = zstandard.ZstdDecompressor()
    packed = compressor.compress(payload)
    t_compress = per_call(compressor.compress, payload)
    t_decompress = per_call(decompressor.decompress, packed)
    saved = size - len(packed)
    # Compressing pays when sending the saved bytes takes longer than the CPU time it costs.
    break_even = f"{saved / (t_compress + t_decompress) / 1e6:10.1f}" if saved > 0 else "     never"
    return (
        f"{kind:8} {size:>9,} {level:>5} {size / len(packed):7.2f} {t_compress * 1e6:11.1f} "
        f"{t_decompress * 1e6:11.1f} {size / t_compress / 1e6:9.0f} {break_even}"
    )


def main() -> None:
    print(
        f"python {sys.version.split()[0]}, zstandard {zstandard.__version__} "
        f"(libzstd {zstandard.ZSTD_VERSION}), {os.cpu_count()} cpus, {platform.platform()}"
    )
    print("break-even: compression pays only on links slower than this many MB/s")
    header = "kind          bytes level   ratio  compress µs  decomp. µs  comp MB/s break-even"
    for kind, make in (("json", json_like), ("random", lambda size: random.randbytes(size))):
        print()
        print(header)
        for size in SIZES:
            payload = make(size)
            for level in LEVELS:
                print(row(kind, size, level, payload), flush=True)


if __name__ == "__main__":
    main()
