"""Collect the harness's per-run summaries into bench/harness/results/.

Usage: python summarize.py <OUT dir of run.sh> <results dir>

Reads <OUT>/index.txt ("<scenario> <systems> <run dir>" lines). For every run it copies summary.json,
manifest.json, final_state.json and a gzipped raw.csv (when small) into <results>/<scenario>__<systems>/,
then writes <results>/phases.csv (one row per scenario x system x phase) and <results>/table.md
(one row per scenario x system: the stress phase and what followed it).
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import sys
from pathlib import Path

OUT = Path(sys.argv[1])
RES = Path(sys.argv[2])
RAW_GZ_LIMIT = 600_000  # bytes; larger raw files stay out of the commit

# The phase that characterises each scenario, and the phase after it.
KEY_PHASE = {
    "clean": ("clean_1", None),
    "idle_in_tx_saturation": ("idle_1", "recovery_1"),
    "idle_in_tx_180s": ("idle_1", "recovery_1"),
    "idle_in_tx_long": ("idle_1", "recovery_1"),
    "active_readers": ("readers_1", "recovery_1"),
    "sustained_high_load": ("pressure_1", "recovery_1"),
    "chaos_crash_recovery": ("kill", "recovery"),
    "chaos_pg_backend_kill": ("kills", "recovery"),
    "chaos_pool_exhaustion": ("exhaustion", "recovery"),
    "chaos_postgres_restart": ("restart", "recovery"),
}
BASELINE = {"clean": "clean_1", "idle_in_tx_saturation": "clean_1", "idle_in_tx_180s": "clean_1",
            "idle_in_tx_long": "clean_1", "active_readers": "clean_1",
            "sustained_high_load": "clean_1"}


def m(phase: dict, metric: str, stat: str = "median"):
    v = (phase.get("metrics") or {}).get(metric) or {}
    return v.get(stat)


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def main() -> None:
    RES.mkdir(parents=True, exist_ok=True)
    runs = []
    for line in (OUT / "index.txt").read_text().splitlines():
        if line.strip():
            scenario, systems, run_dir = line.split()
            runs.append((scenario, systems.replace(",", "+"), OUT / run_dir))
    rows = []
    table = []
    for scenario, systems, run_dir in runs:
        dest = RES / f"{scenario}__{systems}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "manifest.json", "final_state.json"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, dest / name)
        raw = run_dir / "raw.csv"
        if raw.exists():
            data = gzip.compress(raw.read_bytes())
            if len(data) <= RAW_GZ_LIMIT:
                (dest / "raw.csv.gz").write_bytes(data)
        if not (run_dir / "summary.json").exists():
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        final = json.loads((run_dir / "final_state.json").read_text()) if (run_dir / "final_state.json").exists() else {}
        durations = {p["label"]: p["duration_s"] for p in summary.get("phases", [])}
        for system, block in sorted(summary.get("systems", {}).items()):
            phases = block.get("phases", {})
            for label, ph in phases.items():
                rows.append({
                    "scenario": scenario, "system": system, "phase": label,
                    "phase_type": ph.get("phase_type"), "duration_s": durations.get(label),
                    "enqueue_rate_median": ph.get("median_enqueue_rate_per_s"),
                    "completion_rate_median": ph.get("median_throughput_per_s"),
                    "completion_rate_min": m(ph, "completion_rate", "peak") and min_completion(run_dir, system, label),
                    "claim_p50_ms_median": m(ph, "claim_p50_ms"),
                    "claim_p99_ms_median": ph.get("median_claim_p99_ms"),
                    "claim_p99_ms_peak": m(ph, "claim_p99_ms", "peak"),
                    "queue_depth_median": ph.get("median_queue_depth"),
                    "queue_depth_peak": m(ph, "queue_depth", "peak"),
                    "dead_tup_peak": ph.get("peak_dead_tup"),
                    "dead_tup_median": ph.get("median_dead_tup"),
                    "autovacuum_count_delta": ph.get("autovacuum_count_delta"),
                    "jobs_lost_estimate": ph.get("jobs_lost"),
                    "chaos_recovery_time_s": ph.get("chaos_recovery_time_s"),
                    "recovery_to_baseline_s": ph.get("recovery_to_baseline_s"),
                })
            key, after = KEY_PHASE.get(scenario, (None, None))
            kp = phases.get(key or "", {})
            ap = phases.get(after or "", {})
            bp = phases.get(BASELINE.get(scenario, "baseline"), {})
            # Only oncely's count is a job-state count; see native.py on awa's.
            states = (final.get(system) or {}).get("jobs_by_state") if system.startswith("oncely") else None
            table.append([
                scenario, system,
                fmt(bp.get("median_throughput_per_s")),
                fmt(kp.get("median_enqueue_rate_per_s")),
                fmt(kp.get("median_throughput_per_s")),
                fmt(m(kp, "claim_p50_ms")), fmt(kp.get("median_claim_p99_ms")), fmt(m(kp, "claim_p99_ms", "peak")),
                fmt(m(kp, "queue_depth", "peak"), 0),
                fmt(kp.get("peak_dead_tup"), 0),
                fmt(ap.get("median_throughput_per_s")) if ap else "–",
                fmt(ap.get("peak_dead_tup"), 0) if ap else "–",
                fmt(ap.get("jobs_lost"), 0) if ap else "–",
                fmt(ap.get("chaos_recovery_time_s"), 0) if ap else "–",
                ", ".join(f"{k} {v}" for k, v in sorted(states.items())) if states else "–",
            ])
    with (RES / "phases.csv").open("w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    head = ["scenario", "system", "baseline jobs/s", "stress: enqueued/s", "stress: completed/s",
            "stress: claim p50 ms", "stress: claim p99 ms (median)", "stress: claim p99 ms (peak)",
            "stress: peak depth", "stress: peak dead tuples", "after: completed/s", "after: peak dead tuples",
            "after: jobs_lost (harness)", "after: recovery s", "jobs left in DB at stop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    (RES / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def min_completion(run_dir: Path, system: str, label: str):
    """Lowest completion_rate sample of a phase (a stall shows here, not in the median)."""
    lowest = None
    with (run_dir / "raw.csv").open() as fh:
        for r in csv.DictReader(fh):
            if r.get("system") == system and r.get("phase_label") == label and r.get("metric") == "completion_rate" \
                    and r.get("subject_kind") == "adapter":
                v = float(r["value"])
                lowest = v if lowest is None else min(lowest, v)
    return lowest


if __name__ == "__main__":
    main()
