"""Talking to a served application: ``ask`` (one request, stdlib only) and
``serve_and_ask`` (the local demo's last step: serve, then ask)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from mint_ray import console
from mint_ray.config import RayConfig
from mint_ray.errors import MintError
from mint_ray.serving.config import HttpConfig, ServeConfig


def ask(url: str, task: str, *, note: str | None = None, image: bytes | None = None, top_k: int | None = None,
        api_key: str | None = None, timeout_s: float = 120) -> dict[str, Any]:
    """One ``POST <url>/v1/predict`` (stdlib only); raises MintError with the server's message on 4xx/5xx."""
    body: dict[str, Any] = {"task": task}
    if note is not None:
        body["note"] = note
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    if top_k is not None:
        body["top_k"] = top_k
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(f"{url.rstrip('/')}/v1/predict", json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):  # not our JSON error (a proxy's page)
            detail = err.reason
        raise MintError(f"{url}: HTTP {err.code}: {detail}") from None


def serve_and_ask(models: dict[str, str], cases: dict[str, dict[str, Any]], *, http: HttpConfig | None = None,
                  tracking_uri: str | None = None, ray_cfg: RayConfig | None = None) -> dict[str, dict[str, Any]]:
    """The local demo's last step: serve each task's model (task -> model URI) as its own
    application under ``/<task>``, send one request per task (task -> ``{"note": ...}`` or
    ``{"image": png bytes}``) and return the answers. Serve keeps running; ``serve.shutdown()``
    (or the end of the process) stops it."""
    from mint_ray.serving.run import deploy  # Ray Serve: only where something is served

    http = http or HttpConfig()
    apps = {f"mint-{task}": (ServeConfig(model_uri=uri, task=task, tracking_uri=tracking_uri), f"/{task}")
            for task, uri in models.items()}
    base = deploy(apps, http, ray_cfg, log_level=console.serve_log_level())
    return {task: ask(f"{base}/{task}", task, **cases[task]) for task in models}
