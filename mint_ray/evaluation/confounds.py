"""Which training settings differ between a comparison's arms (pure).

``compare`` flattens each arm's effective training config, and every setting whose values
differ, unless the recipe's ``varied`` list covers it, is a confound.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mint_ray.evaluation.training_report import Confound


def flat_settings(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{prefix + dotted.path: value}``; lists are values (pure)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def covers(varied: str, setting: str) -> bool:
    """Whether a ``varied`` entry covers ``setting``: itself, or a section above it (pure)."""
    return setting == varied or setting.startswith(varied + ".")


def _value_text(value: Any) -> str:
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value)


_UNSET = object()


def find_confounds(settings: Mapping[str, Mapping[str, Any]], varied: Sequence[str]) -> list[Confound]:
    """The settings whose values differ between arms (``settings``: arm -> its flat settings),
    leaving out those a ``varied`` entry covers; in first-seen order (pure)."""
    names = list(dict.fromkeys(name for flat in settings.values() for name in flat))
    confounds = []
    for name in names:
        if any(covers(v, name) for v in varied):
            continue
        values = {arm: flat.get(name, _UNSET) for arm, flat in settings.items()}
        if len({_value_text(v) if v is not _UNSET else "unset" for v in values.values()}) > 1:
            confounds.append(Confound(name, {arm: "unset" if v is _UNSET else _value_text(v)
                                             for arm, v in values.items()}))
    return confounds
