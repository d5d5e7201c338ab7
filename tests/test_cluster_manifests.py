"""Offline validation of cluster/: no Kubernetes, no AWS.

Each KubeRay document against the CRD schema of its kind and version (unknown
fields rejected), the `ray up` YAML through the schema in the ray wheel and
Ray's own validate_config, the runtime_env through Ray's RuntimeEnv, the serve
config through Ray Serve's schema, and yamllint on every YAML file. For each
check, a copy of a file with a planted mistake must fail it.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import plant, repo_copy
from tools import validate_manifests as vm

# Ray Serve's schema module emits pydantic deprecation warnings on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = vm.REPO
K8S_FILES = sorted(vm.K8S_DIR.glob("*.yaml"))
SHARED_CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
IMAGE_RE = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/mint-ray:[\w.-]+$")


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    return vm.load_schemas()


@functools.cache
def docs_of(path: Path) -> list[dict[str, Any]]:
    """Parsed once; tests that change documents deep-copy them first."""
    return [d for d in vm.load_yaml_documents(path) if d is not None]


def all_docs() -> list[dict[str, Any]]:
    return [d for p in K8S_FILES for d in docs_of(p)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in all_docs() if d["kind"] == kind]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for _, t in vm.pod_templates(doc) for c in t["spec"]["containers"]]


# ------------------------------------------------------------------ schemas


def test_schema_copies_match_the_shared_crds(tmp_path: Path) -> None:
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} not present; the copies in cluster/schemas/ are used as they are")
    vm.refresh_crd_schemas(SHARED_CRDS, tmp_path)
    for kind in vm.CRD_FILES:
        name = f"{kind.lower()}.json"
        assert (tmp_path / name).read_text() == (vm.SCHEMA_DIR / name).read_text(), (
            f"cluster/schemas/{name} is stale: python -m tools.validate_manifests "
            f"--refresh-crds {SHARED_CRDS}")


def test_schema_copies_are_compact_and_cover_each_kind(schemas: dict) -> None:
    total = sum(p.stat().st_size for p in vm.SCHEMA_DIR.glob("*.json"))
    assert total < 2_000_000
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert ("ray.io/v1", kind) in schemas


def test_strict_schema_rejects_unknown_fields_where_kubernetes_would_prune() -> None:
    s = vm.strict_schema({
        "type": "object",
        "properties": {
            "typed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "string"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "port": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
            "list": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        },
    })
    from jsonschema import Draft202012Validator

    v = Draft202012Validator(s)
    ok = {"typed": {"a": "x"}, "free": {"a": "x", "other": 1}, "labels": {"k": "v"},
          "port": "http", "maybe": None, "list": [{"b": 1}]}
    assert list(v.iter_errors(ok)) == []
    assert not v.is_valid({**ok, "typo": 1})
    assert not v.is_valid({**ok, "typed": {"a": "x", "b": 1}})
    assert not v.is_valid({**ok, "list": [{"b": 1, "c": 2}]})
    assert not v.is_valid({**ok, "port": 1.5})
    assert v.is_valid({**ok, "port": 8080})


# ------------------------------------------------------- KubeRay documents


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_documents_pass_their_schemas(path: Path, schemas: dict) -> None:
    assert vm.check_k8s_file(path, schemas) == []


def test_manifests_define_cluster_jobs_and_service() -> None:
    kinds = [d["kind"] for d in all_docs()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1
    assert kinds.count("RayJob") >= 6
    assert {"Namespace", "ServiceAccount", "ConfigMap"} <= set(kinds)
    assert all(d["apiVersion"] == "ray.io/v1" for d in all_docs() if d["kind"].startswith("Ray"))


def gpu_groups(cluster_spec: dict[str, Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    out = {}
    for g in cluster_spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            out[g["groupName"]] = (int(limits["nvidia.com/gpu"]), g)
    return out


def test_raycluster_shape() -> None:
    (cluster,) = by_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "cpu" in groups
    gpus = gpu_groups(spec)
    # 8-GPU nodes for the 11B vision student, smaller GPU nodes for the 3B.
    assert any(n == 8 for n, _ in gpus.values())
    assert any(n < 8 for n, _ in gpus.values())
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
    # GPU groups scale from zero: nothing idles on an 8-GPU node between stages.
    assert all(g["minReplicas"] == 0 for _, g in gpu_groups(spec).values())
    for _, group in gpus.values():
        pod = group["template"]["spec"]
        assert pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_every_pod_runs_the_one_image_as_the_irsa_service_account() -> None:
    (sa,) = by_kind("ServiceAccount")
    role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/mint-ray-ray-pods", role)
    images = set()
    for doc in all_docs():
        for where, template in vm.pod_templates(doc):
            assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"], where
            images |= {c["image"] for c in template["spec"]["containers"]}
    assert len(images) == 1 and IMAGE_RE.match(images.pop())
    text = "\n".join(p.read_text() for p in K8S_FILES)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", text, re.I)


def test_policy_checks_see_every_pod() -> None:
    (cluster,) = by_kind("RayCluster")
    (service,) = by_kind("RayService")
    assert len(list(vm.pod_templates(cluster))) == 1 + len(cluster["spec"]["workerGroupSpecs"])
    assert len(list(vm.pod_templates(service))) == 2
    for job in by_kind("RayJob"):
        assert [w for w, _ in vm.pod_templates(job)] == ["spec.submitterPodTemplate"]


# Planted mistakes: (name, applies to a document?, mutate the document, expected text in a problem)
def _first_container(doc: dict[str, Any]) -> dict[str, Any]:
    return next(t for _, t in vm.pod_templates(doc))["spec"]["containers"][0]


def _first_pod(doc: dict[str, Any]) -> dict[str, Any]:
    return next(t for _, t in vm.pod_templates(doc))["spec"]


def _has_pods(doc: dict[str, Any]) -> bool:
    return any(True for _ in vm.pod_templates(doc))


def _set(obj: dict[str, Any], key: str, value: Any) -> None:
    obj[key] = value


K8S_MISTAKES: list[tuple[str, Callable[[dict], bool], Callable[[dict], None], str]] = [
    ("unknown-spec-field", lambda d: "spec" in d,
     lambda d: _set(d["spec"], "replicaz", 2), "'replicaz' was unexpected"),
    ("unknown-metadata-field", lambda d: True,
     lambda d: _set(d["metadata"], "lables", {"a": "b"}), "'lables' was unexpected"),
    ("unknown-field-deep-in-container", _has_pods,
     lambda d: _set(_first_container(d)["resources"], "limit", {"cpu": "1"}), "'limit' was unexpected"),
    ("wrong-type", _has_pods,
     lambda d: _set(_first_container(d), "ports", [{"containerPort": "http"}]), "is not of type 'integer'"),
    ("bad-quantity", _has_pods,
     lambda d: _set(_first_container(d)["resources"]["limits"], "memory", "lots"), "does not match"),
    ("wrong-api-version", lambda d: d["kind"].startswith("Ray"),
     lambda d: _set(d, "apiVersion", "ray.io/v2"), "no schema for apiVersion/kind"),
    ("requests-differ-from-limits", _has_pods,
     lambda d: _set(_first_container(d)["resources"]["limits"], "cpu", "999"), "must equal resources.limits"),
    ("literal-secret", _has_pods,
     lambda d: _first_container(d).setdefault("env", []).append(
         {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-in-a-manifest"}), "literal value"),
    ("no-service-account", _has_pods,
     lambda d: _first_pod(d).pop("serviceAccountName"), "no serviceAccountName"),
    ("configmap-value-not-string", lambda d: d["kind"] == "ConfigMap",
     lambda d: _set(d["data"], "NUMBER", 3), "is not of type 'string'"),
]


def _k8s_cases() -> list[Any]:
    cases = []
    for path in K8S_FILES:
        for name, applies, mutate, expected in K8S_MISTAKES:
            index = next((i for i, d in enumerate(docs_of(path)) if applies(d)), None)
            if index is not None:
                cases.append(pytest.param(path, index, mutate, expected, id=f"{path.name}-{name}"))
    return cases


@pytest.mark.parametrize(("path", "index", "mutate", "expected"), _k8s_cases())
def test_planted_mistake_in_a_kubernetes_file_fails(path: Path, index: int, mutate: Callable,
                                                    expected: str, tmp_path: Path, schemas: dict) -> None:
    docs = copy.deepcopy(docs_of(path))
    mutate(docs[index])
    broken = tmp_path / path.name
    broken.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    problems = vm.check_k8s_file(broken, schemas)
    assert any(expected in p for p in problems), problems


def test_gpu_pod_without_shared_memory_fails(schemas: dict) -> None:
    (cluster,) = copy.deepcopy(by_kind("RayCluster"))
    group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"].startswith("gpu"))
    group["template"]["spec"]["containers"][0]["volumeMounts"] = []
    problems = vm.check_k8s_documents([cluster], "copy", schemas)
    assert any("/dev/shm" in p for p in problems), problems


# ----------------------------------------------------------------- RayJobs

JOB_ENTRYPOINT = re.compile(r"^python jobs/(\w+)\.py --config (jobs/recipes/[\w-]+\.yaml)$")
STAGES = {"synth_data", "train_teacher", "build_preferences", "train_student", "evaluate", "promote"}


def test_a_rayjob_per_stage_on_the_shared_cluster() -> None:
    (cluster,) = by_kind("RayCluster")
    scripts = set()
    for job in by_kind("RayJob"):
        spec = job["spec"]
        m = JOB_ENTRYPOINT.match(spec["entrypoint"])
        assert m, spec["entrypoint"]
        scripts.add(m.group(1))
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
        assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes", False)
    assert scripts == STAGES
    recipes = {JOB_ENTRYPOINT.match(j["spec"]["entrypoint"]).group(2) for j in by_kind("RayJob")}
    assert recipes >= {
        "jobs/recipes/prod_text_orpo.yaml", "jobs/recipes/prod_vision_orpo.yaml",
        "jobs/recipes/prod_preferences_rare_disease.yaml", "jobs/recipes/prod_preferences_tissue.yaml",
        "jobs/recipes/prod_evaluate_text.yaml"}


def test_rayjob_scripts_and_recipes_exist() -> None:
    entrypoints = [JOB_ENTRYPOINT.match(j["spec"]["entrypoint"]) for j in by_kind("RayJob")]
    missing = [f"jobs/{m.group(1)}.py" for m in entrypoints if not (REPO / f"jobs/{m.group(1)}.py").is_file()]
    missing += [m.group(2) for m in entrypoints if not (REPO / m.group(2)).is_file()]
    assert not missing, f"referenced by cluster/kubernetes/rayjobs.yaml but missing: {sorted(set(missing))}"


def test_rayjobs_carry_the_runtime_env_file() -> None:
    env = yaml.safe_load(vm.RUNTIME_ENV.read_text())
    for job in by_kind("RayJob"):
        job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
        assert vm.check_runtime_env(job_env, local_paths=False) == []
        assert job_env["env_vars"] == env["env_vars"], job["metadata"]["name"]
        assert job_env["worker_process_setup_hook"] == env["worker_process_setup_hook"], job["metadata"]["name"]
        # The submitter pod uploads the repository copy baked into the image.
        assert job_env["working_dir"] == "/home/ray/mint-ray"
    dockerfile = (vm.CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/mint-ray" in dockerfile


# -------------------------------------------------------------- RayService


def serve_config_of_rayservice() -> dict[str, Any]:
    (service,) = by_kind("RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_serve_config_is_valid() -> None:
    config = serve_config_of_rayservice()
    assert vm.check_serve_config(config) == []
    assert {a["import_path"] for a in config["applications"]} == {"mint_ray.serving.app:build_app"}
    assert config["http_options"]["host"] == "0.0.0.0"


def test_rayservice_matches_serving_config() -> None:
    path = REPO / "serving" / "config.yaml"
    local = yaml.safe_load(path.read_text())
    assert vm.check_serve_config(local) == []
    cluster = serve_config_of_rayservice()

    def apps(cfg: dict[str, Any]) -> dict[str, tuple[str, str]]:
        return {a["name"]: (a["import_path"], a.get("route_prefix", "/")) for a in cfg["applications"]}

    assert apps(cluster) == apps(local)


SERVE_MISTAKES = [
    ("unknown-app-key", lambda c: _set(c["applications"][0], "improt_path", "x"), "unknown key 'improt_path'"),
    ("unknown-deployment-key", lambda c: _set(c["applications"][0]["deployments"][0], "num_replica", 2),
     "unknown key 'num_replica'"),
    ("wrong-type", lambda c: _set(c["applications"][0]["deployments"][0], "num_replicas", "one"), "num_replicas"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), SERVE_MISTAKES, ids=[m[0] for m in SERVE_MISTAKES])
def test_planted_mistake_in_serve_config_fails(name: str, mutate: Callable, expected: str) -> None:
    config = copy.deepcopy(serve_config_of_rayservice())
    mutate(config)
    problems = vm.check_serve_config(config)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------- ray up YAML


def launcher() -> dict[str, Any]:
    return yaml.safe_load(vm.LAUNCHER.read_text())


def test_launcher_passes_rays_own_validation() -> None:
    assert vm.check_launcher_config(launcher()) == []


def test_launcher_matches_the_kuberay_cluster() -> None:
    config = launcher()
    (cluster,) = by_kind("RayCluster")
    k8s_image = {c["image"] for c in containers(cluster)}
    assert k8s_image == {config["docker"]["image"]}
    k8s_types = {t["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
                 for _, t in vm.pod_templates(cluster)}
    launcher_types = {n["node_config"]["InstanceType"] for n in config["available_node_types"].values()}
    assert launcher_types == k8s_types
    head = config["available_node_types"][config["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "mint-ray-ray-head"}
    for name, node in config["available_node_types"].items():
        if name != config["head_node_type"]:
            assert node["node_config"]["IamInstanceProfile"] == {"Name": "mint-ray-ray-worker"}
            assert node["max_workers"] >= 1 and node.get("min_workers", 0) == 0
    (cm,) = by_kind("ConfigMap")
    run_env = dict(o.removeprefix("--env ").split("=", 1) for o in config["docker"]["run_options"]
                   if o.startswith("--env "))
    assert run_env["MLFLOW_TRACKING_URI"] == cm["data"]["MLFLOW_TRACKING_URI"]
    assert run_env["MINT_STORAGE_ROOT"] == cm["data"]["MINT_STORAGE_ROOT"]  # the one bucket setting
    assert run_env["AWS_DEFAULT_REGION"] == cm["data"]["AWS_DEFAULT_REGION"] == config["provider"]["region"]


def test_eksctl_nodegroups_carry_every_ray_group() -> None:
    config = yaml.safe_load((vm.CLUSTER / "eksctl-cluster.yaml").read_text())
    groups = {g["instanceType"]: g for g in config["managedNodeGroups"]}
    for doc in by_kind("RayCluster") + by_kind("RayService"):
        for where, template in vm.pod_templates(doc):
            pod = template["spec"]
            group = groups.get(pod["nodeSelector"]["node.kubernetes.io/instance-type"])
            assert group, f"{where}: no nodegroup for {pod['nodeSelector']}"
            taints = {(t["key"], t["effect"]) for t in group.get("taints", [])}
            tolerated = {(t["key"], t["effect"]) for t in pod.get("tolerations", [])}
            assert taints <= tolerated, where
            assert group["maxSize"] >= 1
    (cm,) = by_kind("ConfigMap")
    assert config["metadata"]["region"] == cm["data"]["AWS_DEFAULT_REGION"]
    assert config["iam"]["withOIDC"] is True


LAUNCHER_MISTAKES = [
    ("unknown-top-level-key", lambda c: _set(c, "max_worker", 4), "'max_worker' was unexpected"),
    ("wrong-type", lambda c: _set(c, "max_workers", "sixteen"), "is not of type 'integer'"),
    ("unknown-node-type-key", lambda c: _set(c["available_node_types"]["cpu"], "min_worker", 1),
     "'min_worker' was unexpected"),
    ("head-type-missing", lambda c: _set(c, "head_node_type", "no-such-type"), "head_node_type"),
    ("min-workers-over-max", lambda c: _set(c["available_node_types"]["cpu"], "min_workers", 99), "max_workers"),
    ("node-config-typo", lambda c: _set(c["available_node_types"]["cpu"]["node_config"], "InstanceTyp",
                                        "m7i.large"), "unknown EC2 parameter 'InstanceTyp'"),
    ("no-instance-profile", lambda c: c["available_node_types"]["gpu_a100_x8"]["node_config"].pop(
        "IamInstanceProfile"), "no IamInstanceProfile"),
    ("aws-keys", lambda c: c["docker"]["run_options"].append("--env AWS_SECRET_ACCESS_KEY=abc"), "AWS keys"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), LAUNCHER_MISTAKES, ids=[m[0] for m in LAUNCHER_MISTAKES])
def test_planted_mistake_in_launcher_fails(name: str, mutate: Callable, expected: str, tmp_path: Path) -> None:
    config = launcher()
    mutate(config)
    broken = tmp_path / vm.LAUNCHER.name
    broken.write_text(yaml.safe_dump(config, sort_keys=False))
    problems = vm.check_launcher_config(yaml.safe_load(broken.read_text()))
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------- runtime_env


def test_runtime_env_is_valid_for_ray_job_submit() -> None:
    env = yaml.safe_load(vm.RUNTIME_ENV.read_text())
    assert vm.check_runtime_env(env) == []
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "mint-data/"} <= set(env["excludes"])
    # Node settings (DS_ACCELERATOR=cuda, ...) come from the node, so one file serves GPU and CPU clusters.
    assert "DS_ACCELERATOR" not in env["env_vars"]
    assert "pip" not in env and "conda" not in env and "uv" not in env  # the image holds the pins


RUNTIME_ENV_MISTAKES = [
    ("misspelled-field", lambda e: _set(e, "workingdir", "."), "unknown field 'workingdir'"),
    ("env-var-not-string", lambda e: _set(e["env_vars"], "NCCL_DEBUG", 1), "Dict[str, str]"),
    ("excludes-not-list", lambda e: _set(e, "excludes", ".venv"), "List[str]"),
    ("secret-in-env", lambda e: _set(e["env_vars"], "HF_TOKEN", "hf_x"), "secrets do not belong"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), RUNTIME_ENV_MISTAKES,
                         ids=[m[0] for m in RUNTIME_ENV_MISTAKES])
def test_planted_mistake_in_runtime_env_fails(name: str, mutate: Callable, expected: str) -> None:
    env = yaml.safe_load(vm.RUNTIME_ENV.read_text())
    mutate(env)
    problems = vm.check_runtime_env(env)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------ image


def test_image_matches_the_project_pins() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    dockerfile = (vm.CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_pin}-py311-gpu" in dockerfile
    assert f"torch=={torch_pin}" in dockerfile
    for doc in by_kind("RayCluster") + [d["spec"]["rayClusterConfig"] for d in by_kind("RayService")]:
        assert (doc.get("spec") or doc)["rayVersion"] == ray_pin


# ---------------------------------------------------------------- yamllint

YAML_FILES = vm.yaml_files()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yamllint(path: Path) -> None:
    assert vm.lint_yaml(path) == []


def _trailing_spaces(text: str) -> str:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    lines[i] += "   "
    return "\n".join(lines) + "\n"


def _duplicate_key(text: str) -> str:
    return text.rstrip("\n") + "\nduplicated_key: 1\nduplicated_key: 2\n"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
@pytest.mark.parametrize(("mutate", "rule"), [(_trailing_spaces, "trailing-spaces"),
                                              (_duplicate_key, "key-duplicates")], ids=["trailing", "dupkey"])
def test_planted_mistake_fails_yamllint(path: Path, mutate: Callable, rule: str, tmp_path: Path) -> None:
    broken = tmp_path / path.name
    broken.write_text(mutate(path.read_text()))
    assert any(rule in p for p in vm.lint_yaml(broken)), rule


def test_cli_reports_clean_tree(capsys: pytest.CaptureFixture) -> None:
    # The same entry point a user runs before `kubectl apply` / `ray up` / `terraform apply`.
    assert vm.main([]) == 0, capsys.readouterr().out


# ------------------------------------------- the production chain: names, bucket, nodegroups


def _tree(tmp_path: Path) -> Path:
    """A copy of what the chain checks read: recipes, serve configs, cluster files, Terraform."""
    return repo_copy(tmp_path / "repo", "jobs/recipes", "serving", "cluster/kubernetes", "infra/terraform",
                     "cluster/eksctl-cluster.yaml")


def _eksctl_problems(root: Path) -> list[str]:
    docs = [d for p in sorted((root / "cluster" / "kubernetes").glob("*.yaml")) for d in vm.load_yaml_documents(p)]
    return vm.check_eksctl(yaml.safe_load((root / "cluster" / "eksctl-cluster.yaml").read_text()), docs)


def test_the_production_chain_checks_pass_on_the_tree() -> None:
    assert vm.check_registry_names() == []
    assert vm.check_prod_recipes() == []
    assert _eksctl_problems(REPO) == []


CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "check_registry_names": vm.check_registry_names, "check_prod_recipes": vm.check_prod_recipes,
    "check_eksctl": _eksctl_problems}
CHAIN_MISTAKES = yaml.safe_load((Path(__file__).parent / "chain_mistakes.yaml").read_text())


@pytest.mark.parametrize("mistake", CHAIN_MISTAKES, ids=[m["name"] for m in CHAIN_MISTAKES])
def test_planted_mistake_in_the_production_chain_fails(mistake: dict[str, str], tmp_path: Path) -> None:
    root = _tree(tmp_path)
    plant(root / mistake["file"], mistake["old"], mistake["new"])
    problems = CHECKS[mistake["check"]](root)
    assert any(mistake["expected"] in p for p in problems), problems
