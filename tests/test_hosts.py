"""Ray nodes as real hosts on this machine (``infra/local/hosts.sh``; root): network
namespaces on a bridge, each node with its own IP, its own private /tmp and so its own
node-local model cache; S3 (Ceph) and MLflow on the bridge's address; jobs submitted from
this host with ``ray job submit`` and the cluster's token. Then faults between them, each
with nothing lost:

- the S3 route goes down while the preference build writes: the job fails with a clear
  error, the previous dataset stays whole and readable, and a re-run succeeds;
- loss and a rate cap on every link (and delay, where the kernel has netem): training completes;
- a worker node's link goes down mid-training: Ray Train restarts the group from the
  latest checkpoint on S3 once the node is back, and the run ends at the planned step.

Each fault prints a ``[faults]`` line with its timings (benchmarks/results/faults.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyarrow import fs as pafs

from mint_ray import storage
from mint_ray.model_folders import publish_dir
from mint_ray.preferences.plan import catalog_names
from tests.conftest import LOCAL, environment, exports, make_bucket
from tests.prefbuild import synth_cohort, tiny_teacher
from tests.prefdata import write_text_prefs
from tests.ray_jobs import submit_no_wait, wait_for_job
from tests.tinymodels import make_student_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500),
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")]

HOSTS = str(LOCAL / "hosts.sh")
LIFETIME_S = 1800
# Two CPU workers, one per node, on the tiny student: what crosses the bridge is real
# (ZeRO-3 collectives, S3 reads, checkpoints), the compute is small.
TRAIN = ["--config", "jobs/recipes/train_text_orpo_local.yaml", "--set", "scaling.num_workers=2",
         "--set", "scaling.placement_strategy=STRICT_SPREAD", "--set", "optim.micro_batch_size=1",
         "--set", "optim.warmup_ratio=0", "--set", "log_every_n_steps=1", "--set", "model.lora.r=8",
         "--set", "model.lora.alpha=16", "--set", "registry.enabled=false"]

# Infrastructure lines a user should not see by default (mint_ray.console's rules).
NOISE = ("Failed to query Ray Train Controller actor state", "reduce_scatter_tensor is deprecated",
         "Checkpoint successfully created", "Reporting training result", "[DeepSpeed]", "DeepSpeed info",
         "Loading extension module", "INFO worker.py", " INFO ray", "built successfully",
         "before it has started")


@dataclass
class Hosts:
    state: Path
    env: dict[str, str]  # AWS_*, MLFLOW_TRACKING_URI, RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN
    bucket: str

    @property
    def address(self) -> str:
        return self.env["RAY_ADDRESS"]

    def node_tmp(self, node: int) -> Path:
        """The node's private /tmp, as this host sees it."""
        return self.state / f"node-{node}" / "tmp"

    def cache_entries(self, node: int) -> list[Path]:
        """The complete entries of the node's model cache (``model_folders.cached``)."""
        return [p.parent for p in (self.node_tmp(node) / "mint-ray-cache").glob("*/*/.complete")]

    def script(self, command: str, *args: str) -> None:
        subprocess.run([HOSTS, command, str(self.state), *args], check=True, timeout=120)

    def run(self, *entrypoint: str) -> str:
        return submit_no_wait(self.address, *entrypoint,
                              env={k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})

    def wait(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        return wait_for_job(self.address, job_id, timeout, self.auth())

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.env['RAY_AUTH_TOKEN']}"}

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the head knows, alive or dead (its state API)."""
        request = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=1000", headers=self.auth())
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    state = tmp_path_factory.mktemp("hosts")
    try:
        subprocess.run([HOSTS, "start", str(state), "2", str(LIFETIME_S)], check=True, timeout=600)
        env = exports(subprocess.run([HOSTS, "env", str(state)], check=True, capture_output=True,
                                     text=True).stdout)
        # This process writes inputs and reads results on the cluster's S3, as a person would.
        with environment({k: v for k, v in env.items() if k.startswith("AWS_")}):
            yield Hosts(state, env, f"s3://{make_bucket('hosts')}")
    finally:
        subprocess.run([HOSTS, "stop", str(state)], check=False, timeout=300)


def _until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)
    return value


def test_the_job_server_refuses_a_wrong_token(hosts: Hosts) -> None:
    for headers in ({}, hosts.auth("not-the-token")):
        request = urllib.request.Request(f"{hosts.address}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403)
    with pytest.raises(subprocess.CalledProcessError) as failed:
        submit_no_wait(hosts.address, "python", "-c", "print('never runs')",
                       env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
    assert "authentication token is invalid" in failed.value.stderr
    assert sorted(n["node_ip"] for n in hosts.nodes() if n["state"] == "ALIVE") == [
        f"{hosts.env['MINT_HOSTS_SUBNET']}.{10 + k}" for k in range(2)]


def test_an_s3_outage_while_the_preferences_are_written_loses_nothing(hosts: Hosts) -> None:
    cohort = synth_cohort(hosts.bucket, "rare_disease", 160)
    table = storage.read_dataset(cohort)
    teacher = tiny_teacher(hosts.bucket, "rare_disease", catalog_names(storage.read_manifest(cohort).meta),
                           table.column("note").to_pylist())
    out = f"{hosts.bucket}/preferences/rare_disease"
    # Small files: the write goes on long enough to be cut in the middle.
    build = ["python", "jobs/build_preferences.py", "--config", "jobs/recipes/preferences_rare_disease.yaml",
             *(a for o in [f"cohort_uri={cohort}", f"teacher.uri={teacher}", f"output_uri={out}",
                           f"storage.root={hosts.bucket}/runs", "teacher.batch_size=8", "block_rows=8",
                           "rows_per_file=4", "storage.overwrite=true"] for a in ("--set", o))]
    status, logs = hosts.wait(hosts.run(*build))
    assert status == "SUCCEEDED", logs[-3000:]
    before = storage.read_manifest(out)
    rows_before = storage.read_dataset(out).num_rows
    assert rows_before == 160

    # The re-run: cut S3 as soon as its first new file lands.
    job = hosts.run(*build)
    started = time.time()
    fs, path = storage.filesystem(out)
    published = {f[len("s3://"):] for f in before.files}

    def new_file() -> bool:
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return any(i.type == pafs.FileType.File and "/v-" in i.path and i.path not in published for i in listed)

    _until(new_file, 300, "the re-run's first file")
    cut = time.time()
    hosts.script("s3", "down")
    try:
        status, logs = hosts.wait(job)
        failed = time.time()
    finally:
        hosts.script("s3", "up")
    assert status == "FAILED", logs[-3000:]
    # One line says what failed and what to check, without Ray's task header around it.
    final = [line for line in logs.splitlines() if line.startswith("mint-ray: error:")]
    assert final, logs[-3000:]
    assert f"cannot reach the S3 endpoint {hosts.env['AWS_ENDPOINT_URL']}" in final[-1] and "ray::" not in final[-1]
    # The published dataset is still the first run's, whole.
    assert storage.read_manifest(out).files == before.files
    assert storage.read_dataset(out).num_rows == rows_before
    status, logs = hosts.wait(hosts.run(*build))
    assert status == "SUCCEEDED", logs[-3000:]
    assert storage.read_manifest(out).files != before.files and storage.read_dataset(out).num_rows == 160
    print(f"[faults] s3 down mid-write: cut {cut - started:.1f}s into the re-run, job failed "
          f"{failed - cut:.1f}s later; published rows {rows_before} before and after; re-run succeeded")


def test_training_completes_on_lossy_capped_links(hosts: Hosts) -> None:
    data = f"{hosts.bucket}/prefs-impaired"
    write_text_prefs(data, 16)
    hosts.script("impair", "50", "2", "20")  # 50 ms (where netem exists), 2% loss, 20 Mbit/s
    try:
        t0 = time.time()
        status, logs = hosts.wait(hosts.run(
            "python", "jobs/train_student.py", *TRAIN, "--set", f"data.uri={data}",
            "--set", f"storage.root={hosts.bucket}/runs", "--set", f"output_uri={hosts.bucket}/impaired",
            "--set", "optim.max_steps=4", "--set", "tracking.enabled=false"))
    finally:
        hosts.script("impair", "0", "0", "0")
    assert status == "SUCCEEDED", logs[-3000:]
    assert storage.exists(f"{hosts.bucket}/impaired/model/config.json")
    # What the person who submitted it reads: progress, the closing summary, no noise.
    console = logs.split("Running entrypoint", 1)[1]
    assert "[train] orpo 4/4 loss" in console and "mint-ray train: done" in console
    assert f"model_uri: {hosts.bucket}/impaired/model" in console
    assert [n for n in NOISE if n in console] == [], console[-5000:]
    print(f"[faults] 2% loss + 20 Mbit/s on every link: 4 steps on 2 nodes in {time.time() - t0:.0f}s")


def test_a_node_link_down_mid_training_resumes_from_s3(hosts: Hosts, tmp_path: Path) -> None:
    data, base, out = (f"{hosts.bucket}/{p}" for p in ("prefs", "models/tiny-student", "student"))
    write_text_prefs(data, 48)
    publish_dir(make_student_dir(tmp_path / "base"), base)
    cached_before = {node: set(hosts.cache_entries(node)) for node in (0, 1)}
    job = hosts.run("python", "jobs/train_student.py", *TRAIN, "--set", f"data.uri={data}",
                    "--set", "model.tiny=null", "--set", f"model.path={base}",
                    "--set", f"storage.root={hosts.bucket}/runs", "--set", f"output_uri={out}",
                    "--set", "checkpoint.every_n_steps=4", "--set", "checkpoint.max_failures=3",
                    "--summary-file", "/tmp/train-summary.json")
    snapshot = f"{out}/checkpoints/checkpoint_manager_snapshot.json"

    def has_checkpoint() -> bool:
        return storage.exists(snapshot) and bool(json.loads(storage.read_bytes(snapshot)).get("checkpoint_results"))

    started = time.time()
    _until(has_checkpoint, 300, "the first checkpoint on S3", every=0.5)
    worker = next(n for n in hosts.nodes() if n["state"] == "ALIVE" and not n["is_head_node"])
    down = time.time()
    hosts.script("link", "1", "down")
    try:
        _until(lambda: any(n["node_id"] == worker["node_id"] and n["state"] == "DEAD" for n in hosts.nodes()),
               120, "the head to mark node 1 dead", every=0.5)
        dead = time.time()
    finally:
        hosts.script("link", "1", "up")
    back = _until(lambda: [n for n in hosts.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]],
                  120, "node 1 to rejoin", every=0.5)
    rejoined = time.time()
    status, logs = hosts.wait(job)
    finished = time.time()
    assert status == "SUCCEEDED", logs[-4000:]
    summary = json.loads((hosts.node_tmp(0) / "train-summary.json").read_text())
    training = summary["training"]
    assert training["steps"] == 24 and 0 < training["resumed_from_step"] < 24
    assert set(training["node_ids"]) == {next(n for n in hosts.nodes() if n["is_head_node"])["node_id"],
                                         back[0]["node_id"]}
    assert summary["checkpoint"].startswith(hosts.bucket[len("s3://"):])
    # The loss curve continues where it stopped: the resumed attempt logs the steps after the
    # checkpoint, every step is there, and the last one is the planned one.
    import mlflow

    history = mlflow.MlflowClient(hosts.env["MLFLOW_TRACKING_URI"]).get_metric_history(
        summary["mlflow_run_id"], "loss")
    logged = sorted(history, key=lambda m: m.timestamp)
    steps = [m.step for m in logged]
    resumed_at = training["resumed_from_step"]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == resumed_at + 1 and steps[-1] == 24
    assert sorted(set(steps)) == list(range(1, 25))
    # Steps run again after the restart give the losses they gave the first time: the
    # weights and the optimizer state came back from the checkpoint.
    first = {m.step: m.value for m in logged[:restart]}
    again = [(first[m.step], m.value) for m in logged[restart:] if m.step in first]
    assert again and all(abs(a - b) < 0.02 * abs(a) for a, b in again), again
    # Each node downloaded the base once into its own /tmp, and node 1 kept its copy across
    # the outage (its /tmp outlived its raylet).
    for node in (0, 1):
        (entry,) = set(hosts.cache_entries(node)) - cached_before[node]
        if node == 1:
            assert (entry / ".complete").stat().st_mtime < down
    print(f"[faults] node 1 link down at step ~{steps[restart - 1]} ({down - started:.0f}s in): marked dead "
          f"{dead - down:.1f}s later, rejoined {rejoined - dead:.1f}s after the link came back, resumed from "
          f"step {resumed_at}, finished {finished - rejoined:.0f}s later; steps 24/24")
