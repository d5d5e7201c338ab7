"""Attaching to Ray and placing work: the one place that decides where things run.

``init_ray`` joins the cluster named by the config (or ``RAY_ADDRESS``, as under
``ray job submit``) or starts an in-process one sized for this machine.
"""

from __future__ import annotations

import os

from mint_ray.config import RayConfig

# Env vars the workers of an in-process cluster need: DeepSpeed on CPU hosts,
# and S3 clients that work with Ceph/MinIO-style gateways (see storage.py).
# Credentials are not passed here: workers inherit them from the raylet's
# environment (local) or from the node's cloud role (clusters), so they never
# sit in a runtime_env.
WORKER_ENV_KEYS = ("DS_ACCELERATOR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                   "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
                   "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR")


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if os.environ.get(k)}


def init_ray(cfg: RayConfig) -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only local clusters
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # An existing cluster: its nodes' environment and the job's runtime_env
        # (cluster/runtime_env.yaml) reach every worker; repeating env vars here
        # would conflict with the job's and make ray.init fail.
        ray.init(address=address, log_to_driver=True)
        return
    # address="local": start a new in-process cluster, never attach to another
    # `ray start` cluster that happens to run on this machine.
    ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(),
             object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
             include_dashboard=False, runtime_env={"env_vars": worker_env()}, log_to_driver=True)
