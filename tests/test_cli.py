"""The ``mint-ray`` command itself: every stage's ``--help`` lists its shortcut flags."""

from __future__ import annotations

import importlib

import pytest

from mint_ray.cli import STAGES, main


@pytest.mark.parametrize("words", list(STAGES), ids=[" ".join(k) for k in STAGES])
def test_help_lists_the_stage_shortcuts(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([*words, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mint-ray {' '.join(words)}") and "--set KEY=VALUE" in out
    flags: dict[str, str] = getattr(importlib.import_module(STAGES[words]), "CLI_FLAGS", {})
    for flag, key in flags.items():
        assert f"--{flag} VALUE" in out and f"--set {key}=VALUE" in out, flag


def test_top_level_help_points_at_the_stage_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "'mint-ray <command> --help'" in out
