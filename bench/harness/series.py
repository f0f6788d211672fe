"""Print one metric of one run as a time series, a column per system: how it moved through the
phases (a median over a phase hides a curve that climbs).

Usage: python series.py <run dir or raw.csv[.gz]> [metric ...]   (default: claim_p50_ms claim_p99_ms)
Rows are the adapter's samples in order, keyed by the sample's offset from its system's start.
"""

from __future__ import annotations

import csv
import gzip
import sys
from collections import defaultdict
from pathlib import Path


def rows(path: Path):
    if path.is_dir():
        path = path / "raw.csv" if (path / "raw.csv").exists() else path / "raw.csv.gz"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        yield from csv.DictReader(fh)


def main() -> None:
    src = Path(sys.argv[1])
    metrics = sys.argv[2:] or ["claim_p50_ms", "claim_p99_ms"]
    # (system, metric) -> [(elapsed, phase, value)], and each system's dead tuples by elapsed time.
    series: dict[tuple[str, str], list[tuple[float, str, float]]] = defaultdict(list)
    dead: dict[tuple[str, str], tuple[float, str, float]] = {}
    for r in rows(src):
        if r["subject_kind"] == "adapter" and r["metric"] in metrics:
            series[(r["system"], r["metric"])].append((float(r["elapsed_s"]), r["phase_label"], float(r["value"])))
        elif r["subject_kind"] == "table" and r["metric"] == "n_dead_tup":
            dead[(r["system"], r["sampled_at"])] = dead.get((r["system"], r["sampled_at"]), (float(r["elapsed_s"]), r["phase_label"], 0.0))
            t, phase, v = dead[(r["system"], r["sampled_at"])]
            dead[(r["system"], r["sampled_at"])] = (t, phase, v + float(r["value"]))
    # Dead tuples summed over the system's tables, one point per sample time.
    for (system, _), point in sorted(dead.items(), key=lambda kv: kv[1][0]):
        series[(system, "n_dead_tup")].append(point)
    systems = sorted({s for s, _ in series})
    for metric in metrics + ["n_dead_tup"]:
        cols = [s for s in systems if series.get((s, metric))]
        if not cols:
            continue
        print(f"\n{metric}")
        print("t(s)  " + "".join(f"{s:>28}" for s in cols))
        length = max(len(series[(s, metric)]) for s in cols)
        for i in range(length):
            cells, t = [], None
            for s in cols:
                pts = series[(s, metric)]
                if i < len(pts):
                    t = t if t is not None else pts[i][0]
                    cells.append(f"{pts[i][2]:>14.1f} {pts[i][1]:>13}")
                else:
                    cells.append(" " * 28)
            try:
                print(f"{(t or 0):5.0f} " + "".join(cells))
            except BrokenPipeError:
                return


if __name__ == "__main__":
    main()
