"""Typed stage configs: YAML recipe -> dotted overrides -> references -> pydantic model.

Every stage has one pydantic model (``extra="forbid"``), so a misspelled key is
an error naming its path and the allowed names, never a silently ignored value.

String values may refer to other keys of the same recipe (``${storage.root}``) and to
environment variables (``${env:MINT_STORAGE_ROOT}``), resolved after the overrides: the
production recipes name their bucket once, through ``storage.root``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mint_ray.errors import ConfigError

C = TypeVar("C", bound="StrictModel")


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(StrictModel):
    """Where a stage's data lives: a local folder or ``s3://bucket/prefix``."""

    root: str = "./mint-data"
    overwrite: bool = False


class TrackingConfig(StrictModel):
    """MLflow. ``tracking_uri`` None means ``MLFLOW_TRACKING_URI`` or, failing that,
    a SQLite store under the local data root."""

    tracking_uri: str | None = None
    experiment: str = "mint-ray"
    enabled: bool = True


class RayConfig(StrictModel):
    """How a stage attaches to Ray. ``address`` None starts an in-process cluster."""

    address: str | None = None
    num_cpus: int | None = None
    # In-process clusters only. The preference pipeline keeps its blocks near block_bytes
    # (16 MiB), so 512 holds a few blocks per operator even with 224 px tiles.
    object_store_memory_mb: int = 512


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (example: --set storage.root=s3://b/p)")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; nested dicts merge, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def resolve_references(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with ``${a.b}`` (another key's value) and ``${env:NAME}`` (an
    environment variable) substituted in every string; a missing key or variable is a
    ``ConfigError`` naming it."""

    def lookup(expr: str, trail: tuple[str, ...]) -> str:
        if expr.startswith("env:"):
            name = expr[len("env:"):]
            value = os.environ.get(name)
            if not value:
                raise ConfigError(f"the recipe refers to ${{env:{name}}} but {name} is not set in this "
                                  f"process's environment: set it (on a cluster, in the nodes' environment) "
                                  "or override the key with --set")
            return value
        if expr in trail:
            raise ConfigError(f"the recipe's references loop: {' -> '.join((*trail, expr))}")
        node: Any = data
        for part in expr.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                raise ConfigError(f"the recipe refers to ${{{expr}}} but sets no {expr!r}: "
                                  f"set it in the recipe or with --set {expr}=...")
            node = node[part]
        if isinstance(node, (dict, list)):
            raise ConfigError(f"${{{expr}}} refers to a section, not a value")
        return substitute(str(node), (*trail, expr))

    def substitute(text: str, trail: tuple[str, ...]) -> str:
        return _REFERENCE.sub(lambda m: lookup(m.group(1).strip(), trail), text)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return substitute(node, ()) if isinstance(node, str) and "${" in node else node

    return walk(data)


def _allowed_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc``'s parent, walking nested models."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem: the dotted key, what is wrong, and the fix."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_names(model, loc)) or "(none)"
            lines.append(f"unknown key '{path}'; allowed here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{path}': set it in the recipe or with --set {path}=...")
        else:
            lines.append(f"bad value for '{path}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid {model.__name__}: " + "; ".join(lines)


def build_config(model: type[C], data: dict[str, Any]) -> C:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(model, err)) from None


def load_config(model: type[C], path: str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> C:
    """Read a YAML recipe (optional), apply dotted overrides, resolve ``${...}`` references,
    validate as ``model``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {str(p)!r} not found: pass an existing YAML file to --config")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {str(p)!r} must be a YAML mapping at the top level")
        data = loaded
    data = deep_merge(data, parse_overrides(overrides or []))
    return build_config(model, resolve_references(data))
