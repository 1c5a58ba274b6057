"""The table: figures, their targets, and how they are rendered."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from tests.bench.http_phase import TWO_PROCESS, Measured, cpu_note
from tests.bench.settings import Settings
from tests.bench.wrk import CONNECTIONS


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None
    ratio_floor: float | None = None
    ratio_direct: float | None = None
    note: str = ""

    def row(self) -> list[str]:
        def ratio(r: float | None) -> str:
            return f"{r:.3f}" if r is not None else ""

        if self.unit in {"req/s", "completions/s", "us"}:
            value = f"{self.value:,.0f} {self.unit}"
        else:
            value = f"{self.value:,.3f} {self.unit}"
        verdict = {True: "PASS", False: "FAIL", None: ""}[self.passed]
        return [
            self.name,
            value,
            self.target,
            ratio(self.ratio_floor),
            ratio(self.ratio_direct),
            verdict,
            self.note,
        ]


def _spread(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return ""
    return f"rounds {min(values):.{digits}f}..{max(values):.{digits}f}; "


# Targets against the floor (throughput) or per request (CPU): the subject, the figure, the
# bound and which way it must go.
THROUGHPUT_TARGETS = {
    ("relay", "plain"): 0.90,
    ("proxy", "plain"): 0.70,
    ("proxy", "stream"): 0.85,
}


CPU_TARGET = 1.5  # the proxy's CPU per stored plain request, as a multiple of the floor's


ADDED_P50_TARGET_MS = 0.8


P99_TARGET_MS = 3.0


WORKERS_TARGET = 0.70  # proxy_w2 / floor_x2, plain


def _round_ratios(measured: Measured, reference: Measured | None, name: str) -> str:
    """Each round's ratio to the reference measured in the same round: a drift of the
    machine between rounds moves both sides of one round together."""
    if reference is None or reference is measured or len(measured.runs) < 2:
        return ""
    ratios = [a.rps / b.rps for a, b in zip(measured.runs, reference.runs, strict=False) if b.rps]
    return f"x {name} by round {'/'.join(f'{r:.2f}' for r in ratios)}; " if ratios else ""


def http_figures(http: dict[str, dict[str, Measured]]) -> list[Figure]:
    figures: list[Figure] = []
    labels = list(http)
    for kind in ("plain", "stream"):
        run = f"{kind}_throughput"
        base = {s: http[s][run].median_rps() for s in ("direct", "floor") if s in http}
        for subject in labels:
            if run not in http[subject]:
                continue
            measured = http[subject][run]
            value = measured.median_rps()
            reference = "floor_x2" if subject in TWO_PROCESS and "floor_x2" in http else "floor"
            floor_rps = http[reference][run].median_rps() if reference in http else None
            figure = Figure(
                f"{kind} throughput, {CONNECTIONS} conn [{subject}]",
                value,
                "req/s",
                ratio_floor=value / floor_rps if floor_rps else None,
                ratio_direct=value / base["direct"] if "direct" in base else None,
                note=_spread([r.rps for r in measured.runs], 0)
                + _round_ratios(measured, http.get(reference, {}).get(run), reference)
                + cpu_note(measured.median_cpu()),
            )
            target = THROUGHPUT_TARGETS.get((subject, kind))
            if subject == "proxy_w2" and kind == "plain":
                target = WORKERS_TARGET
            if target is not None and figure.ratio_floor is not None:
                against = "floor_x2" if subject == "proxy_w2" else "floor"
                figure.target = f">= {target:.2f} x {against}"
                figure.passed = figure.ratio_floor >= target
            figures.append(figure)
        floor_cpu = http["floor"][run].median_cpu_us() if "floor" in http else None
        for subject in labels:
            if run not in http[subject]:
                continue
            measured = http[subject][run]
            value = measured.median_cpu_us()
            reference = floor_cpu
            if subject in TWO_PROCESS and "floor_x2" in http:
                reference = http["floor_x2"][run].median_cpu_us()
            figure = Figure(
                f"{kind} CPU per request [{subject}]",
                value,
                "us",
                ratio_floor=value / reference if reference else None,
                note=_spread(measured.cpu_us_per_request(), 0).rstrip("; ")
                + " (user + system of the subject's process tree / requests)",
            )
            if subject == "proxy" and kind == "plain" and figure.ratio_floor is not None:
                figure.target = f"<= {CPU_TARGET:.1f} x floor"
                figure.passed = figure.ratio_floor <= CPU_TARGET
            figures.append(figure)
    for kind in ("plain", "stream"):
        run = f"{kind}_latency"
        measured_here = [s for s in labels if run in http[s]]
        for percentile in ("p50", "p99"):
            base = {s: http[s][run].median_ms(percentile) for s in ("direct", "floor") if s in http}
            for subject in measured_here:
                measured = http[subject][run]
                value = measured.median_ms(percentile)
                figure = Figure(
                    f"{kind} latency {percentile}, 1 conn [{subject}]",
                    value,
                    "ms",
                    ratio_floor=value / base["floor"] if "floor" in base else None,
                    ratio_direct=value / base["direct"] if "direct" in base else None,
                    note=_spread([r.ms(percentile) for r in measured.runs], 3).rstrip("; "),
                )
                if subject == "proxy" and kind == "plain" and percentile == "p99":
                    figure.target = f"<= {P99_TARGET_MS:.0f} ms"
                    figure.passed = value <= P99_TARGET_MS
                figures.append(figure)
        if "direct" not in http:
            continue
        direct = http["direct"][run].median_ms("p50")
        for subject in measured_here:
            if subject == "direct":
                continue
            added = http[subject][run].median_ms("p50") - direct
            figure = Figure(f"{kind} p50 added over direct [{subject}]", added, "ms")
            if subject == "proxy":
                figure.target = f"<= {ADDED_P50_TARGET_MS} ms"
                figure.passed = added <= ADDED_P50_TARGET_MS
            figures.append(figure)
    figures += search_cost_figures(http)
    return figures


SEARCH_COST_TARGET = 0.05  # indexing may cost the proxy's plain throughput this much at most


def search_cost_figures(http: dict[str, dict[str, Measured]]) -> list[Figure]:
    """What indexing for search costs the stored plain request: proxy against
    proxy_nosearch, round by round (they run in the same rounds, one after the other)."""
    if "proxy" not in http or "proxy_nosearch" not in http:
        return []
    on, off = http["proxy"]["plain_throughput"], http["proxy_nosearch"]["plain_throughput"]
    rps = [a.rps / b.rps for a, b in zip(on.runs, off.runs, strict=True)]
    cpu = [a / b for a, b in zip(on.cpu_us_per_request(), off.cpu_us_per_request(), strict=True)]
    throughput = Figure(
        "plain throughput, search on / off",
        on.median_rps() / off.median_rps(),
        "x",
        target=f">= {1 - SEARCH_COST_TARGET:.2f}",
        note=_spread(rps, 3).rstrip("; ") + " (per round)",
    )
    throughput.passed = throughput.value >= 1 - SEARCH_COST_TARGET
    per_request = Figure(
        "plain CPU per request, search on / off",
        on.median_cpu_us() / off.median_cpu_us(),
        "x",
        target=f"<= {1 + SEARCH_COST_TARGET:.2f}",
        note=_spread(cpu, 3).rstrip("; ") + " (per round)",
    )
    per_request.passed = per_request.value <= 1 + SEARCH_COST_TARGET
    return [throughput, per_request]


def store_figures(store: dict[str, Any], settings: Settings) -> list[Figure]:
    figures = []
    small, large = (str(size) for size in settings.store_sizes)
    labels = {
        "retrieve": "retrieve by id",
        "list_metadata": "list, metadata filter",
        "list_after": "list, after",
        "list_metadata_two_pairs": "list, 2-pair metadata filter",
        "list_metadata_disjoint": "list, 2 pairs never together",
        "list_metadata_disjoint_common_first": "list, 2 pairs never together, common first",
        "list_metadata_after": "list, metadata filter + after",
        "list_newest": "list, newest first",
    }
    targets = {
        "retrieve": 2.0,
        "list_metadata": 5.0,
        "list_metadata_two_pairs": 5.0,
        "list_metadata_disjoint": 5.0,
        "list_metadata_disjoint_common_first": 5.0,
    }
    for name, label in labels.items():
        for size in (small, large):
            reads = store[size]["reads_ms"][name]
            baseline = store[size]["reads_ms"].get(f"{name} (baseline)")
            for percentile in ("p50", "p99"):
                figure = Figure(
                    f"store {label} {percentile} @ {int(size):,}", reads[percentile], "ms"
                )
                if baseline is not None:
                    figure.note = f"at {settings.baseline}: {baseline[percentile]:.3f} ms"
                if size == large and percentile == "p50" and name in targets:
                    figure.target = f"<= {targets[name]:.0f} ms"
                    if large != "1000000":
                        figure.target += " (at 1M)"
                    figure.passed = reads["p50"] <= targets[name]
                figures.append(figure)
    for key, label in (("write_batch", "write_batch, 256/batch"), ("writer", "Writer.commit")):
        write = store[key]
        note = f"~{store['record_bytes']:,} B each, {write['records']:,} records"
        if key == "writer":
            note += f", {write['concurrency']} concurrent, mean batch {write['mean_batch']:.0f}"
        figures.append(
            Figure(
                f"store write throughput, {label}",
                write["per_second"],
                "completions/s",
                target=">= 5,000/s",
                passed=write["per_second"] >= 5000,
                note=note,
            )
        )
    turns = store.get("search_writes")
    if turns:
        size = f"{settings.store_sizes[-1]:,}"
        median = {
            key: {
                name: statistics.median(run[key] for run in turns[name])
                for name in ("on", "off", "backlog")
            }
            for key in ("per_second", "cpu_us_per_record")
        }
        for name, label in (("on", "search on"), ("off", "search off")):
            figure = Figure(
                f"store Writer.commit @ {size}, {label}",
                median["per_second"][name],
                "completions/s",
                note=_spread([run["per_second"] for run in turns[name]], 0)
                + f"{median['cpu_us_per_record'][name]:.0f} us CPU per completion;"
                f" {turns['records']:,} a turn, on and off in turns",
            )
            if name == "on":
                figure.target, figure.passed = ">= 5,000/s", figure.value >= 5000
            figures.append(figure)
        figures.append(
            Figure(
                f"store search backlog indexed at open @ {size}",
                median["per_second"]["backlog"],
                "completions/s",
                note=f"{median['cpu_us_per_record']['backlog']:.0f} us CPU per completion",
            )
        )
    return figures


def rss_figure(rss: dict[str, Any]) -> Figure:
    return Figure(
        f"proxy peak RSS (VmHWM) after {rss['requests']:,} requests",
        rss["vmhwm_kb"] / 1024,
        "MB",
        target="<= 100 MB",
        passed=rss["vmhwm_kb"] / 1024 <= 100,
        note=f"at start {rss['vmhwm_start_kb'] / 1024:.1f} MB;"
        f" VmRSS at end {rss['vmrss_kb'] / 1024:.1f} MB",
    )


def render(figures: list[Figure]) -> str:
    header = ["figure", "value", "target", "x floor", "x direct", "result", "note"]
    rows = [header] + [figure.row() for figure in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 3, 4}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)
