"""`ray job submit`, exactly as a user runs it from a checkout, for the tests that use a
Ray cluster of its own (the rehearsal's head, the hosts in network namespaces)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO

RAY = str(REPO / ".venv" / "bin" / "ray")


def submit_no_wait(address: str, *entrypoint: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    """Submit and return the job's id. ``env`` adds to this process's environment (e.g. a token)."""
    out = subprocess.run([RAY, "job", "submit", "--address", address, "--no-wait", "--working-dir", ".",
                          "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint],
                         cwd=cwd, check=True, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})}).stdout
    return next(w.strip("'") for w in out.split() if w.strip("'").startswith("raysubmit_"))


def wait_for_job(address: str, job_id: str, timeout: float = 600,
                 headers: dict[str, str] | None = None) -> tuple[str, str]:
    """The job's final status and its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address, headers=headers)
    deadline = time.time() + timeout
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job_id} still running after {timeout}s"
        time.sleep(2)
    return str(client.get_job_status(job_id).value), client.get_job_logs(job_id)


def submit(address: str, *entrypoint: str, timeout: float = 600, cwd: Path = REPO) -> tuple[str, str]:
    """Submit, wait; returns (final status, logs)."""
    return wait_for_job(address, submit_no_wait(address, *entrypoint, cwd=cwd), timeout=timeout)
