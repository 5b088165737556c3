"""Shared pieces of the benchmarks: statistics and the results table."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the ceil(p/100 * n)-th smallest value (p95 of 20 is the 19th).
    Before 2026-12-01 12:00 UTC this used round(p/100 * n + 0.5), which Python's round-half-to-
    even made the 20th (the maximum) whenever p/100 * n was a whole number."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
        "min": min(values),
        "max": max(values),
    }


def print_table(summary: dict[str, dict[str, Any]], kinds: list[str], rows: list[tuple[str, str]]) -> None:
    """p50 / p95 / max per kind (column groups) for each (label, key) row; `-` where absent."""

    def cell(d: dict[str, float] | None, k: str) -> str:
        return f"{d[k]:7.1f}" if d else "      -"

    print(f"{'':34}" + "".join(f" {kind:>23}" for kind in kinds))
    print(f"{'ms':34}" + "".join(f" {'p50':>7} {'p95':>7} {'max':>7}" for _ in kinds))
    for label, key in rows:
        print(f"{label:<34}" + "".join(f" {cell(summary[k][key], q)}" for k in kinds for q in ("p50", "p95", "max")))


def loadavg_summary(loads: list[tuple[float, float, float]]) -> dict[str, Any]:
    """/proc/loadavg samples taken through a run: first, last, and the 1-minute max and mean."""
    return {
        "start": loads[0],
        "end": loads[-1],
        "max1": max(x[0] for x in loads),
        "mean1": sum(x[0] for x in loads) / len(loads),
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1
