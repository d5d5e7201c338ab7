"""The one-command local run: every stage, both tasks, on this machine, with the same code.

``mint-ray demo`` (``make demo``) runs, per task: cohort -> teacher -> preference pairs ->
comparison (text: trains SFT, DPO from SFT and ORPO and evaluates them beside the base
model, the teacher and RAG; vision: ORPO beside the base model and the teacher) ->
promotion of the best trained arm to ``champion`` -> Ray Serve of the champion with one
request. Each step is the stage's own ``run`` on the
recipe in ``jobs/recipes/`` plus the overrides below, which size it for 2 CPU cores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from mint_ray import storage
from mint_ray.config import StrictModel, load_config
from mint_ray.evaluation import promote
from mint_ray.evaluation.promote import alias_holder
from mint_ray.tasks import get_task

RECIPES = Path(__file__).resolve().parents[1] / "jobs" / "recipes"
CLI_FLAGS = {"root": "root", "tasks": "tasks", "quick": "quick", "serve": "serve"}


class Config(StrictModel):
    root: str = "./mint-data"
    tasks: list[str] = Field(default_factory=lambda: ["rare_disease", "tissue_type"], min_length=1)
    # Smaller cohorts and 3 training steps: a smoke run of every stage (its students learn nothing).
    quick: bool = False
    serve: bool = True


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    recipe: str
    overrides: tuple[str, ...]


def _steps(task: str, root: str, quick: bool) -> list[Step]:
    text = task == "rare_disease"
    kind = "fusion" if text else "clip"
    cohort = storage.join(root, "cohorts", task)
    teacher = storage.join(root, "teachers", f"{task}-{kind}")
    pairs = storage.join(root, "preferences", task)
    # The full run keeps 480 training cases and evaluates every arm on 200 test cases: 40 gave
    # intervals of about +-0.15, too wide for the paired differences to separate the arms.
    sizes = (["sizes.n_samples=300"] if quick else
             ["sizes.n_samples=740", "sizes.per_split={train: 480, validation: 60, test: 200}"])
    common = (f"storage.root={root}", "storage.overwrite=true")
    # The vision task trains ORPO only (beside the base model and the teacher): at this size
    # its tiny Mllama students stay at chance (top-1 0.055 for SFT, DPO and ORPO alike on
    # 2026-12-03), so its SFT and DPO arms would cost 5 of the demo's minutes and show nothing.
    # compare_tissue_type.yaml runs all of them.
    vision_arms = () if text else ("arms=[{name: base, kind: base}, {name: orpo, kind: orpo}, "
                                   "{name: teacher, kind: teacher}]",)
    return [
        Step("cohort", "mint_ray.data.synth", "synth_local.yaml",
             (*common, f"task={task}", f"output_uri={cohort}", *sizes,
              *(["sizes.n_diseases=20"] if text else []))),
        Step("teacher", "mint_ray.teachers.train",
             "teacher_rare_disease_fusion.yaml" if text else "teacher_tissue_type_clip.yaml",
             (*common, f"cohort_uri={cohort}", f"output_uri={teacher}", f"epochs={3 if quick else 10}")),
        Step("preferences", "mint_ray.preferences.run",
             "preferences_rare_disease.yaml" if text else "preferences_tissue.yaml",
             (*common, f"cohort_uri={cohort}", f"teacher.uri={teacher}", f"output_uri={pairs}")),
        Step("compare", "mint_ray.evaluation.compare", f"compare_{task}.yaml",
             (*common, f"data_uri={pairs}", f"output_uri={storage.join(root, 'comparisons', task)}",
              "train.registry.enabled=true",  # under the task's one name (Task.registered_model)
              *vision_arms,
              *(["max_cases=20", "train.optim.max_steps=3"] if quick else []))),  # full: every test case
    ]


def _run_step(step: Step) -> tuple[dict[str, Any], float]:
    import importlib

    module = importlib.import_module(step.module)
    cfg = load_config(module.Config, RECIPES / step.recipe, list(step.overrides))
    t0 = time.time()
    try:
        result = module.run(cfg)
    finally:
        import ray

        # Each stage sizes its own in-process Ray (ray.num_cpus in its recipe).
        ray.shutdown()
    return result, time.time() - t0


def _promote_best(task: str, comparison: dict[str, Any], root: str) -> dict[str, Any]:
    """Promote the trained arm with the best top-1 (then MRR) to ``champion``."""
    trained = {arm: s for arm, s in comparison["arms"].items() if s.get("registered")}
    if not trained:
        return {"promoted": False, "reason": "no trained arm was registered"}
    arm, best = max(trained.items(), key=lambda kv: (kv[1].get("top1", 0.0), kv[1].get("mrr", 0.0)))
    name, version = best["registered"]
    cfg = load_config(promote.Config, None, [f"name={name}", f"version={version}", "metric=top1",
                                             f"storage.root={root}"])
    return {"arm": arm, **promote.run(cfg)}


def _test_case(task: str, root: str) -> dict[str, Any]:
    """One test-split case of the task's cohort as a request body (a note, or image bytes)."""
    import pyarrow.compute as pc

    table = storage.read_dataset(storage.join(root, "cohorts", task), columns=["split", "note", "image_uri"])
    row = table.filter(pc.equal(table["split"], "test")).slice(0, 1).to_pylist()[0]
    if task == "rare_disease":
        return {"note": row["note"]}
    return {"image": storage.read_bytes(row["image_uri"])}


def run(cfg: Config) -> dict[str, Any]:
    from mint_ray.config import TrackingConfig
    from mint_ray.tracking import resolve_tracking_uri

    root = cfg.root if storage.is_s3(cfg.root) else str(Path(cfg.root).absolute())
    tracking_uri = resolve_tracking_uri(TrackingConfig(), root)
    timings: list[tuple[str, float]] = []
    champions: dict[str, str] = {}
    tasks: dict[str, dict[str, Any]] = {}
    t_all = time.time()
    for task in cfg.tasks:
        comparison: dict[str, Any] = {}
        for step in _steps(task, root, cfg.quick):
            print(f"[demo] {task} {step.name}: {step.module} on jobs/recipes/{step.recipe}", flush=True)
            result, seconds = _run_step(step)
            timings.append((f"{task} {step.name}", seconds))
            if step.name == "compare":
                comparison = result
        t0 = time.time()
        decision = _promote_best(task, comparison, root)
        timings.append((f"{task} promote", time.time() - t0))
        tasks[task] = {"table": comparison.get("headline_table", ""),
                       "paired_table": comparison.get("paired_table", ""),
                       "report_uri": comparison.get("report_uri"), "files": comparison.get("files", []),
                       "promotion": decision}
        # Serve whichever version holds the alias now (this run's, or an earlier champion).
        if alias_holder(get_task(task).registered_model, "champion") is not None:
            champions[task] = get_task(task).registry_uri("champion")
    answers: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if cfg.serve and champions:
        from mint_ray.serving.client import serve_and_ask

        t0 = time.time()
        requests = {task: _test_case(task, root) for task in champions}
        answers = serve_and_ask(champions, requests, tracking_uri=tracking_uri)
        timings.append(("serve + requests", time.time() - t0))
    timings.append(("total", time.time() - t_all))
    return {"root": root, "tracking_uri": tracking_uri, "tasks": tasks, "champions": champions,
            "requests": {task: _request_text(body) for task, body in requests.items()}, "answers": answers,
            "timings": {name: round(s, 1) for name, s in timings}}


def _request_text(body: dict[str, Any]) -> str:
    """What was asked, for the summary: never the note itself (patient data in real use)."""
    if "note" in body:
        return f"a clinical note of {len(body['note'])} characters"
    return f"an image of {len(body['image'])} bytes"


def _answer_text(answer: dict[str, Any], shown: int = 3) -> str:
    """A served answer in one line: its first labels and the latency (or the error as sent)."""
    labels = answer.get("labels")
    if not isinstance(labels, list):
        return str(answer)
    ranked = "; ".join(f"{item.get('rank')}. {item.get('label')}" for item in labels[:shown])
    more = f" (+{len(labels) - shown} more)" if len(labels) > shown else ""
    return f"{ranked}{more} in {answer.get('latency_ms', 0):.0f} ms"


def _promotion_text(decision: dict[str, Any]) -> str:
    if "arm" not in decision:
        return f"nothing promoted: {decision.get('reason')}"
    verb = "promoted" if decision.get("promoted") else "did not promote"
    return (f"{verb} {decision['arm']} (best trained top-1) as {decision['name']} v{decision['version']} "
            f"to @champion: {decision.get('reason')}")


def summarize(result: dict[str, Any]) -> list[str]:
    """The closing summary of ``mint-ray demo``: read in ten seconds."""
    lines = ["", "| step | seconds |", "|---|---|",
             *(f"| {name} | {seconds:.0f} |" for name, seconds in result["timings"].items())]
    for task, facts in result["tasks"].items():
        lines += ["", f"## {task}", facts["table"].rstrip()]
        if facts["paired_table"]:
            lines += ["", facts["paired_table"].rstrip()]
        plots = [f for f in facts["files"] if f.endswith(".png")]
        lines += [_promotion_text(facts["promotion"]),
                  f"report: {facts['report_uri']}" + (f" (plot: {plots[0]})" if plots else "")]
    for task, answer in result["answers"].items():
        lines += [f"served {result['champions'][task]}, asked {result['requests'][task]}:",
                  f"  {_answer_text(answer)}"]
    tracking = result["tracking_uri"]
    lines += ["", f"MLflow store: {tracking}",
              f"open it: mlflow ui --backend-store-uri {tracking}" if not tracking.startswith("http")
              else f"open it: {tracking}"]
    return lines
