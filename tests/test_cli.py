"""The ``mint-ray`` command itself: every stage's ``--help`` lists its shortcut flags."""

from __future__ import annotations

import importlib
import json

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


def test_a_stage_ends_with_a_readable_summary_and_writes_its_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """The closing summary is a few `key: value` lines and the path of the whole result;
    ``--json`` prints that result instead."""
    common = ["data", "synth", "--task", "tissue_type", "--set", "sizes.n_samples=20", "--set", "image_size=32",
              "--set", f"storage.root={tmp_path}", "--set", "tracking.enabled=false"]
    summary_file = tmp_path / "synth.json"
    assert main([*common, "--out", str(tmp_path / "a"), "--summary-file", str(summary_file)]) == 0
    out = capsys.readouterr().out
    result = json.loads(summary_file.read_text())
    assert result["rows"] == 20
    lines = out.strip().splitlines()
    assert lines[0] == "mint-ray data synth: done" and lines[-1] == f"  full result: {summary_file}"
    assert "  rows: 20" in lines and f"  output_uri: {result['output_uri']}" in lines
    assert not out.lstrip().startswith("{")

    assert main([*common, "--out", str(tmp_path / "b"), "--json", "--summary-file", str(tmp_path / "b.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "b.json").read_text()) and printed["rows"] == 20


def test_an_unwritable_summary_file_prints_the_result_instead(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under `ray job submit` the working folder may vanish or be read-only: the finished run
    still succeeds, and its result is printed rather than lost."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["data", "synth", "--task", "tissue_type", "--set", "sizes.n_samples=20", "--set", "image_size=32",
                 "--set", f"storage.root={tmp_path}", "--set", "tracking.enabled=false", "--out", str(tmp_path / "c"),
                 "--summary-file", str(blocker / "summary.json")]) == 0
    out = capsys.readouterr().out
    result, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    assert result["rows"] == 20 and "full result: printed above" in out


def test_an_error_raised_in_ray_prints_mint_rays_own_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A StorageError from a Ray Data write task arrives as RayTaskError(StorageError), one
    from an actor's constructor as ActorDiedError (its text only), maybe inside Ray Data's
    own exception: the person reads the StorageError's line. Anything else keeps its traceback."""
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import ActorDiedError, RayTaskError

    from mint_ray import cli
    from mint_ray.errors import StorageError

    message = "s3://b/p/part-00003.parquet: cannot reach the S3 endpoint http://10.0.0.1:7480"
    in_task = RayTaskError("MapBatches(pair_rows)->Write", "Traceback ...", StorageError(message)).as_instanceof_cause()
    in_constructor = ActorDiedError(RayTaskError(
        "MapWorker(MapBatches(TeacherScorer)).__init__",
        f"Traceback (most recent call last):\n  ...\nmint_ray.errors.StorageError: {message}",
        StorageError(message)))
    wrapped = UserCodeException("UDF failed")
    wrapped.__cause__ = in_constructor
    assert isinstance(in_task, StorageError) and str(in_task) != message
    for raised in (in_task, in_constructor, wrapped):
        monkeypatch.setattr(cli, "run_stage", lambda argv, raised=raised: (_ for _ in ()).throw(raised))
        assert cli.main(["preferences"]) == 2
        assert capsys.readouterr().err == f"mint-ray: error: {message}\n"
    for bug in (ActorDiedError(), KeyError("x")):
        monkeypatch.setattr(cli, "run_stage", lambda argv, bug=bug: (_ for _ in ()).throw(bug))
        with pytest.raises(type(bug)):
            cli.main(["preferences"])
