"""`ray job submit` for real: a local Ray head with its job server and a second raylet,
stages submitted with the project's runtime_env, outputs checked on the local S3."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mint_ray import storage
from mint_ray.config import build_config
from mint_ray.data import synth
from mint_ray.tasks import TISSUE_TYPES
from mint_ray.teachers import save_teacher_dir
from mint_ray.teachers.clip import ClipSettings, build_tiny_clip
from tests.conftest import LOCAL, REPO, free_port

pytestmark = pytest.mark.slow
RAY = str(REPO / ".venv" / "bin" / "ray")


@pytest.fixture(scope="module")
def ray_cluster(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head (2 CPUs, job server on 127.0.0.1) and a second node (1 CPU); yields the job server URL."""
    state = tmp_path_factory.mktemp("ray")
    gcs, dashboard = free_port(), free_port()
    try:
        subprocess.run([str(LOCAL / "ray_head.sh"), "start", str(state), str(gcs), str(dashboard), "2", "1800"],
                       check=True, timeout=300)
        subprocess.run([str(LOCAL / "ray_head.sh"), "add-node", str(state), "w1", str(gcs), "1", "1800"],
                       check=True, timeout=60)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(LOCAL / "ray_head.sh"), "stop", str(state)], check=False, timeout=120)


def submit(address: str, *entrypoint: str, timeout: float = 600, cwd: Path = REPO) -> tuple[str, str]:
    """`ray job submit` exactly as a user runs it from the checkout ``cwd``; returns (final status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = subprocess.run([RAY, "job", "submit", "--address", address, "--no-wait", "--working-dir", ".",
                          "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint],
                         cwd=cwd, check=True, capture_output=True, text=True, timeout=120).stdout
    job_id = next(w.strip("'") for w in out.split() if w.strip("'").startswith("raysubmit_"))
    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still running after {timeout}s"
        time.sleep(2)
    return str(client.get_job_status(job_id).value), client.get_job_logs(job_id)


@pytest.fixture(scope="module")
def inputs(s3_env: dict[str, str]) -> dict[str, str]:
    from tests.conftest import make_bucket

    bucket = f"s3://{make_bucket('jobs')}"
    cohort = f"{bucket}/cohorts/tissue_type"
    synth.run(build_config(synth.Config, {"task": "tissue_type", "output_uri": cohort, "image_size": 32,
                                          "sizes": {"n_samples": 40}, "tracking": {"enabled": False}}))
    teacher = f"{bucket}/teachers/tissue_type"
    save_teacher_dir(build_tiny_clip(ClipSettings(vocab_size=300, hidden_size=32, intermediate_size=64, layers=1,
                                                  projection_dim=32, image_size=32, patch_size=8),
                                     name="job-test", task="tissue_type", labels=list(TISSUE_TYPES)), teacher)
    return {"bucket": bucket, "cohort": cohort, "teacher": teacher, "pairs": f"{bucket}/preferences/tissue_type"}


def test_preference_build_then_training_submitted_as_jobs(ray_cluster: str, inputs: dict[str, str]) -> None:
    status, logs = submit(ray_cluster, "python", "jobs/build_preferences.py", "--config",
                          "jobs/recipes/preferences_tissue.yaml", "--set", f"cohort_uri={inputs['cohort']}",
                          "--set", f"teacher.uri={inputs['teacher']}", "--set", f"output_uri={inputs['pairs']}",
                          "--set", "teacher.num_actors=1", "--set", "tracking.enabled=false")
    assert status == "SUCCEEDED", logs[-3000:]
    manifest = storage.read_manifest(inputs["pairs"])
    assert manifest is not None and manifest.num_rows > 0
    assert manifest.meta["task"] == "tissue_type" and manifest.meta["teacher"]["name"] == "job-test"

    student = f"{inputs['bucket']}/students/job"
    status, logs = submit(ray_cluster, "python", "jobs/train_student.py", "--config",
                          "jobs/recipes/train_vision_orpo_local.yaml", "--set", f"data.uri={inputs['pairs']}",
                          "--set", f"output_uri={student}", "--set", "optim.max_steps=2",
                          "--set", "tracking.enabled=false", "--set", "model.tiny.vocab_size=400")
    assert status == "SUCCEEDED", logs[-3000:]
    assert storage.exists(f"{student}/model/config.json")
    assert storage.exists(f"{student}/model/mint_model.json")


def test_broken_recipe_fails_with_the_config_error(ray_cluster: str) -> None:
    status, logs = submit(ray_cluster, "python", "jobs/train_student.py", "--config",
                          "jobs/recipes/train_text_orpo_local.yaml", "--set", "optim.lrr=0.1", timeout=180)
    assert status == "FAILED"
    assert "unknown key 'optim.lrr'; allowed here:" in logs
