"""Run the postgresql-job-queue-benchmarking harness natively (no Docker).

The harness drives PostgreSQL through `docker compose` (start, stop -> fresh volume, the
postgres-restart chaos phase). This shim imports the harness unchanged and swaps only those
functions for a local cluster managed with pg_ctl, points the harness at that cluster's port,
and registers three native adapters: `oncely` (bench/harness/oncely-bench), `oncely-headclaim` (the
same binary with windowed claims off, see oncely-bench-headclaim/README.md) and `awa`
(bench/harness/awa-bench, the harness's awa adapter built against the published awa crates).

Usage: python native.py <harness checkout> run <bench.py run arguments...>
Env:   PGJQB_PORT (required), PGJQB_ROOT (cluster dir, default /tmp/pjqb-pg),
       PGJQB_PGBIN (default /usr/lib/postgresql/15/bin), PGJQB_RESULTS (results root),
       CARGO_TARGET_DIR (where oncely-bench was built; awa-bench in its `awa` subdirectory).
PostgreSQL's own commands run as user `postgres` when this runs as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(HARNESS))

import psycopg  # noqa: E402

from bench_harness import adapters, orchestrator  # noqa: E402

PORT = int(os.environ["PGJQB_PORT"])
ROOT = Path(os.environ.get("PGJQB_ROOT", "/tmp/pjqb-pg"))
PGBIN = Path(os.environ.get("PGJQB_PGBIN", "/usr/lib/postgresql/15/bin"))
DATA = ROOT / "data"
LOG = ROOT / "postgres.log"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", str(HERE.parent.parent / "target-harness")))

adapters.PG_PORT = PORT  # pg_url() reads it at call time


def _log(msg: str) -> None:
    print(f"[native] {msg}", file=sys.stderr, flush=True)


# PostgreSQL refuses to run as root: as root, its commands run as user `postgres`.
AS_PG = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(AS_PG + args, **kw)


def _initdb() -> None:
    if DATA.exists():
        shutil.rmtree(DATA)
    _pg(["mkdir", "-p", str(ROOT)], check=True)
    # Superuser `bench` like the compose file's POSTGRES_USER; trust auth on a loopback-only
    # throwaway cluster (the harness's URLs carry password `bench`, which trust ignores).
    _pg([str(PGBIN / "initdb"), "-D", str(DATA), "-U", "bench", "-A", "trust", "-E", "UTF8"],
        check=True, stdout=subprocess.DEVNULL)
    extra = (
        "\n# postgresql-job-queue-benchmarking postgres.conf, verbatim\n"
        "include 'bench-postgres.conf'\n"
        "# native run: loopback only, private port and socket directory\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {PORT}\n"
        f"unix_socket_directories = '{ROOT}'\n"
    )
    _pg(["cp", str(HARNESS / "postgres.conf"), str(DATA / "bench-postgres.conf")], check=True)
    _pg(["sh", "-c", f"cat >> '{DATA}/postgresql.conf'"], input=extra.encode(), check=True)


def _wait_ready(timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    last: Exception | None = None
    while time.time() < deadline:
        try:
            with psycopg.connect(adapters.pg_url("postgres"), autocommit=True, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.Error as exc:
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"postgres not ready on port {PORT}: {last}")


def _running() -> bool:
    r = _pg([str(PGBIN / "pg_ctl"), "-D", str(DATA), "status"], capture_output=True)
    return r.returncode == 0


def _pg_start() -> None:
    if not (DATA / "PG_VERSION").exists():
        _initdb()
    if not _running():
        _pg([str(PGBIN / "pg_ctl"), "-D", str(DATA), "-l", str(LOG), "-w", "-t", "120", "start"],
            check=True, stdout=subprocess.DEVNULL)
    _wait_ready()


def _pg_stop() -> None:
    # `docker compose stop` on the postgres image is SIGINT: a fast shutdown.
    if DATA.exists() and _running():
        _pg([str(PGBIN / "pg_ctl"), "-D", str(DATA), "-m", "fast", "-w", "-t", "120", "stop"],
            check=False, stdout=subprocess.DEVNULL)


def start_postgres(pg_image: str) -> None:
    _log(f"start postgres (native {PGBIN.parent.name}) on port {PORT}")
    _pg_start()


def stop_postgres(pg_image: str) -> None:
    # `docker compose down -v`: stop and drop the volume, so the next start is a fresh cluster.
    if os.environ.get("KEEP_DB"):
        return
    _log("stop postgres and drop the cluster")
    _pg_stop()
    if DATA.exists():
        shutil.rmtree(DATA)


def compose_stop(pg_image: str) -> None:
    _log("postgres-restart: stop (fast)")
    _pg_stop()


def compose_start(pg_image: str) -> None:
    _log("postgres-restart: start")
    _pg_start()


def _restart(pg_image: str) -> None:
    compose_stop(pg_image)
    compose_start(pg_image)


orchestrator.start_postgres = start_postgres
orchestrator.stop_postgres = stop_postgres
orchestrator._compose_stop_postgres = compose_stop
orchestrator._compose_start_postgres = compose_start
orchestrator._restart_postgres = _restart
if os.environ.get("PGJQB_RESULTS"):
    orchestrator.RESULTS_ROOT = Path(os.environ["PGJQB_RESULTS"])


def _prebuilt(target: Path, name: str, extra_env: dict | None = None):
    binary = target / "release" / name

    def build(skip: bool) -> None:
        # Built beforehand by run.sh (release, niced); here we only check it is there.
        if not binary.exists():
            raise RuntimeError(f"{binary} missing: build it first (see bench/harness/run.sh)")

    def launch(manifest, overrides):
        env = adapters._base_env(manifest, overrides)
        env.update(extra_env or {})
        return adapters.LaunchSpec(argv=[str(binary)], env=env)

    return build, launch


for system, bench_dir, target, binary, extra_env in (
    ("oncely", HERE / "oncely-bench", TARGET, "oncely-bench", {}),
    # The same binary claiming from the head of the index every time (oncely before windowed claims).
    ("oncely-headclaim", HERE / "oncely-bench-headclaim", TARGET, "oncely-bench", {"ONCELY_WINDOWED_CLAIMS": "0"}),
    # awa-bench builds in a nested target dir so both builds can run at once (separate locks).
    ("awa", HERE / "awa-bench", TARGET / "awa", "awa-bench", {}),
):
    build, launch = _prebuilt(target, binary, extra_env)
    adapters.ADAPTERS[system] = adapters.AdapterEntry(bench_dir=bench_dir, builder=build, launcher=launch)
orchestrator.ADAPTERS = adapters.ADAPTERS

# After each system's phases (its adapter stopped, its cluster not yet dropped), count the jobs
# left in the database by state, so "lost" can be told apart from "still queued".
FINAL_STATE_SQL = {
    "oncely": "SELECT state, count(*)::bigint FROM oncely.jobs GROUP BY state ORDER BY state",
    "oncely-headclaim": "SELECT state, count(*)::bigint FROM oncely.jobs GROUP BY state ORDER BY state",
    # Same shape as awa-bench's count_by_state (queue_storage tables of schema awa). NOT a job-state
    # count on awa 0.6.9: there ready_entries keeps claimed rows (a lane cursor marks them claimed)
    # and completions live in receipt batches, so its numbers are not reported (summarize.py).
    "awa": """
        SELECT state, sum(n)::bigint FROM (
            SELECT 'available' AS state, count(*) AS n FROM awa.ready_entries
            UNION ALL SELECT state::text, count(*) FROM awa.leases GROUP BY state
            UNION ALL SELECT 'running', count(*) FROM awa.lease_claims c
              WHERE c.materialized_at IS NULL
                AND NOT EXISTS (SELECT 1 FROM awa.lease_claim_closures x
                                WHERE x.job_id = c.job_id AND x.run_lease = c.run_lease)
                AND NOT EXISTS (SELECT 1 FROM awa.leases l
                                WHERE l.job_id = c.job_id AND l.run_lease = c.run_lease)
            UNION ALL SELECT state::text, count(*) FROM awa.deferred_jobs GROUP BY state
            UNION ALL SELECT state::text, count(*) FROM awa.done_entries GROUP BY state
            UNION ALL SELECT 'dlq', count(*) FROM awa.dlq_entries
        ) t GROUP BY state ORDER BY state""",
}
_RUN_DIR: list[Path] = []
_orig_new_run_dir = orchestrator._new_run_dir
_orig_run_one_system = orchestrator.run_one_system


def _new_run_dir(scenario):
    d = _orig_new_run_dir(scenario)
    _RUN_DIR.append(d)
    return d


def _run_one_system(system, **kw):
    desc = _orig_run_one_system(system, **kw)
    out: dict = {"system": system}
    try:
        manifest = adapters.AdapterManifest.load(adapters.ADAPTERS[system].bench_dir)
        with psycopg.connect(adapters.pg_url(manifest.db_name), autocommit=True) as conn:
            rows = conn.execute(FINAL_STATE_SQL[system]).fetchall()
        out["jobs_by_state"] = {str(k): int(v) for k, v in rows}
    except Exception as exc:  # report, never fail the run over it
        out["error"] = str(exc)
    _log(f"final job states: {out}")
    if _RUN_DIR:
        import json

        path = _RUN_DIR[-1] / "final_state.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[system] = out
        path.write_text(json.dumps(data, indent=2))
    return desc


orchestrator._new_run_dir = _new_run_dir
orchestrator.run_one_system = _run_one_system

if __name__ == "__main__":
    raise SystemExit(orchestrator.main(sys.argv[2:]))
