"""Attaching to Ray and placing work: the one place that decides where things run.

``init_ray`` joins the cluster named by the config (or ``RAY_ADDRESS``, as under
``ray job submit``) or starts an in-process one sized for this machine.
"""

from __future__ import annotations

import os

from mint_ray import console
from mint_ray.config import RayConfig

# Every Ray worker process of mint-ray runs this first (runtime_env
# ``worker_process_setup_hook``; cluster/runtime_env.yaml names it too).
WORKER_SETUP_HOOK = "mint_ray.ray_cluster.setup_worker"
CONSOLE_ENV_KEYS = (console.LOG_LEVEL_ENV, console.PROGRESS_ENV, console.MLFLOW_LEVEL_ENV)
# Env vars the workers of an in-process cluster need: DeepSpeed on CPU hosts,
# and S3 clients that work with Ceph/MinIO-style gateways (see filesystems.py).
# Credentials are not passed here: workers inherit them from the raylet's
# environment (local) or from the node's cloud role (clusters), so they never
# sit in a runtime_env.
WORKER_ENV_KEYS = ("DS_ACCELERATOR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                   "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
                   "MLFLOW_TRACKING_URI", "TORCH_EXTENSIONS_DIR",
                   # The console's rules (mint_ray.console): log level, bars or lines.
                   *CONSOLE_ENV_KEYS)


def worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if os.environ.get(k)}


def console_env() -> dict[str, str]:
    return {k: os.environ[k] for k in CONSOLE_ENV_KEYS if os.environ.get(k)}


def interface_of(ip: str) -> str | None:
    """The name of this host's network interface that holds ``ip``, or None."""
    import psutil

    return next((name for name, addresses in psutil.net_if_addrs().items()
                 if any(a.address == ip for a in addresses)), None)


def setup_worker() -> None:
    """A Ray worker process's first step: the console's rules, and gloo bound to the
    interface of the node's Ray address. Left alone, gloo takes the address the host
    name resolves to, often a loopback one (Debian's /etc/hosts maps it to 127.0.1.1),
    and ranks on other hosts are refused (``Gloo connectFullMesh failed ... 127.0.0.1``).
    A ``GLOO_SOCKET_IFNAME`` that is already set is kept."""
    console.quiet_process()
    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        import ray

        name = interface_of(ray.util.get_node_ip_address())
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name


def init_ray(cfg: RayConfig) -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only local clusters
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

        # An existing cluster: its nodes' environment reaches every worker. Under `ray job
        # submit` the job's runtime_env (cluster/runtime_env.yaml, which names
        # WORKER_SETUP_HOOK) does too, and repeating any of its keys here would make
        # ray.init fail; a driver attached by hand brings the console's rules itself.
        under_job = RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ
        ray.init(address=address, log_to_driver=True, logging_level=console.ray_log_level(),
                 runtime_env=None if under_job else {"worker_process_setup_hook": WORKER_SETUP_HOOK,
                                                     "env_vars": console_env()})
    else:
        # address="local": start a new in-process cluster, never attach to another
        # `ray start` cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(),
                 object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
                 include_dashboard=False, log_to_driver=True, logging_level=console.ray_log_level(),
                 # Every worker applies the console's logging rules as it starts.
                 runtime_env={"env_vars": worker_env(), "worker_process_setup_hook": WORKER_SETUP_HOOK})
    console.quiet_process()  # importing Ray set its loggers back to INFO in this process
