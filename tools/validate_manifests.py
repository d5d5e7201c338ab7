"""Offline checks for ``cluster/`` and ``infra/terraform/``: no cluster, no cloud calls.

    python -m tools.validate_manifests            # everything; exit 1 on a problem
    python -m tools.validate_manifests --refresh-crds ../shared/schemas/kuberay

Every check returns a list of problems (empty when clean), so the tests can plant
a mistake in a copy and assert that the same check reports it.

- KubeRay documents: the CRD's ``openAPIV3Schema`` for the document's apiVersion
  and kind, made strict (unknown fields rejected), plus the project's rules
  (requests == limits, service account, no literal secrets, /dev/shm on GPU pods).
- The ``ray up`` YAML: the schema inside the ray wheel and Ray's own
  ``prepare_config`` + ``validate_config`` (both local), plus node_config keys.
- Terraform: parsed with python-hcl2; security settings asserted (see
  ``check_terraform``) and every var./local./resource reference declared.
- eksctl nodegroups against the pods (``check_eksctl``); one registry name per task in
  recipes and serve configs (``check_registry_names``); production recipes that name no
  bucket and touch only the roles' prefixes (``check_prod_recipes``).
- yamllint with the repository's ``.yamllint``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

# The CRDs are megabytes of YAML: libyaml's loader when pyyaml has it.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
K8S_DIR = CLUSTER / "kubernetes"
SCHEMA_DIR = CLUSTER / "schemas"
LAUNCHER = CLUSTER / "ray-up-aws.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
TERRAFORM = REPO / "infra" / "terraform"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}

# ---------------------------------------------------------------- JSON schemas

_DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The CRDs leave metadata as a bare object; this subset catches typos like `lables`.
OBJECT_META = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": {"type": "string", "maxLength": 63, "pattern": _DNS1123},
                   "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS1123},
                   "labels": _STR_MAP, "annotations": _STR_MAP},
}


def _core(kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    props = {"apiVersion": {"const": "v1"}, "kind": {"const": kind}, "metadata": OBJECT_META}
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind"],
            "properties": {**props, **(extra or {})}}


# The three core kinds the manifests use, as strict as the CRDs.
CORE_SCHEMAS = {
    ("v1", "Namespace"): _core("Namespace"),
    ("v1", "ServiceAccount"): _core("ServiceAccount", {"automountServiceAccountToken": {"type": "boolean"}}),
    ("v1", "ConfigMap"): _core("ConfigMap", {"data": _STR_MAP}),
}


def strict_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD openAPIV3Schema node as a JSON schema that rejects unknown fields.

    Kubernetes prunes unknown fields silently; a typo in a manifest then just
    vanishes. Every object with ``properties`` gets ``additionalProperties: false``
    unless it preserves unknown fields or already says what extra keys may be.
    """
    s = dict(node)
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    int_or_string = s.pop("x-kubernetes-int-or-string", False)
    for key in [k for k in s if k.startswith("x-kubernetes-")]:
        del s[key]
    if isinstance(s.get("properties"), dict):
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
    for key in ("additionalProperties", "items", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strict_schema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(s.get(key), list):
            s[key] = [strict_schema(v) for v in s[key]]
    if int_or_string and "anyOf" not in s:
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if "properties" in s and "additionalProperties" not in s and not preserve:
        s["additionalProperties"] = False
    return s


def _drop_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_drop_descriptions(v) for v in node]
    return node


def refresh_crd_schemas(crd_dir: Path, out_dir: Path = SCHEMA_DIR) -> list[Path]:
    """Copy each served version's openAPIV3Schema from the KubeRay CRDs, compactly.

    The CRDs are 3.3 MB of YAML; without descriptions the schemas are ~1 MB of
    JSON, kept in the repository so the checks need nothing outside it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, name in CRD_FILES.items():
        crd = yaml.load((crd_dir / name).read_text(), Loader=_Loader)
        versions = {v["name"]: _drop_descriptions(v["schema"]["openAPIV3Schema"])
                    for v in crd["spec"]["versions"] if v.get("served")}
        doc = {"source": name, "group": crd["spec"]["group"], "kind": kind, "versions": versions}
        path = out_dir / f"{kind.lower()}.json"
        path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
        written.append(path)
    return written


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, for the KubeRay kinds and the core ones."""
    schemas = dict(CORE_SCHEMAS)
    for kind in CRD_FILES:
        doc = json.loads((schema_dir / f"{kind.lower()}.json").read_text())
        for version, openapi in doc["versions"].items():
            s = strict_schema(openapi)
            s["properties"]["metadata"] = OBJECT_META
            s["required"] = sorted({*s.get("required", []), "apiVersion", "kind", "metadata", "spec"})
            schemas[(f"{doc['group']}/{version}", kind)] = s
    return schemas


# ------------------------------------------------------------------ Kubernetes


def _path(parts: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a KubeRay document creates."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        cluster, prefix = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    elif doc.get("kind") == "RayService":
        cluster, prefix = spec.get("rayClusterConfig"), "spec.rayClusterConfig"
    elif doc.get("kind") == "RayCluster":
        cluster, prefix = spec, "spec"
    else:
        return
    if not isinstance(cluster, dict):
        return
    head = (cluster.get("headGroupSpec") or {}).get("template")
    if head is not None:
        yield f"{prefix}.headGroupSpec.template", head
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        yield f"{prefix}.workerGroupSpecs[{i}].template", group.get("template") or {}


_SECRET_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIALS?)(_|$)", re.I)


def check_pod_policy(where: str, template: dict[str, Any], gpu_shm: bool = True) -> list[str]:
    """The project's rules for a pod: requests == limits, the S3 service account,
    no literal secrets, and a memory-backed /dev/shm when it asks for GPUs."""
    problems = []
    spec = template.get("spec") or {}
    if not spec.get("serviceAccountName"):
        problems.append(f"{where}: no serviceAccountName (S3 access comes from the IRSA service account)")
    shm_volumes = {v.get("name") for v in spec.get("volumes") or []
                   if (v.get("emptyDir") or {}).get("medium") == "Memory"}
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        name = f"{where}.containers[{c.get('name')}]"
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        if not req or {k: str(v) for k, v in req.items()} != {k: str(v) for k, v in lim.items()}:
            problems.append(f"{name}: resources.requests must equal resources.limits "
                            f"(got requests={req} limits={lim})")
        for env in c.get("env") or []:
            if _SECRET_NAME.search(env.get("name", "")) and "value" in env:
                problems.append(f"{name}: env {env['name']} holds a literal value; use valueFrom.secretKeyRef")
        wants_gpu = any("gpu" in str(k) for k in lim)
        mounts = {m.get("name") for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"}
        if wants_gpu and gpu_shm and not (mounts & shm_volumes):
            problems.append(f"{name}: asks for GPUs but mounts no emptyDir(medium: Memory) at /dev/shm "
                            "(NCCL and the object store need it)")
    return problems


def check_k8s_documents(docs: list[Any], label: str = "<docs>",
                        schemas: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[str]:
    """Each document against its (apiVersion, kind) schema, then the pod rules."""
    from jsonschema import Draft202012Validator

    schemas = schemas if schemas is not None else load_schemas()
    problems = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = f"{label} document {i}"
        if not isinstance(doc, dict):
            problems.append(f"{where}: not a mapping")
            continue
        key = (doc.get("apiVersion"), doc.get("kind"))
        where += f" ({key[1]} {(doc.get('metadata') or {}).get('name')})"
        if key not in schemas:
            known = ", ".join(sorted(f"{v} {k}" for v, k in schemas))
            problems.append(f"{where}: no schema for apiVersion/kind {key}; known: {known}")
            continue
        validator = Draft202012Validator(schemas[key])
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            problems.append(f"{where}: {_path(err.absolute_path) or '<root>'}: {err.message[:300]}")
        for pod_where, template in pod_templates(doc):
            problems += [f"{where}: {p}" for p in check_pod_policy(pod_where, template)]
    return problems


def load_yaml_documents(path: Path) -> list[Any]:
    return list(yaml.load_all(path.read_text(), Loader=_Loader))


def check_k8s_file(path: Path, schemas: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[str]:
    return check_k8s_documents(load_yaml_documents(path), path.name, schemas)


# -------------------------------------------------------------- Ray YAML files

# RunInstances parameters the launcher may pass through node_config; a typo
# (``InstanceTyp``) would otherwise only fail at `ray up` time, in the cloud.
EC2_NODE_CONFIG_KEYS = {
    "InstanceType", "ImageId", "IamInstanceProfile", "BlockDeviceMappings", "SubnetIds",
    "SecurityGroupIds", "KeyName", "InstanceMarketOptions", "NetworkInterfaces", "Placement",
    "TagSpecifications", "MetadataOptions", "CapacityReservationSpecification", "UserData",
    "EbsOptimized", "LaunchTemplate",
}


def check_launcher_config(config: Any) -> list[str]:
    """The `ray up` YAML through Ray's own prepare_config + validate_config (offline:
    the AWS provider's bootstrap, which calls AWS, is not run), plus project rules."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config, dict):
        return ["launcher config is not a mapping"]
    problems = []
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as err:
        problems.append(f"ray-schema.json: {_path(err.absolute_path) or '<root>'}: {err.message[:300]}")
    except (ValueError, KeyError, TypeError, RuntimeError, AssertionError, NotImplementedError) as err:
        problems.append(f"ray validate_config: {type(err).__name__}: {err}")
    if (config.get("provider") or {}).get("type") != "aws":
        problems.append("provider.type must be aws")
    for name, node in (config.get("available_node_types") or {}).items():
        node_config = (node or {}).get("node_config") or {}
        for key in sorted(set(node_config) - EC2_NODE_CONFIG_KEYS):
            problems.append(f"available_node_types.{name}.node_config: unknown EC2 parameter {key!r}")
        if "IamInstanceProfile" not in node_config:
            problems.append(f"available_node_types.{name}.node_config: no IamInstanceProfile "
                            "(S3 access comes from the instance profile, never keys)")
    text = json.dumps(config)
    if re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text):
        problems.append("launcher config contains AWS keys; use the instance profile")
    return problems


def check_runtime_env(env: Any, local_paths: bool = True) -> list[str]:
    """A runtime_env as `ray job submit --runtime-env` reads it: Ray's own type
    checks, and no field Ray would take for an unknown plugin (a typo).
    ``local_paths=False`` for one whose working_dir lives elsewhere (in the image)."""
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return ["runtime_env is not a mapping"]
    problems = [f"runtime_env: unknown field {k!r}; known: {sorted(RuntimeEnv.known_fields)}"
                for k in env if k not in RuntimeEnv.known_fields]
    checked = dict(env)
    if not local_paths and isinstance(checked.get("working_dir"), str):
        if not checked["working_dir"].startswith("/"):
            problems.append(f"runtime_env: working_dir {checked['working_dir']!r} must be absolute")
        checked["working_dir"] = "s3://path-checked-elsewhere/working_dir.zip"
    try:
        RuntimeEnv(**checked)
    except (TypeError, ValueError) as err:
        problems.append(f"runtime_env: {err}")
    for name in (env.get("env_vars") or {}):
        if _SECRET_NAME.search(name):
            problems.append(f"runtime_env.env_vars.{name}: secrets do not belong in a runtime_env file")
    return problems


def check_serve_config(config: Any) -> list[str]:
    """A Ray Serve config (serveConfigV2 / `serve deploy`) against Ray's pydantic
    schema, with unknown keys rejected (Ray's schema ignores them)."""
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    if not isinstance(config, dict):
        return ["serve config is not a mapping"]
    problems = []

    def unknown(data: Any, model: Any, where: str) -> None:
        if isinstance(data, dict):
            problems.extend(f"{where}: unknown key {k!r}" for k in data if k not in model.model_fields)

    unknown(config, ServeDeploySchema, "serve config")
    unknown(config.get("http_options"), HTTPOptionsSchema, "http_options")
    for i, app in enumerate(config.get("applications") or []):
        unknown(app, ServeApplicationSchema, f"applications[{i}]")
        for j, dep in enumerate((app or {}).get("deployments") or []):
            unknown(dep, DeploymentSchema, f"applications[{i}].deployments[{j}]")
            unknown((dep or {}).get("ray_actor_options"), RayActorOptionsSchema,
                    f"applications[{i}].deployments[{j}].ray_actor_options")
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as err:  # pydantic's ValidationError; Ray may wrap it
        problems.append(f"serve config: {str(err)[:500]}")
    return problems


# ------------------------------------------------------------------- Terraform


def load_terraform(tf_dir: Path = TERRAFORM) -> dict[str, Any]:
    """All ``*.tf`` files of a module parsed and merged:
    {"resource": {type: {name: body}}, "data": {...}, "variable": {...}, ...}."""
    import hcl2
    from hcl2.utils import SerializationOptions

    opts = SerializationOptions(with_comments=False, explicit_blocks=False,
                                strip_string_quotes=True, preserve_heredocs=False)
    merged: dict[str, Any] = {"resource": {}, "data": {}, "variable": {}, "output": {},
                              "locals": {}, "module": {}}
    files = sorted(tf_dir.glob("*.tf"))
    if not files:
        raise FileNotFoundError(f"no .tf files in {tf_dir}")
    for path in files:
        with path.open() as f:
            parsed = hcl2.load(f, serialization_options=opts)
        for block in ("resource", "data"):
            for item in parsed.get(block, []):
                for rtype, named in item.items():
                    for name, body in named.items():
                        merged[block].setdefault(rtype, {})[name] = body
        for block in ("variable", "output", "module"):
            for item in parsed.get(block, []):
                merged[block].update(item)
        for item in parsed.get("locals", []):
            merged["locals"].update(item)
    return merged


def _blocks(value: Any) -> list[dict[str, Any]]:
    """A nested block as a list of bodies (hcl2 gives a list; an attribute gives a dict)."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return [value] if isinstance(value, dict) else []


def _refs(resource_type: str, name: str) -> tuple[str, ...]:
    return (f"{resource_type}.{name}.id", f"{resource_type}.{name}.bucket", f"{resource_type}.{name}.arn")


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# Actions that AWS cannot scope to a resource ARN; anything else on "*" is a finding.
UNSCOPABLE_ACTIONS = {"ecr:GetAuthorizationToken", "ec2:Describe*", "ec2:DescribeInstances",
                      "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups",
                      "ec2:DescribeInstanceTypes", "ec2:DescribeAvailabilityZones",
                      "ec2:DescribeKeyPairs", "sts:GetCallerIdentity"}
_POLICY_DOC = r"\$\{data\.aws_iam_policy_document\.\w+(\[0\])?\.json\}"
FORBIDDEN_MANAGED_POLICIES = re.compile(r"AdministratorAccess|FullAccess|PowerUser")


def check_iam_statements(tf: dict[str, Any]) -> list[str]:
    problems = []
    docs = tf["data"].get("aws_iam_policy_document", {})
    for doc_name, body in docs.items():
        for i, st in enumerate(_blocks(body.get("statement"))):
            where = f"data.aws_iam_policy_document.{doc_name}.statement[{i}]"
            if st.get("effect", "Allow") != "Allow":
                continue
            if "not_actions" in st or "not_resources" in st:
                problems.append(f"{where}: Allow with not_actions/not_resources grants everything else")
            actions = [str(a) for a in _as_list(st.get("actions", []))]
            resources = [str(r) for r in _as_list(st.get("resources", []))]
            for p in _blocks(st.get("principals")):
                if "*" in [str(x) for x in _as_list(p.get("identifiers", []))]:
                    problems.append(f"{where}: Allow to principal '*'")
            if any(a == "*" or a.endswith(":*") for a in actions):
                problems.append(f"{where}: wildcard action {actions}")
            if "*" in resources and not set(actions) <= UNSCOPABLE_ACTIONS:
                problems.append(f"{where}: actions {sorted(set(actions) - UNSCOPABLE_ACTIONS)} "
                                "on resource '*'")
    # Every policy must be a policy document the check above can see.
    for rtype in ("aws_iam_policy", "aws_iam_role_policy", "aws_s3_bucket_policy", "aws_kms_key"):
        for name, body in tf["resource"].get(rtype, {}).items():
            policy = body.get("policy")
            if policy is not None and not re.fullmatch(_POLICY_DOC,
                                                       str(policy)):
                problems.append(f"{rtype}.{name}.policy must be data.aws_iam_policy_document.<x>.json")
    for name, body in tf["resource"].get("aws_iam_role", {}).items():
        if not re.fullmatch(_POLICY_DOC,
                            str(body.get("assume_role_policy"))):
            problems.append(f"aws_iam_role.{name}.assume_role_policy must be a policy document")
        if "inline_policy" in body or "managed_policy_arns" in body:
            problems.append(f"aws_iam_role.{name}: attach policies with separate resources")
    for rtype in ("aws_iam_role_policy_attachment", "aws_iam_policy_attachment"):
        for name, body in tf["resource"].get(rtype, {}).items():
            if FORBIDDEN_MANAGED_POLICIES.search(str(body.get("policy_arn"))):
                problems.append(f"{rtype}.{name}: broad managed policy {body.get('policy_arn')}")
    return problems


def check_s3(tf: dict[str, Any]) -> list[str]:
    res = tf["resource"]
    problems = []
    buckets = res.get("aws_s3_bucket", {})
    if not buckets:
        problems.append("no aws_s3_bucket")

    def for_bucket(rtype: str, bucket: str) -> list[tuple[str, dict[str, Any]]]:
        return [(n, b) for n, b in res.get(rtype, {}).items()
                if any(r in str(b.get("bucket")) for r in _refs("aws_s3_bucket", bucket))]

    keys = res.get("aws_kms_key", {})
    for name, key in keys.items():
        if key.get("enable_key_rotation") is not True:
            problems.append(f"aws_kms_key.{name}: enable_key_rotation must be true")
    for bucket, body in buckets.items():
        where = f"aws_s3_bucket.{bucket}"
        if body.get("acl") not in (None, "private"):
            problems.append(f"{where}: acl {body.get('acl')!r}")
        if body.get("force_destroy") is True:
            problems.append(f"{where}: force_destroy = true deletes versioned data on destroy")
        pabs = for_bucket("aws_s3_bucket_public_access_block", bucket)
        flags = ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets")
        if not pabs:
            problems.append(f"{where}: no aws_s3_bucket_public_access_block")
        for n, pab in pabs:
            problems += [f"aws_s3_bucket_public_access_block.{n}: {f} must be true"
                         for f in flags if pab.get(f) is not True]
        sses = for_bucket("aws_s3_bucket_server_side_encryption_configuration", bucket)
        if not sses:
            problems.append(f"{where}: no server-side encryption configuration")
        for n, sse in sses:
            for rule in _blocks(sse.get("rule")) or [{}]:
                default = (_blocks(rule.get("apply_server_side_encryption_by_default")) or [{}])[0]
                if default.get("sse_algorithm") not in ("aws:kms", "aws:kms:dsse"):
                    problems.append(f"aws_s3_bucket_server_side_encryption_configuration.{n}: "
                                    f"sse_algorithm must be aws:kms (got {default.get('sse_algorithm')!r})")
                if not re.search(r"aws_kms_key\.\w+\.(arn|id)", str(default.get("kms_master_key_id"))):
                    problems.append(f"aws_s3_bucket_server_side_encryption_configuration.{n}: "
                                    "kms_master_key_id must be this module's aws_kms_key")
        versioning = for_bucket("aws_s3_bucket_versioning", bucket)
        if not any((_blocks(v.get("versioning_configuration")) or [{}])[0].get("status") == "Enabled"
                   for _, v in versioning):
            problems.append(f"{where}: versioning not Enabled")
        lifecycles = for_bucket("aws_s3_bucket_lifecycle_configuration", bucket)
        rules = [r for _, lc in lifecycles for r in _blocks(lc.get("rule"))]
        if not any("checkpoints/" in json.dumps(r.get("filter")) and r.get("expiration") for r in rules):
            problems.append(f"{where}: no lifecycle rule expiring checkpoints/")
        if not any(r.get("noncurrent_version_expiration") for r in rules):
            problems.append(f"{where}: no lifecycle rule expiring noncurrent versions")
        for n, acl in for_bucket("aws_s3_bucket_acl", bucket):
            if "public" in str(acl.get("acl")):
                problems.append(f"aws_s3_bucket_acl.{n}: public ACL")
    return problems


def check_network_and_db(tf: dict[str, Any]) -> list[str]:
    res = tf["resource"]
    problems = []
    for name, db in res.get("aws_db_instance", {}).items():
        where = f"aws_db_instance.{name}"
        if db.get("storage_encrypted") is not True:
            problems.append(f"{where}: storage_encrypted must be true")
        if db.get("publicly_accessible") is not False:
            problems.append(f"{where}: publicly_accessible must be false")
        if "password" in db:
            problems.append(f"{where}: literal password; use manage_master_user_password")
    for name, inst in res.get("aws_instance", {}).items():
        where = f"aws_instance.{name}"
        meta = (_blocks(inst.get("metadata_options")) or [{}])[0]
        if meta.get("http_tokens") != "required":
            problems.append(f"{where}: metadata_options.http_tokens must be \"required\" (IMDSv2)")
        root = (_blocks(inst.get("root_block_device")) or [{}])[0]
        if root.get("encrypted") is not True:
            problems.append(f"{where}: root_block_device.encrypted must be true")
    open_cidrs = ("0.0.0.0/0", "::/0")
    for name, sg in res.get("aws_security_group", {}).items():
        for rule in _blocks(sg.get("ingress")):
            if any(c in open_cidrs for c in _strings(rule)):
                problems.append(f"aws_security_group.{name}: ingress open to the internet")
    for rtype in ("aws_vpc_security_group_ingress_rule", "aws_security_group_rule"):
        for name, rule in res.get(rtype, {}).items():
            if rule.get("type", "ingress") == "ingress" and any(c in open_cidrs for c in _strings(rule)):
                problems.append(f"{rtype}.{name}: ingress open to the internet")
    for name, repo in res.get("aws_ecr_repository", {}).items():
        if repo.get("image_tag_mutability") != "IMMUTABLE":
            problems.append(f"aws_ecr_repository.{name}: image_tag_mutability must be IMMUTABLE")
    return problems


_REF = re.compile(r"(?<![\w.])(var|local|data|aws_\w+)\.(\w+)(?:\.(\w+))?")


def check_references(tf: dict[str, Any]) -> list[str]:
    """What `terraform validate` would catch first: references to undeclared
    variables, locals, data sources and resources."""
    problems = set()
    declared_res = {(t, n) for t, named in tf["resource"].items() for n in named}
    declared_data = {(t, n) for t, named in tf["data"].items() for n in named}
    for text in _strings(tf):
        if "${" in text:
            for kind, a, b in _REF.findall(text):
                if kind == "var" and a not in tf["variable"]:
                    problems.add(f"var.{a} is not declared")
                elif kind == "local" and a not in tf["locals"]:
                    problems.add(f"local.{a} is not defined")
                elif kind == "data" and b and (a, b) not in declared_data:
                    problems.add(f"data.{a}.{b} is not declared")
                elif kind.startswith("aws_") and (kind, a) not in declared_res:
                    problems.add(f"{kind}.{a} is not declared")
    return sorted(problems)


def check_terraform(tf_dir: Path = TERRAFORM) -> list[str]:
    try:
        tf = load_terraform(tf_dir)
    except Exception as err:  # hcl2 raises lark errors of several types
        return [f"terraform parse: {type(err).__name__}: {str(err)[:300]}"]
    return check_s3(tf) + check_iam_statements(tf) + check_network_and_db(tf) + check_references(tf)


# ------------------------------------------------- the production chain's names

RECIPE_DIR = REPO / "jobs" / "recipes"
STORAGE_ROOT_ENV = "${env:MINT_STORAGE_ROOT}"
_MODELS_URI = re.compile(r"models:/([^/@\s]+)(?:([/@])([^\s/]+))?")


def _walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _registry_names(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, registered model name) for every name a recipe spells out."""
    for where, text in _walk_strings(doc):
        for m in _MODELS_URI.finditer(text):
            if not m.group(1).startswith("m-"):  # models:/m-<id> is a logged model, not a name
                yield where, m.group(1)

    def registries(node: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            reg = node.get("registry")
            if isinstance(reg, dict) and reg.get("name"):
                yield f"{path}registry.name", str(reg["name"])
            for k, v in node.items():
                yield from registries(v, f"{path}{k}.")

    yield from registries(doc, "")
    if "alias" in doc and doc.get("name"):  # a promotion recipe
        yield "name", str(doc["name"])


def serve_configs(root: Path = REPO) -> list[tuple[str, dict[str, Any]]]:
    """(label, serve config) of serving/config.yaml and every RayService's serveConfigV2."""
    out = []
    local = root / "serving" / "config.yaml"
    if local.is_file():
        out.append(("serving/config.yaml", yaml.safe_load(local.read_text())))
    for path in sorted((root / "cluster" / "kubernetes").glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if isinstance(doc, dict) and doc.get("kind") == "RayService":
                name = (doc.get("metadata") or {}).get("name")
                out.append((f"{path.name} RayService {name}", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


def check_registry_names(root: Path = REPO) -> list[str]:
    """Every registered-model name in the recipes and serve configs is its task's one name
    (``Task.registered_model``), and every alias served is one a promotion recipe sets."""
    from mint_ray.tasks import TASKS

    problems = []
    aliases: dict[str, set[str]] = {}
    for path in sorted((root / "jobs" / "recipes").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        task = doc.get("task")
        if "alias" in doc and task in TASKS:
            aliases.setdefault(task, set()).add(str(doc["alias"]))
        for where, name in _registry_names(doc):
            if task not in TASKS:
                problems.append(f"{path.name}: {where} names registered model {name!r} but the recipe has no task")
            elif name != TASKS[task].registered_model:
                problems.append(f"{path.name}: {where} names registered model {name!r}, but task {task}'s one name "
                                f"is {TASKS[task].registered_model!r} (Task.registered_model in mint_ray/tasks/)")
    for label, config in serve_configs(root):
        for i, app in enumerate((config or {}).get("applications") or []):
            args = app.get("args") or {}
            m = _MODELS_URI.fullmatch(str(args.get("model_uri", "")))
            task = args.get("task")
            if not m:
                continue
            where = f"{label}: applications[{i}].args.model_uri"
            if task not in TASKS:
                problems.append(f"{where}: a registered model needs args.task (one of {', '.join(sorted(TASKS))})")
                continue
            if m.group(1) != TASKS[task].registered_model:
                problems.append(f"{where} serves {m.group(1)!r}, but task {task}'s registered model is "
                                f"{TASKS[task].registered_model!r}")
            if m.group(2) == "@" and m.group(3) not in aliases.get(task, set()):
                problems.append(f"{where} serves alias @{m.group(3)}, which no promotion recipe of task {task} sets "
                                f"(they set: {sorted(aliases.get(task, set())) or 'none'})")
    return problems


def terraform_prefixes(tf_dir: Path = TERRAFORM) -> tuple[list[str], list[str]]:
    """(read/write, read-only) bucket prefixes of the Ray roles: the variables' defaults."""
    tf = load_terraform(tf_dir)
    return list(tf["variable"]["stage_prefixes"]["default"]), list(tf["variable"]["input_prefixes"]["default"])


def check_prod_recipes(root: Path = REPO) -> list[str]:
    """Production recipes name no bucket: storage.root is ``${env:MINT_STORAGE_ROOT}`` and
    every URI is under ``${storage.root}/<prefix>``, a prefix the Ray roles may touch."""
    problems = []
    stage, inputs = terraform_prefixes(root / "infra" / "terraform")
    recipes = sorted((root / "jobs" / "recipes").glob("prod_*.yaml"))
    if not recipes:
        problems.append("no jobs/recipes/prod_*.yaml")
    for path in recipes:
        doc = yaml.safe_load(path.read_text()) or {}
        if (doc.get("storage") or {}).get("root") != STORAGE_ROOT_ENV:
            problems.append(f"{path.name}: storage.root must be {STORAGE_ROOT_ENV!r} (the bucket is set once, "
                            "in the nodes' environment)")
        for where, text in _walk_strings(doc):
            if "s3://" in text:
                problems.append(f"{path.name}: {where} = {text!r} names a bucket; write ${{storage.root}}/<prefix>/...")
            if text.startswith("${storage.root}/"):
                prefix = text[len("${storage.root}/"):].split("/", 1)[0]
                if prefix not in stage + inputs:
                    problems.append(f"{path.name}: {where} is under {prefix}/, which the Ray roles cannot touch "
                                    f"(infra/terraform stage_prefixes {stage}, input_prefixes {inputs})")
    jobs = {m.group(1) for p in sorted((root / "cluster" / "kubernetes").glob("*.yaml"))
            for d in load_yaml_documents(p) if isinstance(d, dict) and d.get("kind") == "RayJob"
            for m in [re.search(r"--config jobs/recipes/(\S+)", str((d.get("spec") or {}).get("entrypoint")))] if m}
    problems += [f"{p.name}: no RayJob in cluster/kubernetes runs it" for p in recipes if p.name not in jobs]
    return problems


# ------------------------------------------------------------------- eksctl

ACCELERATOR_LABEL = "k8s.amazonaws.com/accelerator"
_INSTANCE_TYPE = "node.kubernetes.io/instance-type"


def _is_gpu_group(group: dict[str, Any]) -> bool:
    return (str(group.get("instanceType", "")).startswith(("g", "p"))
            or any(t.get("key") == "nvidia.com/gpu" for t in group.get("taints") or []))


def check_eksctl(config: Any, docs: list[Any]) -> list[str]:
    """The EKS nodegroups against the pods that need them: a group for every pod's instance
    type (taints tolerated), the accelerator label on GPU groups (the Cluster Autoscaler scales
    them from zero by it), room for a RayService NewCluster upgrade (two of each pod), and
    RayJob submitters on the training head's node type."""
    if not isinstance(config, dict):
        return ["eksctl config is not a mapping"]
    problems = []
    groups = {g.get("instanceType"): g for g in config.get("managedNodeGroups") or []}
    for g in groups.values():
        if _is_gpu_group(g) and not (g.get("labels") or {}).get(ACCELERATOR_LABEL):
            problems.append(f"nodegroup {g.get('name')}: a GPU group without the {ACCELERATOR_LABEL} label "
                            "(the Cluster Autoscaler cannot tell it brings GPUs while it is at zero)")
    heads = [(t.get("spec") or {}).get("nodeSelector", {}).get(_INSTANCE_TYPE)
             for d in docs if isinstance(d, dict) and d.get("kind") == "RayCluster"
             for w, t in pod_templates(d) if w.endswith("headGroupSpec.template")]
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") not in ("RayCluster", "RayService", "RayJob"):
            continue
        name = f"{doc['kind']} {(doc.get('metadata') or {}).get('name')}"
        upgrade = (((doc.get("spec") or {}).get("upgradeStrategy") or {}).get("type") == "NewCluster")
        cluster = (doc.get("spec") or {}).get("rayClusterConfig") or {}
        for where, template in pod_templates(doc):
            pod = template.get("spec") or {}
            itype = (pod.get("nodeSelector") or {}).get(_INSTANCE_TYPE)
            group = groups.get(itype)
            if group is None:
                problems.append(f"{name}: {where}: no nodegroup of instance type {itype!r}")
                continue
            taints = {(t.get("key"), t.get("effect")) for t in group.get("taints") or []}
            tolerated = {(t.get("key"), t.get("effect")) for t in pod.get("tolerations") or []}
            if not taints <= tolerated:
                problems.append(f"{name}: {where}: does not tolerate the taints of nodegroup {group.get('name')}")
            if where.endswith("submitterPodTemplate") and heads and itype not in heads:
                problems.append(f"{name}: {where}: the submitter must run on the head's node type {heads[0]} "
                                f"(got {itype!r})")
            if upgrade:
                count = 1
                if "workerGroupSpecs" in where:
                    i = int(re.search(r"workerGroupSpecs\[(\d+)\]", where).group(1))
                    spec = cluster["workerGroupSpecs"][i]
                    count = max(int(spec.get("minReplicas", 0)), int(spec.get("replicas", 0)), 1)
                if int(group.get("maxSize", 0)) < 2 * count:
                    problems.append(f"{name}: upgradeStrategy NewCluster starts a second cluster beside the first, "
                                    f"but nodegroup {group.get('name')} (maxSize {group.get('maxSize')}) cannot "
                                    f"hold two of {where}")
    return problems


# --------------------------------------------------------------------- yamllint


def yaml_files(root: Path = REPO) -> list[Path]:
    paths = sorted((root / "cluster").rglob("*.yaml")) + sorted((root / "jobs" / "recipes").glob("*.yaml"))
    serving = root / "serving" / "config.yaml"
    return paths + ([serving] if serving.is_file() else [])


def lint_yaml(path: Path, text: str | None = None, config_file: Path = REPO / ".yamllint") -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(config_file))
    source = path.read_text() if text is None else text
    return [f"{path.name}:{p.line}:{p.column}: [{p.level}] {p.message} ({p.rule})"
            for p in linter.run(source, conf, str(path))]


# -------------------------------------------------------------------------- CLI


def check_all(root: Path = REPO) -> list[str]:
    problems: list[str] = []
    schemas = load_schemas(root / "cluster" / "schemas")
    for path in sorted((root / "cluster" / "kubernetes").glob("*.yaml")):
        problems += check_k8s_file(path, schemas)
    problems += check_launcher_config(yaml.safe_load((root / "cluster" / LAUNCHER.name).read_text()))
    problems += check_runtime_env(yaml.safe_load((root / "cluster" / RUNTIME_ENV.name).read_text()))
    problems += check_terraform(root / "infra" / "terraform")
    k8s_docs = [d for p in sorted((root / "cluster" / "kubernetes").glob("*.yaml")) for d in load_yaml_documents(p)]
    problems += check_eksctl(yaml.safe_load((root / "cluster" / "eksctl-cluster.yaml").read_text()), k8s_docs)
    problems += check_registry_names(root)
    problems += check_prod_recipes(root)
    for path in yaml_files(root):
        problems += lint_yaml(path, config_file=root / ".yamllint")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refresh-crds", metavar="DIR",
                        help="re-extract cluster/schemas/*.json from KubeRay CRD YAMLs in DIR")
    args = parser.parse_args(argv)
    if args.refresh_crds:
        for path in refresh_crd_schemas(Path(args.refresh_crds)):
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    problems = check_all()
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "all cluster and infra files pass")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
