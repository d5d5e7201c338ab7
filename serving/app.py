"""Entry for ``serve run serving/config.yaml`` / ``serve deploy`` and the RayService
(``import_path: serving.app:build_app``). The application's ``args`` are a
``mint_ray.serving.config.ServeConfig`` (unknown keys are an error):

    args:
      model_uri: models:/<name>@champion   # or models:/<name>/<version>, s3://..., a local dir
      task: rare_disease                   # optional guard: the model must do this task
      api_key_env: MINT_API_KEY            # optional: the NAME of the env var holding the key
      batching: {max_batch_size: 8, batch_wait_timeout_s: 0.02}
      deployment: {num_replicas: 1, num_cpus: 0.5, num_gpus: 0}

The deployment (``MintStudent``) lives in the installed package, so replicas need
nothing from this folder.
"""

from mint_ray.serving.app import build_app

__all__ = ["build_app"]
