"""The Serve application: the entry ``serve run``/``serve deploy`` and the RayService
import (``import_path: mint_ray.serving.app:build_app``; the configs are in the
repository's ``serving/``). Its ``args`` are a :class:`ServeConfig` (unknown keys
are an error):

    args:
      model_uri: models:/<name>@champion   # or models:/<name>/<version>, s3://..., a local dir
      task: rare_disease                   # optional guard: the model must do this task
      api_key_env: MINT_API_KEY            # optional: the NAME of the env var holding the key
      batching: {max_batch_size: 8, batch_wait_timeout_s: 0.02}
      deployment: {num_replicas: 1, num_cpus: 0.5, num_gpus: 0}

Everything lives in the installed package, so replicas need no files from the repository.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from mint_ray.serving.config import ServeConfig
from mint_ray.serving.deployment import MintStudent


def build_app(args: dict[str, Any] | ServeConfig) -> serve.Application:
    """The Serve application for ``args`` (a ServeConfig or its dict: ``serve run`` args)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    dep = cfg.deployment
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus},
        "max_ongoing_requests": max(dep.max_ongoing_requests, cfg.batching.max_batch_size),
        "max_queued_requests": dep.max_queued_requests,
        "graceful_shutdown_timeout_s": dep.graceful_shutdown_timeout_s,
        "user_config": cfg.batching.model_dump(),
    }
    if dep.autoscaling is not None:
        options["autoscaling_config"] = dep.autoscaling.model_dump()
    else:
        options["num_replicas"] = dep.num_replicas
    # Batching and replica settings reach Serve as options and user_config, not as
    # constructor args: changing them is a light update (reconfigure, scale), never a restart.
    return MintStudent.options(**options).bind(cfg.model_dump(mode="json", exclude={"batching", "deployment"}))
