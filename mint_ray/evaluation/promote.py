"""Promote a registered model version to an alias when its evaluation beats the holder.

``mint-ray promote --task rare_disease --version 4 --alias champion --metric top1 --margin 0.02``
(``--task`` promotes within the task's registered model, ``Task.registered_model``; ``--name`` names one)

The evidence is the evaluation that ``mint-ray evaluate`` (or ``compare``) wrote
on each model version as tags (``eval.top1``, ``eval.data_hash``...). The
candidate takes the alias only if its metric beats the current holder's by more
than ``margin`` on the same test data (same content hash, split, case count, decoding and prompt);
with no holder, any evaluated candidate takes it. Every decision is recorded on
the candidate as ``promotion.*`` tags (decision, reason, forced, previous
version, values, time); ``--force`` promotes regardless and records what it
overrode. All metrics of the report are "higher is better".
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from mint_ray.config import StorageConfig, StrictModel, TrackingConfig
from mint_ray.errors import MintError
from mint_ray.registry import parse_models_uri
from mint_ray.tasks import TASKS, TaskName

EVAL_PREFIX = "eval."
PROMOTION_PREFIX = "promotion."
# Evaluation context that must match for two versions' metrics to compare.
SAME_EVALUATION = ("data_hash", "split", "n", "decoding", "prompt")

CLI_FLAGS = {"task": "task", "name": "name", "version": "version", "alias": "alias", "metric": "metric",
             "margin": "margin", "force": "force", "reason": "reason"}


class Config(StrictModel):
    """``mint-ray promote``: move ``alias`` to ``version`` of ``name`` if its evaluation is better."""

    task: TaskName | None = Field(None, description="promote within this task's registered model")
    name: str = Field(description="registered model name (default: the task's, e.g. mint-rare-disease-text)")
    version: str | None = Field(None, description="default: the latest version")
    alias: str = "champion"
    metric: str = Field("top1", description="a report metric: top1, top5, top10, mrr, car, parseable")
    margin: float = Field(0.0, ge=0, description="the candidate must beat the holder by more than this")
    force: bool = False
    reason: str | None = Field(None, description="a note recorded with the decision (say why when forcing)")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _name_from_task(cls, data: Any) -> Any:
        # The registry name is defined once, by the task; a recipe names the task.
        if isinstance(data, dict) and not data.get("name") and data.get("task") in TASKS:
            return {**data, "name": TASKS[data["task"]].registered_model}
        return data

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `--version 3` arrives as a YAML integer.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# ---------------------------------------------------------------- registry look-ups


def use_tracking(cfg: TrackingConfig, data_root: str) -> str:
    """Point MLflow at the configured server and return its URI (registry look-ups need it
    even when a stage's own tracking is off)."""
    import mlflow

    from mint_ray.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg, data_root)
    mlflow.set_tracking_uri(uri)
    return uri


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def _registry_error(err: Exception, what: str, fix: str) -> MintError:
    import mlflow

    return MintError(f"{what} is not in the model registry at {mlflow.get_tracking_uri()} "
                     f"({str(err).splitlines()[0]}): {fix}")


def get_version(name: str, version: str | None = None, alias: str | None = None) -> Any:
    """The ``ModelVersion`` by number, by alias, or the latest one; a ``MintError`` when absent."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        raise _registry_error(err, f"model {name!r}", "register it (mint-ray train with "
                              "register.enabled=true) or check the name") from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version is None or version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MintError(f"model {name!r} has no versions yet: register one first")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as err:
        target = f"alias @{alias}" if alias is not None else f"version {version}"
        raise _registry_error(err, f"{target} of model {name!r}", "check the URI (list versions in the "
                              "MLflow UI)") from None


def alias_holder(name: str, alias: str) -> Any | None:
    """The version holding ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def pin_version(uri: str) -> Any | None:
    """The registered ``ModelVersion`` a ``models:/`` URI names (alias and "latest" resolved
    now), or None for URIs that are not registered versions."""
    parsed = parse_models_uri(uri)
    if parsed is None:
        return None
    name, version, alias = parsed
    return get_version(name, version, alias)


# ---------------------------------------------------------------- evaluation tags


def evaluation_tags(metrics: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, str]:
    """Version tags for one evaluation: each metric's value and the context that makes two comparable.

    ``metrics`` is an ``ArmSummary.as_dict()``; ``context`` holds at least
    ``data_hash``, ``split`` (``n`` comes from ``metrics``).
    """
    tags = {f"{EVAL_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()
            if isinstance(v, float) and not k.endswith(("_ci_low", "_ci_high"))}
    tags.update({f"{EVAL_PREFIX}{k}_ci": f"[{metrics[f'{k}_ci_low']:.4f}, {metrics[f'{k}_ci_high']:.4f}]"
                 for k in list(metrics) if f"{k}_ci_low" in metrics})
    tags[f"{EVAL_PREFIX}n"] = str(metrics["n"])
    tags.update({f"{EVAL_PREFIX}{k}": str(v) for k, v in context.items()})
    tags[f"{EVAL_PREFIX}time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return tags


def record_evaluation(name: str, version: str, tags: Mapping[str, str]) -> None:
    """Write evaluation tags on a model version (older ``eval.*`` tags are replaced)."""
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


# ---------------------------------------------------------------- the decision (pure)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_value: float | None = None
    holder_value: float | None = None


def _metric(tags: Mapping[str, str], metric: str) -> float | None:
    raw = tags.get(f"{EVAL_PREFIX}{metric}")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def decide(candidate: Mapping[str, str], holder: Mapping[str, str] | None, *, name: str,
           version: str, holder_version: str | None, metric: str, margin: float) -> Decision:
    """Whether the candidate's evaluation beats the holder's (``MintError`` when they cannot compare)."""
    value = _metric(candidate, metric)
    if value is None:
        raise MintError(f"version {version} of {name!r} has no evaluation metric {EVAL_PREFIX}{metric}: "
                        f"run `mint-ray evaluate --model models:/{name}/{version}` first (or --force)")
    if holder is None:
        return Decision(True, f"no version holds the alias; {metric} = {value:.4f}", value)
    held = _metric(holder, metric)
    if held is None:
        raise MintError(f"the current holder (version {holder_version}) of {name!r} has no "
                        f"{EVAL_PREFIX}{metric}: evaluate it on the same test data "
                        f"(`mint-ray evaluate --model models:/{name}/{holder_version}`) or pass --force")
    differ = [f"{k}: {candidate.get(EVAL_PREFIX + k)} vs {holder.get(EVAL_PREFIX + k)}"
              for k in SAME_EVALUATION if candidate.get(EVAL_PREFIX + k) != holder.get(EVAL_PREFIX + k)]
    if differ:
        raise MintError(f"versions {version} and {holder_version} of {name!r} were evaluated on different "
                        f"test data ({'; '.join(differ)}): evaluate both on the same data_uri/split/"
                        "max_cases, or pass --force")
    if value - held > margin:
        return Decision(True, f"{metric} {value:.4f} beats version {holder_version}'s {held:.4f} "
                              f"by more than {margin:g}", value, held)
    return Decision(False, f"{metric} {value:.4f} does not beat version {holder_version}'s {held:.4f} "
                           f"by more than {margin:g}", value, held)


def decide_forced(candidate: Mapping[str, str], holder: Mapping[str, str] | None, **kwargs: Any) -> Decision:
    """A forced promotion; its reason records what the comparison would have said."""
    try:
        normal = decide(candidate, holder, **kwargs)
    except MintError as err:
        return Decision(True, f"forced: {err}")
    return Decision(True, f"forced: {normal.reason}", normal.candidate_value, normal.holder_value)


# ---------------------------------------------------------------- the stage


def run(cfg: Config) -> dict[str, Any]:
    use_tracking(cfg.tracking, cfg.storage.root)
    candidate = get_version(cfg.name, cfg.version)
    version = str(candidate.version)
    holder = alias_holder(cfg.name, cfg.alias)
    previous = str(holder.version) if holder is not None else None
    if previous == version:
        return {"name": cfg.name, "version": version, "alias": cfg.alias, "promoted": False,
                "reason": f"version {version} already holds @{cfg.alias}"}
    decision = (decide_forced if cfg.force else decide)(
        dict(candidate.tags), dict(holder.tags) if holder is not None else None, name=cfg.name,
        version=version, holder_version=previous, metric=cfg.metric, margin=cfg.margin)
    client = _client()
    if decision.promote:
        client.set_registered_model_alias(cfg.name, cfg.alias, version)
        if previous is not None:
            client.set_model_version_tag(cfg.name, previous, f"{PROMOTION_PREFIX}superseded_by", version)
    record = {
        "decision": "promoted" if decision.promote else "refused", "reason": decision.reason,
        "forced": str(cfg.force).lower(), "alias": cfg.alias, "metric": cfg.metric,
        "margin": repr(cfg.margin), "previous_version": previous or "",
        "candidate_value": "" if decision.candidate_value is None else repr(decision.candidate_value),
        "holder_value": "" if decision.holder_value is None else repr(decision.holder_value),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": cfg.reason or ""}
    for key, value in record.items():
        client.set_model_version_tag(cfg.name, version, f"{PROMOTION_PREFIX}{key}", value)
    outcome = (f"version {version} now holds @{cfg.alias}" if decision.promote
               else f"@{cfg.alias} stays with version {previous}")
    print(f"[promote] {cfg.name}: {outcome} ({decision.reason})", flush=True)
    return {"name": cfg.name, "version": version, "alias": cfg.alias, "promoted": decision.promote,
            "forced": cfg.force, "previous_version": previous, "reason": decision.reason,
            "candidate_value": decision.candidate_value, "holder_value": decision.holder_value}
