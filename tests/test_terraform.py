"""Offline validation of infra/terraform/ (terraform itself cannot init here).

Every .tf file must parse with python-hcl2; the module must keep its security
settings (no public bucket, KMS encryption with rotation, versioning and
lifecycle, no `*` actions on `*` resources, private encrypted database, IMDSv2)
and reference only declared variables, locals, data sources and resources.
A copy of the module with a planted mistake must fail the same check.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tools import validate_manifests as vm

TF_DIR = vm.TERRAFORM
TF_FILES = sorted(TF_DIR.glob("*.tf"))


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return vm.load_terraform(TF_DIR)


def statements(tf: dict[str, Any], doc: str) -> list[dict[str, Any]]:
    return vm._blocks(tf["data"]["aws_iam_policy_document"][doc]["statement"])


def test_module_has_the_expected_files() -> None:
    names = {p.name for p in TF_FILES}
    assert {"versions.tf", "variables.tf", "outputs.tf", "s3.tf", "iam.tf", "mlflow.tf"} <= names


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.name)
def test_every_file_parses(path: Path) -> None:
    import hcl2

    with path.open() as f:
        assert isinstance(hcl2.load(f), dict)


def test_module_passes_all_checks() -> None:
    assert vm.check_terraform(TF_DIR) == []


def test_bucket_is_private_encrypted_versioned(tf: dict[str, Any]) -> None:
    res = tf["resource"]
    (pab,) = res["aws_s3_bucket_public_access_block"].values()
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy",
                                         "ignore_public_acls", "restrict_public_buckets"))
    (sse,) = res["aws_s3_bucket_server_side_encryption_configuration"].values()
    default = vm._blocks(vm._blocks(sse["rule"])[0]["apply_server_side_encryption_by_default"])[0]
    assert default["sse_algorithm"] == "aws:kms"
    assert default["kms_master_key_id"] == "${aws_kms_key.data.arn}"
    assert res["aws_kms_key"]["data"]["enable_key_rotation"] is True
    (versioning,) = res["aws_s3_bucket_versioning"].values()
    assert vm._blocks(versioning["versioning_configuration"])[0]["status"] == "Enabled"
    (ownership,) = res["aws_s3_bucket_ownership_controls"].values()
    assert vm._blocks(ownership["rule"])[0]["object_ownership"] == "BucketOwnerEnforced"
    deny = statements(tf, "bucket")[0]
    assert deny["effect"] == "Deny" and vm._blocks(deny["condition"])[0]["variable"] == "aws:SecureTransport"


def test_lifecycle_expires_checkpoints_and_old_versions(tf: dict[str, Any]) -> None:
    (lc,) = tf["resource"]["aws_s3_bucket_lifecycle_configuration"].values()
    rules = {r["id"]: r for r in vm._blocks(lc["rule"])}
    ckpt = rules["expire-checkpoints"]
    assert vm._blocks(ckpt["filter"])[0]["prefix"] == "checkpoints/"
    assert vm._blocks(ckpt["expiration"])[0]["days"] == "${var.checkpoint_expiration_days}"
    assert vm._blocks(rules["expire-noncurrent-versions"]["noncurrent_version_expiration"])
    # The prefix the lifecycle rule expires is one the stages may write.
    assert "checkpoints" in tf["variable"]["stage_prefixes"]["default"]


def test_iam_is_scoped_to_the_stage_prefixes(tf: dict[str, Any]) -> None:
    ray = {s["sid"]: s for s in statements(tf, "ray_data")}
    assert ray["ReadWriteStagePrefixes"]["resources"] == "${local.stage_object_arns}"
    assert ray["ReadInputPrefixes"]["actions"] == ["s3:GetObject"]
    assert "/${p}/*" in tf["locals"]["stage_object_arns"]
    assert "s3:prefix" in vm._blocks(ray["ListStagePrefixes"]["condition"])[0]["variable"]
    # Ray never touches MLflow's artifact store; MLflow touches nothing else.
    assert "mlflow_artifacts_prefix" not in str(statements(tf, "ray_data"))
    mlflow = {s["sid"]: s for s in statements(tf, "mlflow")}
    assert mlflow["ReadWriteArtifacts"]["resources"] == [
        "${aws_s3_bucket.data.arn}/${var.mlflow_artifacts_prefix}/*"]
    assert "mlflow-artifacts" not in tf["variable"]["stage_prefixes"]["default"]


def test_irsa_trust_is_pinned_to_the_service_account(tf: dict[str, Any]) -> None:
    (trust,) = statements(tf, "ray_pods_trust")
    assert trust["actions"] == ["sts:AssumeRoleWithWebIdentity"]
    conditions = {c["variable"]: c["values"] for c in vm._blocks(trust["condition"])}
    assert conditions["${local.oidc_provider_host}:sub"] == [
        "system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    assert conditions["${local.oidc_provider_host}:aud"] == ["sts.amazonaws.com"]
    # The names the manifests and the launcher use.
    assert tf["variable"]["k8s_namespace"]["default"] == "mint-ray"
    assert tf["variable"]["k8s_service_account"]["default"] == "mint-ray"
    roles = tf["resource"]["aws_iam_role"]
    assert roles["ray_pods"]["name"] == "${var.name}-ray-pods"
    profiles = tf["resource"]["aws_iam_instance_profile"]
    assert {p["name"] for p in profiles.values()} >= {"${var.name}-ray-head", "${var.name}-ray-worker"}
    assert tf["variable"]["name"]["default"] == "mint-ray"


def test_autoscaler_can_only_stop_its_own_cluster(tf: dict[str, Any]) -> None:
    stop = {s["sid"]: s for s in statements(tf, "ray_autoscaler")}["StopOnlyThisCluster"]
    cond = vm._blocks(stop["condition"])[0]
    assert cond["variable"] == "aws:ResourceTag/ray-cluster-name"
    assert cond["values"] == ["${var.ray_cluster_name}"]


def test_mlflow_server_and_database(tf: dict[str, Any]) -> None:
    db = tf["resource"]["aws_db_instance"]["mlflow"]
    assert db["engine"] == "postgres"
    assert db["storage_encrypted"] is True and db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True and "password" not in db
    server = tf["resource"]["aws_instance"]["mlflow"]
    assert "mlflow-server.sh.tftpl" in server["user_data"]
    template = (TF_DIR / "mlflow-server.sh.tftpl").read_text()
    assert "--artifacts-destination" in template and "postgresql+psycopg2://" in template
    # Every ${name} in the template is passed by templatefile(), and nothing else is.
    used = set(re.findall(r"(?<!\$)\$\{(\w+)\}", template))
    call = (TF_DIR / "mlflow.tf").read_text().split("templatefile(", 1)[1].split("})", 1)[0]
    passed = set(re.findall(r"^\s*(\w+)\s*=", call, flags=re.M))
    assert used == passed
    assert tf["output"]["mlflow_tracking_uri"]["value"] == "http://${local.mlflow_host}:5000"
    assert tf["locals"]["mlflow_host"] == "mlflow.${var.private_zone_name}"


def test_mlflow_uri_matches_the_cluster_config(tf: dict[str, Any]) -> None:
    import yaml

    zone = tf["variable"]["private_zone_name"]["default"]
    base = list(yaml.safe_load_all((vm.K8S_DIR / "base.yaml").read_text()))
    (cm,) = [d for d in base if d and d["kind"] == "ConfigMap"]
    assert cm["data"]["MLFLOW_TRACKING_URI"] == f"http://mlflow.{zone}:5000"


def test_variables_and_outputs_are_documented(tf: dict[str, Any]) -> None:
    for name, var in tf["variable"].items():
        assert var.get("description") and var.get("type"), name
    for name in ("bucket_name", "kms_key_arn", "ecr_repository_url", "ray_pods_role_arn",
                 "ray_head_instance_profile", "ray_worker_instance_profile", "mlflow_tracking_uri"):
        assert tf["output"][name].get("description"), name


# (name, file, text to find, replacement or None to delete that whole block, expected words in a problem)
TF_MISTAKES = [
    ("public-access-block-off", "s3.tf", "block_public_policy     = true", "block_public_policy     = false",
     "block_public_policy must be true"),
    ("public-acl", "s3.tf", "force_destroy = false", 'force_destroy = false\n  acl           = "public-read"',
     "acl 'public-read'"),
    ("aes-instead-of-kms", "s3.tf", 'sse_algorithm     = "aws:kms"', 'sse_algorithm     = "AES256"',
     "sse_algorithm must be aws:kms"),
    ("no-encryption", "s3.tf", 'resource "aws_s3_bucket_server_side_encryption_configuration" "data"', None,
     "no server-side encryption"),
    ("no-public-access-block", "s3.tf", 'resource "aws_s3_bucket_public_access_block" "data"', None,
     "no aws_s3_bucket_public_access_block"),
    ("key-rotation-off", "s3.tf", "enable_key_rotation     = true", "enable_key_rotation     = false",
     "enable_key_rotation must be true"),
    ("versioning-suspended", "s3.tf", 'status = "Enabled"', 'status = "Suspended"', "versioning not Enabled"),
    ("no-checkpoint-expiry", "s3.tf", 'prefix = "checkpoints/"', 'prefix = "tmp/"',
     "no lifecycle rule expiring checkpoints/"),
    ("star-on-star", "iam.tf", 'sid       = "BucketRegion"\n    actions   = ["s3:GetBucketLocation"]\n'
     "    resources = [aws_s3_bucket.data.arn]",
     'sid       = "BucketRegion"\n    actions   = ["*"]\n    resources = ["*"]', "wildcard action"),
    ("service-wildcard", "iam.tf", 'actions   = ["s3:GetObject"]', 'actions   = ["s3:*"]', "wildcard action"),
    ("scopable-action-on-star", "iam.tf", "resources = [aws_ecr_repository.mint_ray.arn]", 'resources = ["*"]',
     "on resource '*'"),
    ("inline-json-policy", "iam.tf", "policy      = data.aws_iam_policy_document.ray_data.json",
     'policy      = jsonencode({ Statement = [{ Effect = "Allow", Action = "*", Resource = "*" }] })',
     "must be data.aws_iam_policy_document"),
    ("admin-managed-policy", "mlflow.tf", "policy/AmazonSSMManagedInstanceCore", "policy/AdministratorAccess",
     "broad managed policy"),
    ("public-database", "mlflow.tf", "publicly_accessible    = false", "publicly_accessible    = true",
     "publicly_accessible must be false"),
    ("unencrypted-database", "mlflow.tf", "storage_encrypted     = true", "storage_encrypted     = false",
     "storage_encrypted must be true"),
    ("literal-db-password", "mlflow.tf", "manage_master_user_password = true", 'password = "hunter2hunter2"',
     "literal password"),
    ("imdsv1", "mlflow.tf", 'http_tokens   = "required"', 'http_tokens   = "optional"', "IMDSv2"),
    ("open-to-internet", "mlflow.tf", "cidr_ipv4         = each.value", 'cidr_ipv4         = "0.0.0.0/0"',
     "open to the internet"),
    ("mutable-image-tags", "ecr.tf", 'image_tag_mutability = "IMMUTABLE"', 'image_tag_mutability = "MUTABLE"',
     "IMMUTABLE"),
    ("undeclared-variable", "s3.tf", "days = var.checkpoint_expiration_days", "days = var.checkpoint_expiry_days",
     "var.checkpoint_expiry_days is not declared"),
    ("undeclared-resource", "iam.tf", "resources = [aws_iam_role.ray_worker.arn]",
     "resources = [aws_iam_role.ray_workers.arn]", "aws_iam_role.ray_workers is not declared"),
    ("syntax-error", "outputs.tf", 'output "bucket_name" {', 'output "bucket_name" {{', "terraform parse"),
]


@pytest.mark.parametrize(("name", "file", "old", "new", "expected"), TF_MISTAKES, ids=[m[0] for m in TF_MISTAKES])
def test_planted_mistake_fails(name: str, file: str, old: str, new: str | None, expected: str,
                               tmp_path: Path) -> None:
    copy = tmp_path / "terraform"
    shutil.copytree(TF_DIR, copy)
    text = (copy / file).read_text()
    assert old in text, f"the mistake {name!r} no longer applies to {file}; update the test"
    if new is None:  # delete the block that starts at `old`, up to its closing brace at column 0
        start = text.index(old)
        text = text[:start] + text[text.index("\n}\n", start) + 3:]
    else:
        text = text.replace(old, new, 1)
    (copy / file).write_text(text)
    problems = vm.check_terraform(copy)
    assert any(expected in p for p in problems), problems
