"""What one run of the benchmark does: durations, rounds, sizes, CPU placement."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration: int  # seconds per throughput run
    latency_duration: int  # seconds per 1-connection latency run
    warmup: int  # seconds of warm-up per subject and kind
    rounds: int  # HTTP runs are repeated this many times, subjects interleaved; medians win
    rss_requests: int
    store_sizes: tuple[int, int]
    read_calls: int
    write_records: int
    pin: bool
    baseline: str | None = None  # a git revision whose store the multi-pair lists also run on

    @classmethod
    def of(cls, quick: bool, pin: bool, baseline: str | None = None) -> Settings:
        if quick:
            return cls(True, 3, 3, 1, 1, 10_000, (10_000, 100_000), 2_000, 20_000, pin, baseline)
        return cls(
            False, 10, 10, 2, 3, 100_000, (100_000, 1_000_000), 2_000, 100_000, pin, baseline
        )
