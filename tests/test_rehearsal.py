"""The production chain, rehearsed on this machine before a first AWS run.

Every ``jobs/recipes/prod_*.yaml``, in chain order (synth -> teacher -> preferences ->
train -> evaluate -> promote), is submitted with ``ray job submit`` to a local Ray head,
against a Ceph S3 gateway and an MLflow server started here, then the RayService's own
Serve config is deployed and asked through the name it serves. What is production about it:

- the recipes run as written: their URIs come from ``storage.root`` =
  ``${env:MINT_STORAGE_ROOT}``, set (like the ConfigMap does) in the Ray nodes'
  environment; only sizes are overridden (data, model, steps, actors, GPUs -> CPU);
- the jobs' S3 user holds exactly the policy Terraform grants the Ray roles
  (``data.aws_iam_policy_document.ray_data``, rendered by ``tools.iam_policy`` from
  ``infra/terraform``), and the MLflow server's user the server's policy; the bucket is
  laid out as in production (models/ uploaded by people, mlflow-artifacts/ the server's);
- tiny models are uploaded where the recipes expect Llama 3.2 and PLIP.

The planted faults of issue #14 (a second registry name, a literal bucket, a ListBucket
limited by a prefix condition, an unreadable models/ prefix) each make the step that meets
them fail with its error; each runs only that step, on the rehearsal's state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import LOCAL, REPO, environment, exports, free_port, plant, repo_copy
from tests.ray_jobs import RAY, submit
from tools import iam_policy

# The chain runs in the first test's setup: its time counts there.
pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.mlflow_server, pytest.mark.timeout(1800)]

RECIPES = REPO / "jobs" / "recipes"
LIFETIME_S = 3600
SMALL_RUN = [  # everything but the URIs and names: a 2-core machine, no GPU, tiny models
    "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
    "optim.micro_batch_size=2", "optim.global_batch_size=2", "optim.epochs=1", "optim.max_steps=2",
    "model.lora.r=4", "model.lora.alpha=8", "deepspeed.bf16=false", "deepspeed.gradient_checkpointing=false",
    "batching.max_length=384", "batching.max_prompt_length=320", "log_every_n_steps=1",
]
SMALL_ACTORS = ["teacher.num_actors=1", "teacher.num_gpus_per_actor=0", "teacher.num_cpus_per_actor=1",
                "teacher.device=cpu", "teacher.batch_size=32", "decode_num_cpus=0.25", "io_threads=4",
                "block_rows=64", "rows_per_file=1000"]
SMALL_EVALUATION = ["generation.actors=1", "generation.num_gpus_per_actor=0", "generation.num_cpus_per_actor=0.5",
                    "generation.batch_size=8", "generation.max_new_tokens=24", "max_cases=6",
                    "bootstrap_resamples=20"]
# (recipe, size overrides) in chain order. Every prod recipe is here (test below).
CHAIN: list[tuple[str, list[str]]] = [
    ("prod_synth_data.yaml", ["sizes.n_samples=60", "sizes.n_diseases=20", "image_size=32"]),
    ("prod_synth_tissue.yaml", ["sizes.n_samples=40", "image_size=32"]),
    ("prod_teacher_rare_disease.yaml", [
        "epochs=1", "batch_size=16", "num_workers=1", "use_gpu=false", "resources_per_worker.CPU=1",
        "resources_per_worker.GPU=0",
        "fusion={vocab_size: 300, text_dim: 16, text_layers: 1, text_heads: 2, max_text_tokens: 64, "
        "image_size: 32, cnn_channels: [8, 16], hidden: 32}"]),
    ("prod_preferences_rare_disease.yaml", SMALL_ACTORS),
    ("prod_preferences_tissue.yaml", SMALL_ACTORS),
    ("prod_text_orpo.yaml", SMALL_RUN),
    ("prod_vision_orpo.yaml", SMALL_RUN),
    ("prod_evaluate_text.yaml", SMALL_EVALUATION),
    ("prod_evaluate_vision.yaml", SMALL_EVALUATION),
    ("prod_promote_text.yaml", []),
    ("prod_promote_vision.yaml", []),
]
# The two tasks' chains side by side: each wave's jobs run at once (the cluster has room
# for two small jobs), and every recipe comes after those it reads from.
WAVES: list[list[str]] = [
    ["prod_synth_data.yaml", "prod_synth_tissue.yaml"],
    ["prod_teacher_rare_disease.yaml", "prod_preferences_tissue.yaml"],
    ["prod_preferences_rare_disease.yaml", "prod_vision_orpo.yaml"],
    ["prod_text_orpo.yaml", "prod_evaluate_vision.yaml"],
    ["prod_evaluate_text.yaml", "prod_promote_vision.yaml"],
    ["prod_promote_text.yaml"],
]
# What the base models are, where the recipes expect the real ones (Llama 3.2, PLIP).
BASE_MODELS = {"models/Llama-3.2-3B-Instruct": "causal_lm", "models/Llama-3.2-11B-Vision-Instruct": "mllama"}
TEACHER_DIR = "models/plip"
_ENTRY = re.compile(r"python (jobs/\w+\.py) --config jobs/recipes/(\S+)")


def entrypoint(recipe: str, overrides: list[str]) -> list[str]:
    """The recipe's own job script (from its header, as its RayJob runs it) plus overrides."""
    m = _ENTRY.search((RECIPES / recipe).read_text())
    assert m and m.group(2) == recipe, f"{recipe}: no 'python jobs/<x>.py --config jobs/recipes/{recipe}' line"
    return ["python", m.group(1), "--config", f"jobs/recipes/{recipe}",
            *[a for o in overrides for a in ("--set", o)]]


def test_the_chain_is_every_prod_recipe_with_sizes_only() -> None:
    order = [r for r, _ in CHAIN]
    assert len(order) == len(set(order)) and set(order) == {p.name for p in RECIPES.glob("prod_*.yaml")}
    # The waves run each recipe once, each task's recipes in chain order.
    waves = [r for wave in WAVES for r in wave]
    assert sorted(waves) == sorted(order)
    for task in ("rare_disease", "tissue_type"):
        mine = [r for r in order if f"task: {task}" in (RECIPES / r).read_text()]
        assert [r for r in waves if r in mine] == mine, task
    for recipe, overrides in CHAIN:
        entrypoint(recipe, overrides)
        for o in overrides:
            key, value = o.split("=", 1)
            assert not re.search(r"(uri|path|root|name|registry|alias|task)$", key), (recipe, o)
            assert "s3://" not in value and "models:/" not in value, (recipe, o)


# ---------------------------------------------------------------- services


class Rehearsal:
    """The services of one rehearsal and what it did."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.bucket = f"mint-rehearsal-{os.getpid()}"
        self.root = f"s3://{self.bucket}"
        self.s3: dict[str, str] = {}
        self.users: dict[str, dict[str, str]] = {}
        self.address = ""
        self.tracking_uri = ""
        self.timings: dict[str, float] = {}

    def s3_as(self, user: str) -> dict[str, str]:
        return {**self.s3, **self.users[user]}

    def iam(self) -> Any:
        import boto3

        keys = self.users["policy-admin"]
        return boto3.client("iam", endpoint_url=self.s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])

    def grant(self, user: str, document: str, tf_dir: Path = iam_policy.TERRAFORM) -> dict[str, Any]:
        """Give ``user`` the S3 statements of a Terraform policy document, as the role has them."""
        policy = iam_policy.rgw_compatible(iam_policy.policy_from_terraform(document, self.bucket, tf_dir))
        # (Ceph refuses "_" in policy names.)
        self.iam().put_user_policy(UserName=user, PolicyName=document.replace("_", "-"),
                                   PolicyDocument=json.dumps(policy))
        return policy

    def run(self, recipe: str, overrides: list[str], cwd: Path = REPO, timeout: float = 900) -> tuple[str, str]:
        t0 = time.time()
        status, logs = submit(self.address, *entrypoint(recipe, overrides), timeout=timeout, cwd=cwd)
        self.timings[recipe] = round(time.time() - t0, 1)
        print(f"[rehearsal] {recipe}: {status} in {self.timings[recipe]}s", flush=True)
        return status, logs

    def run_at_once(self, jobs: list[tuple[str, list[str], Path]]) -> list[tuple[str, str]]:
        """Several jobs submitted together (threads only wait on the job server)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))


def _tiny_models(rehearsal: Rehearsal) -> None:
    """Tiny stand-ins uploaded (by a person, with the admin's keys) where the recipes expect
    Llama 3.2 3B / 11B Vision and PLIP: Hugging Face folders, as the real copies are."""
    from mint_ray import students
    from mint_ray.model_folders import publish_dir
    from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPES
    from mint_ray.teachers.clip import ClipSettings, build_tiny_clip

    texts = [RARE_DISEASE.system_prompt, RARE_DISEASE.instruction, *TISSUE_TYPES,
             "Clinical note: a child with seizures, hypotonia and short stature."]
    with environment(rehearsal.s3_as("admin")), tempfile.TemporaryDirectory() as tmp:
        for prefix, kind in BASE_MODELS.items():
            folder = Path(tmp, prefix)
            students.build_tiny_student(kind, texts, folder, students.TinyStudentConfig(vocab_size=512))
            publish_dir(folder, f"{rehearsal.root}/{prefix}", marker="config.json")
        clip = build_tiny_clip(ClipSettings(vocab_size=300, hidden_size=32, intermediate_size=64, layers=1,
                                            projection_dim=32, image_size=32, patch_size=8,
                                            prompt_template="an H&E image of {label}"),
                               name="plip", task="tissue_type", labels=list(TISSUE_TYPES))
        folder = Path(tmp, TEACHER_DIR)
        clip.model.save_pretrained(str(folder))
        clip.processor.save_pretrained(str(folder))
        publish_dir(folder, f"{rehearsal.root}/{TEACHER_DIR}", marker="config.json")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    """Ceph S3 with the Terraform policies on its users, MLflow on the bucket, a Ray head
    whose environment is what a cluster node's is (ConfigMap mint-ray-env + role)."""
    import boto3

    r = Rehearsal(tmp_path_factory.mktemp("rehearsal"))
    ceph, mlflow_state = r.state / "ceph", r.state / "mlflow"
    # Short, whatever pytest's own temp folder is (e.g. under pytest-xdist): Ray's socket
    # paths must stay under 108 bytes.
    ray_state = Path(tempfile.mkdtemp(prefix="mint-ray-", dir="/tmp"))
    ports = {"S3_PORT": str(free_port()), "MON_PORT": str(free_port()), "MON2_PORT": str(free_port())}
    s3 = [str(LOCAL / "s3.sh")]
    stops: list[list[str]] = []
    try:
        subprocess.run([*s3, "start", str(ceph), str(LIFETIME_S)], env={**os.environ, **ports}, check=True,
                       timeout=600)
        stops.append([*s3, "stop", str(ceph)])
        admin = exports(subprocess.run([*s3, "env", str(ceph)], check=True, capture_output=True,
                                        text=True).stdout)
        r.s3 = {k: v for k, v in admin.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        r.users["admin"] = {k: admin[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        for user, caps in (("policy-admin", "user-policy=*"), ("ray-job", ""), ("mlflow", "")):
            r.users[user] = exports(subprocess.run([*s3, "user", str(ceph), user, *([caps] if caps else [])],
                                                    check=True, capture_output=True, text=True).stdout)
        keys = r.users["admin"]
        boto3.client("s3", endpoint_url=r.s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=r.bucket)
        r.grant("ray-job", "ray_data")
        r.grant("mlflow", "mlflow")
        _tiny_models(r)

        port = free_port()
        subprocess.run([str(LOCAL / "mlflow.sh"), "start", str(mlflow_state), str(port),
                        f"{r.root}/mlflow-artifacts", str(LIFETIME_S)],
                       env={**os.environ, **r.s3_as("mlflow")}, check=True, timeout=300)
        stops.append([str(LOCAL / "mlflow.sh"), "stop", str(mlflow_state)])
        r.tracking_uri = f"http://127.0.0.1:{port}"

        # DeepSpeed's JIT-built ops, copied into a folder of this cluster's own: a build lock
        # left in the shared cache by another process would otherwise hang every rank here.
        built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
        extensions = r.state / "torch_extensions"
        if built.is_dir():
            shutil.copytree(built, extensions, ignore=shutil.ignore_patterns("lock"))
        node_env = {**os.environ, **r.s3_as("ray-job"), "TORCH_EXTENSIONS_DIR": str(extensions),
                    "MINT_STORAGE_ROOT": r.root,             # ConfigMap mint-ray-env
                    "MLFLOW_TRACKING_URI": r.tracking_uri,   # ConfigMap mint-ray-env
                    "MINT_RAY_CACHE": str(r.state / "node-cache"),
                    "PYTHONPATH": str(REPO),                 # the image's PYTHONPATH (serving.app)
                    "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}
        gcs, dashboard = free_port(), free_port()
        subprocess.run([str(LOCAL / "ray_head.sh"), "start", str(ray_state), str(gcs), str(dashboard), "4",
                        str(LIFETIME_S)], env=node_env, check=True, timeout=300)
        stops.append([str(LOCAL / "ray_head.sh"), "stop", str(ray_state)])
        r.address = f"http://127.0.0.1:{dashboard}"
        yield r
    finally:
        for command in reversed(stops):
            subprocess.run(command, check=False, timeout=180)
        shutil.rmtree(ray_state, ignore_errors=True)


def test_a_broken_recipe_fails_its_job_with_the_config_error(rehearsal: Rehearsal) -> None:
    status, logs = submit(rehearsal.address, "python", "jobs/train_student.py", "--config",
                          "jobs/recipes/prod_text_orpo.yaml", "--set", "optim.lrr=0.1", timeout=180)
    assert status == "FAILED"
    assert "unknown key 'optim.lrr'; allowed here:" in logs


# ---------------------------------------------------------------- the chain


def _serve_config(rehearsal: Rehearsal, port: int) -> dict[str, Any]:
    """The RayService's serveConfigV2 with only the machine changed: loopback, a free port,
    no GPU, half a CPU."""
    docs = yaml.safe_load_all((REPO / "cluster" / "kubernetes" / "rayservice.yaml").read_text())
    (service,) = [d for d in docs if d and d.get("kind") == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in config["applications"]:
        for dep in app.get("deployments") or []:
            dep["ray_actor_options"] = {**dep.get("ray_actor_options", {}), "num_gpus": 0, "num_cpus": 0.5}
        args = app.setdefault("args", {})
        args.setdefault("deployment", {}).update({"num_gpus": 0, "num_cpus": 0.5})
    return config


def _ask(url: str, body: dict[str, Any], deadline: float) -> dict[str, Any]:
    last: Exception | None = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"{url}/v1/predict", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())
        except Exception as err:  # not up yet: connection refused, 404/503 while deploying
            last = err
            time.sleep(3)
    raise AssertionError(f"no answer from {url}/v1/predict: {last}")


@pytest.fixture(scope="module")
def chain(rehearsal: Rehearsal) -> Rehearsal:
    t0 = time.time()
    sizes = dict(CHAIN)
    for wave in WAVES:
        results = rehearsal.run_at_once([(recipe, sizes[recipe], REPO) for recipe in wave])
        for recipe, (status, logs) in zip(wave, results, strict=True):
            assert status == "SUCCEEDED", f"{recipe} failed:\n{logs[-4000:]}"
    rehearsal.timings["chain"] = round(time.time() - t0, 1)
    return rehearsal


def test_production_chain_end_to_end(chain: Rehearsal) -> None:
    from mlflow import MlflowClient

    from mint_ray.tasks import TASKS

    client = MlflowClient(chain.tracking_uri)
    for task in TASKS.values():
        champion = client.get_model_version_by_alias(task.registered_model, "champion")
        # Registered by reference: the version names the student's folder in the bucket.
        assert champion.source.startswith(f"{chain.root}/students/"), champion.source
        assert champion.tags.get("eval.top1") is not None and champion.tags["promotion.decision"] == "promoted"

    port = free_port()
    config = _serve_config(chain, port)
    path = chain.state / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.time()
    subprocess.run([str(Path(RAY).with_name("serve")), "deploy", str(path), "--address", chain.address],
                   cwd=REPO, check=True, timeout=180)
    (app,) = config["applications"]
    task = TASKS[app["args"]["task"]]
    answer = _ask(f"http://127.0.0.1:{port}{app.get('route_prefix', '/').rstrip('/')}",
                  {"task": task.name, "note": "A child with seizures, hypotonia and short stature."},
                  time.time() + 300)
    chain.timings["serve"] = round(time.time() - t0, 1)
    model = answer.get("model") or {}
    assert model.get("name") == task.registered_model and model.get("alias") == "champion", answer
    assert "labels" in answer, answer
    print(f"\nrehearsal step times (s): {json.dumps(chain.timings)}")


# ---------------------------------------------------------------- planted faults


def _checkout(tmp: Path) -> Path:
    """A copy of what `ray job submit` uploads (the job scripts, recipes and runtime_env)."""
    return repo_copy(tmp, "jobs", "cluster/runtime_env.yaml")


def _overrides(recipe: str) -> list[str]:
    return dict(CHAIN)[recipe]


RECIPE_FAULTS = [
    ("second-registry-name-in-evaluation", "prod_evaluate_text.yaml", "models:/mint-rare-disease-text/latest",
     "models:/mint-rare_disease-orpo/latest", "model 'mint-rare_disease-orpo' is not in the model registry"),
    ("second-registry-name-in-promotion", "prod_promote_vision.yaml", "task: tissue_type",
     "task: tissue_type\nname: mint-tissue_type-orpo", "model 'mint-tissue_type-orpo' is not in the model registry"),
    ("literal-bucket", "prod_synth_data.yaml", '"${storage.root}/cohorts/rare_disease"',
     "s3://mint-prod/cohorts/rare_disease", "bucket 'mint-prod' does not exist"),
]


def test_planted_recipe_faults_fail_their_steps(chain: Rehearsal, tmp_path: Path) -> None:
    """Each fault in its own copy of the checkout, the step that meets it submitted from there
    (all at once: they touch nothing the others read)."""
    jobs = []
    for name, recipe, old, new, _ in RECIPE_FAULTS:
        checkout = _checkout(tmp_path / name)
        plant(checkout / "jobs" / "recipes" / recipe, old, new)
        jobs.append((recipe, [*_overrides(recipe), "storage.overwrite=true"], checkout))
    results = chain.run_at_once(jobs)
    for (name, _, _, _, expected), (status, logs) in zip(RECIPE_FAULTS, results, strict=True):
        assert status == "FAILED" and expected in logs, f"{name}:\n{logs[-3000:]}"


POLICY_FAULTS = [
    ("listbucket-with-a-prefix-condition", "iam.tf", '"StringLikeIfExists"', '"StringLike"',
     "prod_synth_data.yaml", "s3:ListBucket on arn:aws:s3:::{bucket} (HeadBucket)"),
    ("models-prefix-unreadable", "variables.tf", 'default     = ["raw", "models"]', 'default     = ["raw"]',
     "prod_preferences_tissue.yaml", "s3:ListBucket on arn:aws:s3:::{bucket} (prefix 'models/plip"),
]


@pytest.mark.parametrize(("name", "tf_file", "old", "new", "recipe", "expected"), POLICY_FAULTS,
                         ids=[f[0] for f in POLICY_FAULTS])
def test_planted_policy_fault_fails_its_step(chain: Rehearsal, tmp_path: Path, name: str, tf_file: str, old: str,
                                             new: str, recipe: str, expected: str) -> None:
    tf_dir = repo_copy(tmp_path, "infra/terraform") / "infra" / "terraform"
    plant(tf_dir / tf_file, old, new)
    chain.grant("ray-job", "ray_data", tf_dir)
    try:
        status, logs = chain.run(recipe, [*_overrides(recipe), "storage.overwrite=true"], timeout=600)
    finally:
        chain.grant("ray-job", "ray_data")  # the policy Terraform really grants
    assert status == "FAILED" and expected.format(bucket=chain.bucket) in logs, logs[-3000:]
