"""The ``mint-ray`` command: one subcommand per stage.

Every stage module exposes ``Config`` (its typed pydantic config), ``run(cfg)``
and optionally ``CLI_FLAGS`` (``--flag`` -> dotted config key shortcuts). The
same entry serves ``jobs/*.py`` for ``ray job submit``.

Output: progress and a closing summary a person reads in seconds (a stage may define
``summarize(result) -> list[str]``; otherwise its result's top-level facts); the whole
result is written as JSON to ``--summary-file`` (default ``./mint-ray-runs/<stage>-<time>.json``)
and printed instead of the summary with ``--json``. ``--verbose`` (or
``MINT_RAY_LOG_LEVEL=DEBUG``) shows the infrastructure's INFO lines too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from mint_ray import console
from mint_ray.config import load_config
from mint_ray.errors import MintError, user_message

# subcommand words -> stage module. Modules are imported lazily: `mint-ray data
# synth` must not pay for importing DeepSpeed.
STAGES: dict[tuple[str, ...], str] = {
    ("data", "synth"): "mint_ray.data.synth",
    ("teacher", "train"): "mint_ray.teachers.train",
    ("preferences",): "mint_ray.preferences.run",
    ("train",): "mint_ray.training.run",
    ("evaluate",): "mint_ray.evaluation.run",
    ("promote",): "mint_ray.evaluation.promote",
    ("compare",): "mint_ray.evaluation.compare",
    ("serve",): "mint_ray.serving.run",
    ("demo",): "mint_ray.demo",
}

log = logging.getLogger("mint_ray")
SUMMARY_DIR = Path("mint-ray-runs")
# Options of the command itself, taken before the stage's own.
COMMON_FLAGS = {"--verbose": "show the infrastructure's INFO lines (same as MINT_RAY_LOG_LEVEL=DEBUG)",
                "--json": "print the whole result as JSON instead of the closing summary"}


def _find_stage(words: list[str]) -> tuple[tuple[str, ...], list[str]]:
    for key in sorted(STAGES, key=len, reverse=True):
        if tuple(words[: len(key)]) == key:
            return key, words[len(key):]
    known = ", ".join(" ".join(k) for k in STAGES)
    raise MintError(f"unknown command {' '.join(words[:2])!r}: choose one of {known}")


def _flag_overrides(module: ModuleType, extra: list[str]) -> list[str]:
    """Turn stage shortcut flags (``--out s3://x``, ``--overwrite``) into dotted overrides."""
    flags: dict[str, str] = getattr(module, "CLI_FLAGS", {})
    overrides = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in flags:
            allowed = ", ".join(["--config", "--set", *(f"--{f}" for f in flags)])
            raise MintError(f"unknown option {arg!r}: allowed options are {allowed}")
        if not eq:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value = extra[i + 1]
                i += 1
            else:
                value = "true"
        overrides.append(f"{flags[name]}={value}")
        i += 1
    return overrides


def _shortcuts_help(module: ModuleType) -> str | None:
    """The stage's CLI_FLAGS for ``--help`` (argparse does not parse them: ``_flag_overrides`` does)."""
    flags: dict[str, str] = getattr(module, "CLI_FLAGS", {})
    if not flags:
        return None
    width = max(len(f) for f in flags) + len("--") + len(" VALUE")
    lines = [f"  {f'--{flag} VALUE':{width}s}  same as --set {key}=VALUE" for flag, key in flags.items()]
    return "shortcuts (a flag without a value means true):\n" + "\n".join(lines)


def run_stage(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` (after the program name), load the stage config and run it."""
    words = [a for a in argv if not a.startswith("-")][:2]
    key, _ = _find_stage(words)
    rest = list(argv)
    for w in key:
        rest.remove(w)
    module = importlib.import_module(STAGES[key])
    parser = argparse.ArgumentParser(prog=f"mint-ray {' '.join(key)}",
                                     description=(module.__doc__ or "").strip().splitlines()[0],
                                     epilog=_shortcuts_help(module),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe for this stage")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set storage.root=s3://bucket/prefix")
    parser.add_argument("--summary-file",
                        help=f"where the JSON result goes (default {SUMMARY_DIR}/<stage>-<time>.json)")
    for flag, text in COMMON_FLAGS.items():
        parser.add_argument(flag, action="store_true", help=text)
    args, extra = parser.parse_known_args(rest)
    cfg = load_config(module.Config, args.config, _flag_overrides(module, extra) + args.set)
    result = module.run(cfg)
    text = json.dumps(result, indent=2, default=str)
    path = Path(args.summary_file or SUMMARY_DIR / f"{'-'.join(key)}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    written = True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    except OSError as err:
        # The run is done: an unwritable folder (a job's working_dir copy) must not fail it;
        # the result is printed instead, so nothing is lost.
        log.warning("could not write the result to %s (%s); printing it instead", path, err)
        written = False
    if args.json or not written:
        print(text)
    if not args.json:
        summarize = getattr(module, "summarize", None)
        lines = summarize(result) if summarize else console.summary_lines(result)
        where = path if written else "printed above"
        print("\n".join([f"\nmint-ray {' '.join(key)}: done", *lines, f"  full result: {where}"]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console.setup(verbose_flag="--verbose" in argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mint-ray <command> [--config RECIPE.yaml] [--set KEY=VALUE ...]\ncommands:")
        for key, mod in STAGES.items():
            print(f"  {' '.join(key):16s} ({mod})")
        print("'mint-ray <command> --help' lists a command's options and shortcut flags")
        return 0
    try:
        run_stage(argv)
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        print(f"mint-ray: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
