"""Serve a registered student over HTTP with Ray Serve (``mint-ray serve``).

One application serves one model (so one task): ``models:/<name>@<alias>``, a
pinned ``models:/<name>/<version>``, an ``s3://`` or a local student directory.
The driver checks the model and the API key first (``preflight``), so a
misconfigured application fails here, with the fix, instead of in replicas
that Serve keeps restarting.

Ctrl-C or SIGTERM stops what this command started and nothing else: its own
application is deleted (``stop``; Serve stops routing to it and its replicas
finish the requests in flight, for up to ``deployment.graceful_shutdown_timeout_s``),
other applications on the cluster and Serve itself keep running, and the command
exits 0. A second signal during that drain stops the command at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ray import serve

from mint_ray import storage
from mint_ray.config import RayConfig
from mint_ray.errors import MintError
from mint_ray.serving.app import build_app
from mint_ray.serving.config import Config, HttpConfig, ServeConfig
from mint_ray.serving.guard import read_api_key
from mint_ray.serving.loading import alias_version, parse_model_uri
from mint_ray.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

__all__ = ["CLI_FLAGS", "Config", "deploy", "preflight", "run", "stop"]

CLI_FLAGS = {"model-uri": "app.model_uri", "task": "app.task", "tracking-uri": "app.tracking_uri",
             "api-key-env": "app.api_key_env", "host": "http.host", "port": "http.port",
             "address": "ray.address"}


def preflight(cfg: ServeConfig) -> None:
    """Fail on the driver, with the fix, before Serve retries a replica that cannot start."""
    if cfg.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
    ref = parse_model_uri(cfg.model_uri)
    if ref.registered:
        if ref.alias:
            alias_version(ref)
        elif ref.version:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            try:
                MlflowClient().get_model_version(ref.name, ref.version)
            except MlflowException:
                raise MintError(f"{ref.uri}: the registry has no version {ref.version} of {ref.name!r}") from None
    elif not storage.is_s3(ref.uri) and not Path(ref.uri).is_dir():
        raise MintError(f"model_uri {ref.uri!r} is neither models:/..., s3:// nor a local directory")
    read_api_key(cfg)


def deploy(apps: dict[str, tuple[ServeConfig, str]], http: HttpConfig, ray_cfg: RayConfig | None = None,
           log_level: str = "INFO") -> str:
    """Start Serve (once per cluster) and run ``apps`` (name -> (config, route prefix));
    returns the base URL. Each call waits until its applications are RUNNING. ``log_level``:
    Serve's own lines and the access log (INFO for a server; a demo's few requests: WARNING)."""
    from mint_ray.ray_cluster import init_ray

    for cfg, _ in apps.values():
        preflight(cfg)
    # The proxy's header guard, for a cluster started here (an attached cluster's proxy
    # has the environment its nodes started with).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    init_ray(ray_cfg or RayConfig())
    logging_config = {"log_level": log_level}
    # This process's own Serve lines ("Started Serve", "... is ready at") too.
    logging.getLogger("ray.serve").setLevel(log_level)
    serve.start(http_options={"host": http.host, "port": http.port}, logging_config=logging_config)
    # One call: the applications' replicas start (download, load) side by side.
    serve.run_many([serve.RunTarget(build_app(cfg), name=name, route_prefix=prefix, logging_config=logging_config)
                    for name, (cfg, prefix) in apps.items()])
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    return f"http://{host}:{http.port}"


def run(cfg: Config) -> dict[str, Any]:
    """``mint-ray serve``: deploy one application and (by default) serve until Ctrl-C."""
    base = deploy({cfg.name: (cfg.app, cfg.route_prefix)}, cfg.http, cfg.ray)
    url = f"{base}{cfg.route_prefix.rstrip('/')}"
    summary = {"url": url, "app": cfg.name, "model_uri": cfg.app.model_uri,
               "routes": ["/v1/predict", "/v1/chat/completions", "/v1/models", "/healthz", "/readyz"]}
    if not cfg.wait:
        return summary
    print(f"[serve] {cfg.app.model_uri} at {url} (try {url}/v1/models); Ctrl-C stops", flush=True)
    signalled = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: signalled.set())
    while not signalled.wait(0.5):
        pass
    # A second signal during the drain stops the command at once.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"[serve] stopping {cfg.name!r}: finishing the requests in flight", flush=True)
    stop(cfg.name)
    return {**summary, "stopped": True}


def stop(name: str) -> None:
    """Delete the application ``name`` and wait until it is gone: Serve stops routing to it
    and its replicas finish their requests in flight first. Other applications, and
    Serve on the cluster, keep running (``serve.shutdown`` would stop them all)."""
    serve.delete(name, _blocking=True)
