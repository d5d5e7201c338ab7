"""Serving configs: what ServeConfig refuses, and the shipped deploy configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mint_ray.config import build_config
from mint_ray.errors import ConfigError
from mint_ray.serving.config import ServeConfig


def test_serve_config_refusals() -> None:
    with pytest.raises(ConfigError, match="name of an environment variable"):
        build_config(ServeConfig, {"model_uri": "x", "api_key_env": "sk-123-secret"})
    with pytest.raises(ConfigError, match=r"unknown key 'limits\.max_body'"):
        build_config(ServeConfig, {"model_uri": "x", "limits": {"max_body": 1}})
    with pytest.raises(ConfigError, match="unknown task"):
        build_config(ServeConfig, {"model_uri": "x", "task": "cardiology"})


def test_shipped_serve_configs_are_valid_serve_configs() -> None:
    import yaml

    repo = Path(__file__).resolve().parents[1]
    local = yaml.safe_load((repo / "serving" / "config.yaml").read_text())
    service = yaml.safe_load((repo / "cluster" / "kubernetes" / "rayservice.yaml").read_text())
    cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    for config in (local, cluster):
        for app in config["applications"]:
            cfg = build_config(ServeConfig, app["args"])
            assert cfg.model_uri.startswith("models:/") and "@" in cfg.model_uri
            assert [d["name"] for d in app.get("deployments", [])] in ([], ["MintStudent"])
