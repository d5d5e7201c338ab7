"""The Terraform -> IAM JSON translator the rehearsal grants to its S3 users."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tools import iam_policy
from tools.validate_manifests import TERRAFORM, load_terraform


def _statements(policy: dict) -> dict[str, dict]:
    return {st["Sid"]: st for st in policy["Statement"]}


def test_ray_data_policy_is_what_terraform_renders() -> None:
    st = _statements(iam_policy.policy_from_terraform("ray_data", "b"))
    assert set(st) == {"ListStagePrefixes", "BucketRegion", "ReadWriteStagePrefixes", "ReadInputPrefixes"}
    assert st["ListStagePrefixes"]["Resource"] == ["arn:aws:s3:::b"]
    listed = st["ListStagePrefixes"]["Condition"]["StringLikeIfExists"]["s3:prefix"]
    assert {"students", "students/*", "models", "models/*", "raw/*"} <= set(listed)
    assert "arn:aws:s3:::b/students/*" in st["ReadWriteStagePrefixes"]["Resource"]
    assert st["ReadInputPrefixes"] == {"Sid": "ReadInputPrefixes", "Effect": "Allow", "Action": ["s3:GetObject"],
                                       "Resource": ["arn:aws:s3:::b/raw/*", "arn:aws:s3:::b/models/*"]}
    # KMS has no local stand-in: left out, not mistranslated.
    assert all(a.startswith("s3:") for s in st.values() for a in s["Action"])


def test_variables_and_the_mlflow_policy() -> None:
    st = _statements(iam_policy.policy_from_terraform("ray_data", "b", variables={"input_prefixes": ["raw"]}))
    assert st["ReadInputPrefixes"]["Resource"] == ["arn:aws:s3:::b/raw/*"]
    mlflow = _statements(iam_policy.policy_from_terraform("mlflow", "b"))
    assert mlflow["ReadWriteArtifacts"]["Resource"] == ["arn:aws:s3:::b/mlflow-artifacts/*"]


def test_rgw_statement_is_bucket_level_delete_only() -> None:
    policy = iam_policy.rgw_compatible(iam_policy.policy_from_terraform("ray_data", "b"))
    assert policy["Statement"][-1] == {"Sid": "RgwMultiDeleteEntry", "Effect": "Allow",
                                       "Action": ["s3:DeleteObject"], "Resource": ["arn:aws:s3:::b"]}


def test_a_change_in_iam_tf_changes_the_policy(tmp_path: Path) -> None:
    tf = tmp_path / "tf"
    shutil.copytree(TERRAFORM, tf)
    text = (tf / "iam.tf").read_text().replace('"StringLikeIfExists"', '"StringLike"')
    (tf / "iam.tf").write_text(text)
    st = _statements(iam_policy.policy_from_terraform("ray_data", "b", tf))
    assert "StringLike" in st["ListStagePrefixes"]["Condition"]


def test_unsupported_expressions_are_errors() -> None:
    tf = load_terraform()
    doc = tf["data"]["aws_iam_policy_document"]["ray_data"]
    doc["statement"][0]["resources"] = ["${aws_s3_bucket.data.region}"]
    with pytest.raises(iam_policy.TranslateError, match=r"aws_s3_bucket\.data\.region"):
        iam_policy.s3_policy(tf, "ray_data", "b")
    doc["statement"][0]["resources"] = ["${upper(local.stage_object_arns)}"]
    with pytest.raises(iam_policy.TranslateError, match="upper"):
        iam_policy.s3_policy(tf, "ray_data", "b")
    with pytest.raises(iam_policy.TranslateError, match=r"no data\.aws_iam_policy_document\.nope"):
        iam_policy.s3_policy(tf, "nope", "b")
