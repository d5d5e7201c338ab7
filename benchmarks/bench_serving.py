"""Serving load and fault test on 127.0.0.1: batching off vs on, then a replica killed
mid-run. Prints a markdown table; asserts the contract (zero 5xx, every malformed
request a 4xx, every good one answered) and exits non-zero when it is broken.

    .venv/bin/python benchmarks/bench_serving.py                       # 16 clients x 25 requests
    .venv/bin/python benchmarks/bench_serving.py --clients 8 --requests 10 --kill-seconds 0

The model is an untrained tiny rare-disease student (``tests/tinymodels.py``),
registered in a throwaway MLflow registry (SQLite + local artifacts) and served as
``models:/bench-text@champion`` through ``mint_ray.serving`` exactly as in
production. Every good request generates ``--max-new-tokens`` tokens (an untrained
model rarely stops early), so requests cost the same in both runs.

Figures:
- load runs: ``--clients`` concurrent clients (one asyncio loop, httpx), each sending
  ``--requests`` requests back to back; every 10th is malformed (bad JSON, wrong types,
  unknown or wrong task, missing or over-long note) and must get a 4xx. p50/p99 are
  over the good requests; requests/s = all requests / wall time of the run.
  Batching off is ``max_batch_size: 1``; on is ``--batch-size`` with
  ``--batch-wait-s``. Switching is a live ``user_config`` change (no restart).
- kill run: 2 replicas, batching on, clients sending for ``--kill-seconds``; one replica
  actor is killed with ``ray.kill`` after a third of it. Reported: requests that failed
  (non-2xx or connection error), the window in which they failed, and the seconds until
  Serve had 2 running replicas again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tinymodels

APP = "bench"
NOTES = [
    "Tall stature, arachnodactyly, ectopia lentis and aortic root dilatation.",
    "Developmental delay, seizures, hypotonia and microcephaly noted in infancy.",
    "Short stature, brachydactyly and hearing loss; parents are consanguineous.",
    "Recurrent fractures, blue sclerae and joint hypermobility since childhood.",
]
# (kind, request kwargs): every one must be answered with a 4xx.
MALFORMED: list[tuple[str, dict[str, Any]]] = [
    ("malformed-json", {"content": b'{"task": "rare_disease", "note": ',
                        "headers": {"content-type": "application/json"}}),
    ("note-not-a-string", {"json": {"task": "rare_disease", "note": 7}}),
    ("unknown-task", {"json": {"task": "cardiology", "note": NOTES[0]}}),
    ("wrong-task", {"json": {"task": "tissue_type", "image": "iVBORw0KGgo="}}),
    ("missing-note", {"json": {"task": "rare_disease"}}),
    ("note-too-long", {"json": {"task": "rare_disease", "note": "x" * 30_000}}),
    ("top-k-a-string", {"json": {"task": "rare_disease", "note": NOTES[1], "top_k": "3"}}),
]


@dataclass
class Outcome:
    started: float
    latency_s: float
    status: int  # 0: no HTTP answer (connection error)
    malformed: bool
    version: str | None = None


@dataclass
class RunStats:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def good(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.malformed]

    def row(self) -> dict[str, Any]:
        good = self.good()
        bad = [o for o in self.outcomes if o.malformed]
        ok = [o.latency_s for o in good if o.status == 200]
        pct = np.percentile(ok, [50, 99]) * 1000 if ok else [float("nan")] * 2
        return {"run": self.name, "requests": len(self.outcomes), "good_answered": f"{len(ok)}/{len(good)}",
                "malformed_4xx": f"{sum(400 <= o.status < 500 for o in bad)}/{len(bad)}",
                "5xx": sum(o.status >= 500 for o in self.outcomes),
                "no_answer": sum(o.status == 0 for o in self.outcomes),
                "p50_ms": round(float(pct[0]), 1), "p99_ms": round(float(pct[1]), 1),
                "req_per_s": round(len(self.outcomes) / self.wall_s, 1) if self.wall_s else 0.0}


async def one_request(client: httpx.AsyncClient, i: int, malformed_every: int) -> Outcome:
    malformed = malformed_every > 0 and i % malformed_every == malformed_every - 1
    kwargs = MALFORMED[(i // max(malformed_every, 1)) % len(MALFORMED)][1] if malformed else \
        {"json": {"task": "rare_disease", "note": NOTES[i % len(NOTES)]}}
    started = time.perf_counter()
    try:
        resp = await client.post("/v1/predict", **kwargs)
    except httpx.HTTPError:
        return Outcome(started, time.perf_counter() - started, 0, malformed)
    version = resp.json().get("model", {}).get("version") if resp.status_code == 200 else None
    return Outcome(started, time.perf_counter() - started, resp.status_code, malformed, version)


async def load(base: str, clients: int, per_client: int | None, until: float | None,
               malformed_every: int) -> list[Outcome]:
    """``clients`` loops sending back to back: ``per_client`` requests each, or until ``until``."""
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def worker(c: int) -> None:
            n = 0
            while (per_client is not None and n < per_client) or (until is not None and time.perf_counter() < until):
                outcomes.append(await one_request(client, c * 100_003 + n, malformed_every))
                n += 1

        await asyncio.gather(*(worker(c) for c in range(clients)))
    return outcomes


def run_load(name: str, base: str, clients: int, per_client: int, malformed_every: int) -> RunStats:
    started = time.perf_counter()
    outcomes = asyncio.run(load(base, clients, per_client, None, malformed_every))
    return RunStats(name, outcomes, time.perf_counter() - started)


def redeploy(cfg: Any) -> None:
    from ray import serve

    from mint_ray.serving.app import build_app

    serve.run(build_app(cfg), name=APP, route_prefix="/")


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["MintStudent"]
    return int(status.replica_states.get("RUNNING", 0))


def replica_actor_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#")]


def kill_run(base: str, clients: int, seconds: float, malformed_every: int) -> tuple[RunStats, dict[str, Any]]:
    """Load for ``seconds``; kill one of the 2 replicas after a third of it."""
    import ray

    fault: dict[str, Any] = {}

    def killer(t0: float) -> None:
        time.sleep(seconds / 3)
        before = set(replica_actor_names())
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        fault["killed_at"] = round(time.perf_counter() - t0, 1)
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            # A replica the controller started after the kill, and 2 running again.
            if set(replica_actor_names()) - before and running_replicas() >= 2:
                fault["replaced_after_s"] = round(time.perf_counter() - t0 - fault["killed_at"], 1)
                return
            time.sleep(0.25)

    t0 = time.perf_counter()
    thread = threading.Thread(target=killer, args=(t0,))
    thread.start()
    outcomes = asyncio.run(load(base, clients, None, t0 + seconds, malformed_every))
    wall = time.perf_counter() - t0
    thread.join()
    failed = [o for o in outcomes if not o.malformed and o.status != 200]
    fault["failed_good_requests"] = len(failed)
    if failed:
        fault["failure_window_s"] = (round(min(o.started for o in failed) - t0, 1),
                                     round(max(o.started + o.latency_s for o in failed) - t0, 1))
        fault["failure_statuses"] = sorted({o.status for o in failed})
    return RunStats("batching on, 2 replicas, 1 killed", outcomes, wall), fault


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="requests per client in each load run")
    parser.add_argument("--malformed-every", type=int, default=10, help="every Nth request is malformed (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens per answer; 10 quoted disease names take about 100-150")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-s", type=float, default=0.1)
    parser.add_argument("--kill-seconds", type=float, default=30, help="0 skips the replica kill run")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import mlflow
    import ray
    from mlflow import MlflowClient
    from ray import serve

    from mint_ray.registry import log_student
    from mint_ray.serving.config import DeploymentConfig, RequestBatchingConfig, ServeConfig
    from tests.tinymodels import make_student_dir

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tracking = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(tracking)
        mlflow.set_experiment("bench-serving")
        with mlflow.start_run():
            version = log_student(make_student_dir(Path(tmp) / "student", "rare_disease"), "bench-text", {})["version"]
        MlflowClient().set_registered_model_alias("bench-text", "champion", version)

        ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(model_uri="models:/bench-text@champion", task="rare_disease", tracking_uri=tracking,
                          max_new_tokens=args.max_new_tokens, batching=RequestBatchingConfig(max_batch_size=1),
                          deployment=DeploymentConfig(num_cpus=0.5, max_ongoing_requests=2 * args.batch_size))
        rows: list[dict[str, Any]] = []
        fault: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            redeploy(cfg)
            print(f"[bench] serving up in {time.perf_counter() - t0:.1f}s at {base}", flush=True)
            asyncio.run(load(base, 2, 3, None, 0))  # warm-up
            rows.append(run_load("batching off", base, args.clients, args.requests, args.malformed_every).row())
            print(f"[bench] {rows[-1]}", flush=True)
            batched = cfg.model_copy(update={"batching": cfg.batching.model_copy(update={
                "max_batch_size": args.batch_size, "batch_wait_timeout_s": args.batch_wait_s})})
            redeploy(batched)
            asyncio.run(load(base, 2, 3, None, 0))
            rows.append(run_load(f"batching on ({args.batch_size})", base, args.clients, args.requests,
                                 args.malformed_every).row())
            print(f"[bench] {rows[-1]}", flush=True)
            if args.kill_seconds > 0:
                redeploy(batched.model_copy(update={"deployment": batched.deployment.model_copy(
                    update={"num_replicas": 2})}))
                stats, fault = kill_run(base, args.clients, args.kill_seconds, args.malformed_every)
                rows.append(stats.row())
                print(f"[bench] {rows[-1]} {fault}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"\n{args.clients} clients, {args.max_new_tokens} new tokens per answer, 1 in "
          f"{args.malformed_every} requests malformed\n")
    print(markdown(rows))
    speedup = rows[1]["req_per_s"] / rows[0]["req_per_s"]
    print(f"\nbatching on / off requests/s: {speedup:.2f}x")
    if fault:
        print(f"replica kill: {fault}")
    load_rows = rows[:2]
    broken = [r["run"] for r in load_rows if r["5xx"] or r["no_answer"]
              or r["good_answered"].split("/")[0] != r["good_answered"].split("/")[1]
              or r["malformed_4xx"].split("/")[0] != r["malformed_4xx"].split("/")[1]]
    if broken:
        print(f"CONTRACT BROKEN in: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
