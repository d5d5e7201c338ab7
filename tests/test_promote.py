"""Promotion: the decision rule (pure) and `mint-ray promote` on a real MLflow server,
refusing a worse model, accepting a better one, and recording a forced promotion."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pytest

from mint_ray.cli import main
from mint_ray.config import build_config
from mint_ray.errors import MintError
from mint_ray.evaluation import promote
from tests.test_evaluate import register_student
from tests.tinymodels import make_student_dir

SAME = {"data_hash": "abc", "split": "test", "decoding": "greedy", "prompt": "plain"}


def tags(top1: float | None, n: int = 20, **context: str) -> dict[str, str]:
    metrics: dict[str, Any] = {"arm": "orpo", "n": n}
    if top1 is not None:
        metrics.update(top1=top1, top1_ci_low=top1 - 0.1, top1_ci_high=top1 + 0.1)
    return promote.evaluation_tags(metrics, {**SAME, **context})


def decide(candidate: dict[str, str], holder: dict[str, str] | None, margin: float = 0.0) -> promote.Decision:
    return promote.decide(candidate, holder, name="m", version="2", holder_version="1" if holder else None,
                          metric="top1", margin=margin)


def test_evaluation_tags_hold_values_intervals_and_context() -> None:
    t = tags(0.4)
    assert float(t["eval.top1"]) == 0.4 and t["eval.top1_ci"] == "[0.3000, 0.5000]"
    assert t["eval.n"] == "20" and t["eval.data_hash"] == "abc" and "eval.time" in t


def test_decision_rule() -> None:
    assert decide(tags(0.3), None).promote  # no holder: any evaluated candidate
    assert decide(tags(0.5), tags(0.4)).promote
    refused = decide(tags(0.42), tags(0.4), margin=0.05)
    assert not refused.promote and "does not beat version 1's 0.4000 by more than 0.05" in refused.reason
    assert not decide(tags(0.4), tags(0.4)).promote  # a tie is not better
    with pytest.raises(MintError, match=r"no evaluation metric eval.top1: run `mint-ray evaluate --model models:/m/2`"):
        decide(tags(None), tags(0.4))
    with pytest.raises(MintError, match=r"holder .* has no eval.top1"):
        decide(tags(0.5), tags(None))
    with pytest.raises(MintError, match=r"different test data .*data_hash: abc vs xyz"):
        decide(tags(0.5), tags(0.4, data_hash="xyz"))
    with pytest.raises(MintError, match=r"n: 20 vs 10"):
        decide(tags(0.5), tags(0.4, n=10))
    forced = promote.decide_forced(tags(0.5), tags(0.4, data_hash="xyz"), name="m", version="2",
                                   holder_version="1", metric="top1", margin=0.0)
    assert forced.promote and forced.reason.startswith("forced: versions 2 and 1 of 'm' were evaluated on")


@pytest.mark.mlflow_server
def test_promote_refuses_worse_accepts_better_and_records_force(
        tmp_path: Path, mlflow_server: str, capsys) -> None:
    name = f"promote-test-{uuid.uuid4().hex[:6]}"
    model = make_student_dir(tmp_path / "student", "rare_disease")
    versions = [register_student(model, name, mlflow_server)[0] for _ in range(3)]
    client = mlflow.MlflowClient(mlflow_server)

    def promote_cli(*args: str) -> dict[str, Any]:
        assert main(["promote", "--name", name, "--set", f"tracking.tracking_uri={mlflow_server}", "--json",
                     "--summary-file", str(tmp_path / "promote.json"), *args]) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index("{\n"):])  # --json prints the result after the decision line

    def version_tags(version: str) -> dict[str, str]:
        return client.get_model_version(name, version).tags

    with pytest.raises(MintError, match=r"has no evaluation metric eval.top1"):
        promote.run(build_config(promote.Config, {"name": name, "tracking": {"tracking_uri": mlflow_server}}))
    for version, top1 in zip(versions, (0.5, 0.4, 0.7), strict=True):
        promote.record_evaluation(name, version, tags(top1))

    first = promote_cli("--version", versions[0])
    assert first["promoted"] and first["previous_version"] is None
    assert client.get_model_version_by_alias(name, "champion").version == versions[0]

    worse = promote_cli("--version", versions[1], "--margin", "0.05")
    assert not worse["promoted"] and worse["previous_version"] == versions[0]
    assert client.get_model_version_by_alias(name, "champion").version == versions[0]
    record = version_tags(versions[1])
    assert record["promotion.decision"] == "refused" and record["promotion.forced"] == "false"
    assert "does not beat version" in record["promotion.reason"] and record["promotion.holder_value"] == "0.5"

    better = promote_cli("--margin", "0.05")  # the latest version (0.7)
    assert better["promoted"] and better["version"] == versions[2]
    assert client.get_model_version_by_alias(name, "champion").version == versions[2]
    assert version_tags(versions[2])["promotion.previous_version"] == versions[0]
    assert version_tags(versions[0])["promotion.superseded_by"] == versions[2]

    forced = promote_cli("--version", versions[1], "--force", "--reason", "rollback drill")
    assert forced["promoted"] and forced["forced"]
    record = version_tags(versions[1])
    assert record["promotion.decision"] == "promoted" and record["promotion.forced"] == "true"
    assert record["promotion.reason"].startswith("forced: top1 0.4000 does not beat")
    assert record["promotion.note"] == "rollback drill"
    assert client.get_model_version_by_alias(name, "champion").version == versions[1]

    for config, match in (({"name": f"{name}-nope"}, "model .* is not in the model registry"),
                          ({"name": name, "version": "99"}, "version 99 of model")):
        with pytest.raises(MintError, match=match):
            promote.run(build_config(promote.Config, {**config, "tracking": {"tracking_uri": mlflow_server}}))
