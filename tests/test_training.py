"""Student training on a real Ray cluster with DeepSpeed (CPU, gloo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from safetensors.torch import load_file

from mint_ray import storage
from mint_ray.config import load_config
from mint_ray.errors import ConfigError, MintError
from mint_ray.model_folders import METADATA_FILE, publish_dir, read_metadata
from mint_ray.students import model_class
from mint_ray.tasks import RARE_DISEASE, TISSUE_TYPE
from mint_ray.training import run as train_stage
from mint_ray.training.config import Config
from mint_ray.training.worker import EXPORT_CHECK
from tests.conftest import REPO
from tests.prefdata import write_text_prefs, write_vision_prefs
from tests.tinymodels import make_student_dir

pytestmark = pytest.mark.slow

TINY = ["model.tiny.vocab_size=400", "model.lora.r=8", "model.lora.alpha=16", "optim.lr=2e-3",
        "optim.micro_batch_size=2", "optim.warmup_ratio=0", "ray.num_cpus=4",
        "log_every_n_steps=1"]  # every step's loss in MLflow: the tests read its history


@pytest.fixture(autouse=True, scope="module")
def _ray_per_module():
    """One in-process Ray for the module's runs (init_ray reuses it); stopped at the end."""
    yield
    ray.shutdown()


def _config(tmp_path: Path, data: str, *extra: str, task: str = "rare_disease") -> Config:
    return load_config(Config, None, [f"task={task}", f"data.uri={data}", f"storage.root={tmp_path}",
                                      f"output_uri={tmp_path}/student", *TINY, *extra])


def _reload_matches_engine(model_dir: str, kind: str) -> float:
    """Max |logits| difference between the exported model (fresh load) and the training engine."""
    local = Path(model_dir)
    check = load_file(str(local / EXPORT_CHECK))
    expected = check.pop("logits")
    model = model_class(kind).from_pretrained(local, dtype=torch.float32).eval()
    if kind == "mllama":
        from mint_ray.training.vision import cross_attention_mask

        check["cross_attention_mask"] = cross_attention_mask(check["input_ids"], check["aspect_ratio_mask"],
                                                             model.config.image_token_index)
    with torch.no_grad():
        got = model(**check).logits[:, -expected.shape[1]:]  # the check keeps the last positions
    return float((got - expected).abs().max())


def _history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_zero3_orpo_two_workers_shards_learns_and_exports(tmp_path: Path) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 40)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "optim.epochs=3", "checkpoint.every_n_steps=10")
    summary = train_stage.run(cfg)
    t = summary["training"]
    assert t["steps"] == 30 and t["world_size"] == 2
    # Each rank holds about half of the parameters and of the optimizer state.
    for rank in (0, 1):
        assert 0.4 < t[f"param_shard_fraction_rank{rank}"] < 0.6
    opt = [t["optimizer_state_numel_rank0"], t["optimizer_state_numel_rank1"]]
    assert min(opt) > 0 and 0.4 < opt[0] / sum(opt) < 0.6
    loss = _history(summary["mlflow_run_id"], "loss")
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5
    assert _reload_matches_engine(summary["model_uri"], "causal_lm") < 1e-4
    assert summary["registered"]["version"] == "1"


def test_resume_on_request_from_an_earlier_run(tmp_path: Path) -> None:
    """A LoRA run's checkpoint holds what trains (adapter, its optimizer state), not the
    frozen base; resuming from it continues the step count, and the export matches the
    engine. ZeRO-2, the prod text recipe's stage; a ZeRO-3 checkpoint (the vision recipe's)
    is resumed after a node is lost in tests/test_hosts.py."""
    write_text_prefs(str(tmp_path / "prefs"), 16)
    # ~3% of the tiny model trains
    lora = ["model.lora.target_modules=[q_proj,v_proj]", "deepspeed.zero_stage=2"]
    first = train_stage.run(_config(tmp_path, str(tmp_path / "prefs"), "optim.max_steps=2",
                                    "tracking.enabled=false", *lora))
    weights = load_file(str(Path(first["model_uri"], "model.safetensors")))
    model_bytes = 4 * sum(t.numel() for t in weights.values())  # fp32, as trained here
    # DeepSpeed's files of the checkpoint (the copied zero_to_fp32.py script aside).
    saved = sum(f.stat().st_size for f in Path(first["checkpoint"]).rglob("*.pt"))
    assert saved < 0.3 * model_bytes, (saved, model_bytes)
    resumed = train_stage.run(_config(
        tmp_path, str(tmp_path / "prefs"), "optim.max_steps=4", "tracking.enabled=false", *lora,
        f"output_uri={tmp_path}/student2", f"checkpoint.resume_from={first['checkpoint']}"))
    assert resumed["training"]["resumed_from_step"] == 2 and resumed["training"]["steps"] == 4
    assert _reload_matches_engine(resumed["model_uri"], "causal_lm") < 1e-4


def test_mllama_zero3_with_images(tmp_path: Path) -> None:
    write_vision_prefs(str(tmp_path / "prefs"), 8)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "model.kind=mllama", "optim.max_steps=2",
                  task="tissue_type")
    summary = train_stage.run(cfg)
    assert summary["training"]["steps"] == 2
    assert _reload_matches_engine(summary["model_uri"], "mllama") < 1e-4


def test_zero3_orpo_with_chunked_logits_and_lora_on_lm_head(tmp_path: Path) -> None:
    """loss.logits_chunk_tokens on, a chunk shorter than one pair, LoRA (with dropout) on lm_head."""
    write_text_prefs(str(tmp_path / "prefs"), 16)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "loss.logits_chunk_tokens=7", "optim.max_steps=4",
                  "model.lora.target_modules=[q_proj,v_proj,lm_head]")
    summary = train_stage.run(cfg)
    assert summary["training"]["steps"] == 4
    loss = _history(summary["mlflow_run_id"], "loss")
    assert len(loss) == 4 and all(math.isfinite(v) for v in loss)
    assert _reload_matches_engine(summary["model_uri"], "causal_lm") < 1e-4
    # The adapter, gathered from ZeRO-3, is PEFT's folder: on the base it gives the merged model's logits.
    from peft import PeftModel

    adapter = Path(summary["training"]["adapter_uri"])
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = model_class("causal_lm").from_pretrained(Path(cfg.output_uri, "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    merged = model_class("causal_lm").from_pretrained(summary["model_uri"], dtype=torch.float32).eval()
    ids = load_file(str(Path(summary["model_uri"], EXPORT_CHECK)))["input_ids"]
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-4


def test_the_driver_fetches_only_the_metadata_of_an_s3_model(tmp_path: Path, s3_bucket: str) -> None:
    """After training the driver reads the summary (and registers the model) from the metadata
    file alone: the weights stay in the store."""
    folder = make_student_dir(tmp_path / "model")
    publish_dir(folder, f"{s3_bucket}/model")
    (tmp_path / "meta").mkdir()
    local = train_stage.metadata_folder(f"{s3_bucket}/model", tmp_path / "meta")
    assert [p.name for p in local.iterdir()] == [METADATA_FILE]
    assert read_metadata(local) == read_metadata(folder)


@pytest.mark.parametrize(("objective", "zero_stage", "lora"), [("dpo", 2, True), ("simpo", 3, False)])
def test_other_objectives_run(tmp_path: Path, objective: str, zero_stage: int, lora: bool) -> None:
    """DPO and SimPO train (SFT: the ground-truth test below). SimPO runs as full fine-tuning:
    the ZeRO-3 consolidated weights are saved as they are (no adapter, no merge)."""
    write_text_prefs(str(tmp_path / "prefs"), 8)
    cfg = _config(tmp_path, str(tmp_path / "prefs"), f"objective={objective}", "optim.max_steps=2",
                  f"deepspeed.zero_stage={zero_stage}", f"model.lora.enabled={str(lora).lower()}",
                  "tracking.enabled=false")
    summary = train_stage.run(cfg)
    assert summary["training"]["steps"] == 2
    assert ("adapter_uri" in summary["training"]) == lora
    assert (tmp_path / "student" / "adapter").exists() == lora
    assert _reload_matches_engine(summary["model_uri"], "causal_lm") < 1e-4


@pytest.mark.parametrize(("overrides", "needle"), [
    (["objective=dpo", "model.lora.enabled=false"], "needs model.reference_path"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"], "offload_params needs deepspeed.zero_stage=3"),
    (["optim.global_batch_size=7"], "does not equal"),
    (["model.kind=mllama"], "rare_disease is text-only"),
    (["data.target=ground_truth"], "data.target=ground_truth is an SFT target but objective=orpo"),
    # The one NLL span replaced SFT's own: an old recipe is told what to set instead.
    (["loss.sft_nll_over=response"], "loss.sft_nll_over was removed: loss.nll_over is now the NLL span of ORPO "
                                     "and SFT alike"),
])
def test_contradictory_configs_fail_before_workers(tmp_path: Path, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, str(tmp_path / "prefs"), *overrides)


@pytest.mark.parametrize(("recipe", "stage"), [("prod_text_orpo.yaml", 2), ("prod_vision_orpo.yaml", 3)])
def test_prod_recipes_pick_the_zero_stage_their_student_needs(monkeypatch: pytest.MonkeyPatch, recipe: str,
                                                              stage: int) -> None:
    """3B LoRA: ZeRO-2 (the frozen bf16 base fits per GPU, no parameter gathers); 11B: ZeRO-3.
    bf16 and gradient checkpointing on in both."""
    monkeypatch.setenv("MINT_STORAGE_ROOT", "s3://bucket")
    cfg = load_config(Config, REPO / "jobs" / "recipes" / recipe)
    ds = cfg.deepspeed
    assert (ds.zero_stage, ds.bf16, ds.gradient_checkpointing) == (stage, True, True)
    # Below ZeRO-3 every GPU holds the whole model: only a LoRA run's frozen base fits so.
    assert cfg.model.lora.enabled or ds.zero_stage == 3


def test_preflight_errors_name_the_field(tmp_path: Path) -> None:
    write_text_prefs(str(tmp_path / "prefs"), 4)
    # A text-only table labelled as the vision task: the vision student must refuse it.
    text_only = storage.read_dataset(str(tmp_path / "prefs"))
    storage.write_dataset(str(tmp_path / "textonly"), text_only, meta={"task": "tissue_type"})
    with pytest.raises(ConfigError, match="no image_uri column"):
        train_stage.preflight(_config(tmp_path, str(tmp_path / "textonly"), "model.kind=mllama",
                                      task="tissue_type"))
    with pytest.raises(ConfigError, match="task mismatch"):
        write_vision_prefs(str(tmp_path / "vprefs"), 2)
        train_stage.preflight(_config(tmp_path, str(tmp_path / "vprefs")))
    cfg = _config(tmp_path, str(tmp_path / "prefs"), "model.lora.target_modules=[nope_proj]")
    with pytest.raises(ConfigError, match="match no linear module"):
        train_stage.run(cfg)


def mixed_prefs(tmp_path: Path, splits: list[str], unlabelled: frozenset[int] = frozenset()) -> str:
    """``write_text_prefs`` rows (ids s0, s1...) in these splits, one a row; the rows in
    ``unlabelled`` have no label (cases only the teacher labelled)."""
    import pyarrow as pa

    manifest = write_text_prefs(str(tmp_path / "prefs"), len(splits))
    table = storage.read_dataset(str(tmp_path / "prefs"))
    labels = [None if i in unlabelled else label for i, label in enumerate(table["label"].to_pylist())]
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits))
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.string()))
    storage.write_dataset(str(tmp_path / "mixed"), table, overwrite=True, meta=manifest.meta)
    return str(tmp_path / "mixed")


def test_training_reads_only_its_splits(tmp_path: Path) -> None:
    from mint_ray.training.config import DataConfig
    from mint_ray.training.data import training_rows

    mixed_prefs(tmp_path, ["train", "train", "validation", "test", "test", "train"])
    rows = training_rows(DataConfig(uri=str(tmp_path / "mixed")))
    assert sorted(r["sample_id"] for r in rows) == ["s0", "s1", "s5"]
    held_out = training_rows(DataConfig(uri=str(tmp_path / "mixed"), splits=["test"]), columns=["prompt"])
    assert len(held_out) == 2 and "chosen" not in held_out[0]


# ---------------------------------------------------------------- per-run data: filter and target


@pytest.mark.parametrize(("task", "label", "expected"), [
    (RARE_DISEASE, "Marfan syndrome", "POTENTIAL_DISEASES:\n1. 'Marfan syndrome'"),
    (RARE_DISEASE, "Trisomy 21; Down syndrome", "POTENTIAL_DISEASES:\n1. 'Trisomy 21'"),
    (TISSUE_TYPE, "Head & Neck", "MOST_LIKELY_TISSUE:\n1. Head & Neck"),
])
def test_ground_truth_target_is_the_truth_alone_in_the_task_format(task, label: str, expected: str) -> None:
    from mint_ray.training.data import ground_truth_answer

    message = ground_truth_answer(task, label)
    assert message == task.answer_message([expected.splitlines()[1][3:].strip("'")])
    text = message[0]["content"] if task.modality == "text" else message[0]["content"][0]["text"]
    assert text == expected
    parsed = task.parse_answer(text)
    assert parsed.parseable and parsed.items == [expected.splitlines()[1][3:].strip("'")]
    with pytest.raises(ValueError, match="names no truth"):
        ground_truth_answer(task, " ; ")


def test_select_rows_filters_and_targets_and_counts_what_it_leaves_out() -> None:
    from mint_ray.training.config import DataConfig
    from mint_ray.training.data import has_ground_truth, select_rows

    teacher = RARE_DISEASE.answer_message(["Syndrome A0", "Syndrome B1"])
    rows = [{"sample_id": f"s{i}", "label": label, "chosen": teacher, "rejected": ["r"]}
            for i, label in enumerate(["Syndrome B1", None, " ", "Syndrome C2"])]
    assert [has_ground_truth(r["label"]) for r in rows] == [True, False, False, True]

    chosen = select_rows(rows, DataConfig(uri="/d"), RARE_DISEASE)
    assert (len(chosen.rows), chosen.left_out) == (4, {}) and chosen.rows[0]["chosen"] == teacher
    labelled = select_rows(rows, DataConfig(uri="/d", filter="with_ground_truth"), RARE_DISEASE)
    assert [r["sample_id"] for r in labelled.rows] == ["s0", "s3"]
    assert labelled.left_out == {"filtered_no_ground_truth": 2} and labelled.rows[1]["chosen"] == teacher

    truth = select_rows(rows, DataConfig(uri="/d", target="ground_truth"), RARE_DISEASE)
    assert [r["chosen"] for r in truth.rows] == [RARE_DISEASE.answer_message(["Syndrome B1"]),
                                                 RARE_DISEASE.answer_message(["Syndrome C2"])]
    assert truth.rows[0]["rejected"] == ["r"] and rows[0]["chosen"] == teacher  # inputs untouched
    assert truth.as_metrics() == {"rows_in_splits": 4, "rows_selected": 2,
                                  "left_out_filtered_no_ground_truth": 0, "left_out_no_ground_truth": 2}
    assert "left out: no_ground_truth 2" in truth.summary()


def test_training_rows_of_the_labelled_cases_with_their_truth(tmp_path: Path) -> None:
    from mint_ray.errors import MintError
    from mint_ray.training.config import DataConfig
    from mint_ray.training.data import read_selection, training_rows

    uri = mixed_prefs(tmp_path, ["train", "train", "validation", "validation", "test"], frozenset({2, 3}))
    table = storage.read_dataset(uri)
    labels = dict(zip(table["sample_id"].to_pylist(), table["label"].to_pylist(), strict=True))
    lu = DataConfig(uri=uri, splits=["train", "validation"], target="ground_truth")
    selection = read_selection(lu)
    assert [r["sample_id"] for r in selection.rows] == ["s0", "s1"]   # U has no label to teach
    assert selection.left_out == {"no_ground_truth": 2}
    assert all(r["chosen"] == RARE_DISEASE.answer_message([labels[r["sample_id"]]]) for r in selection.rows)
    # The teacher's chosen lists over L + U, and only the split and label columns when asked.
    assert len(training_rows(DataConfig(uri=uri, splits=["train", "validation"]))) == 4
    narrow = training_rows(lu.model_copy(update={"filter": "with_ground_truth"}), columns=["split"])
    assert len(narrow) == 2 and "chosen" not in narrow[0]
    storage.write_dataset(str(tmp_path / "notask"), table, overwrite=True)
    with pytest.raises(MintError, match="manifest names no task"):
        training_rows(DataConfig(uri=str(tmp_path / "notask"), target="ground_truth"))
    with pytest.raises(MintError, match="no label column"):
        storage.write_dataset(str(tmp_path / "nolabel"), table.drop_columns(["label"]), overwrite=True)
        training_rows(DataConfig(uri=str(tmp_path / "nolabel"), filter="with_ground_truth"))


def test_scheduled_tokens_follow_the_worker_schedule() -> None:
    from mint_ray.training.batching import EncodedPair, collate_pairs
    from mint_ray.training.budget import pair_tokens, scheduled_tokens

    pairs = [EncodedPair([1] * 5, [2] * (i + 1), [3] * 2, sample_id=f"s{i}") for i in range(10)]
    # Counted as the worker counts a batch.
    assert sum(pair_tokens(p) for p in pairs[:3]) == collate_pairs(pairs[:3], 0).num_tokens()
    same = [EncodedPair([1] * 5, [2] * 3, [3] * 2)] * 10
    # 2 ranks x 5 pairs, 2 pairs a step: 2 steps an epoch (a pair left over); step 3 starts epoch 2.
    assert scheduled_tokens(same, 2, world=2, micro_batch=2, accumulation=1, seed=0) == 8 * 10
    assert scheduled_tokens(same, 3, world=2, micro_batch=1, accumulation=2, seed=0) == 12 * 10
    assert scheduled_tokens(same, 0, world=2, micro_batch=2, accumulation=1, seed=0) == 0
    # One epoch on one rank goes through every pair once.
    assert scheduled_tokens(pairs, 5, world=1, micro_batch=2, accumulation=1, seed=3) == \
        sum(pair_tokens(p) for p in pairs)


def test_sft_on_the_ground_truth_of_the_labelled_cases_is_tagged_as_it_ran(tmp_path: Path) -> None:
    from mint_ray.model_folders import read_metadata
    from mint_ray.students import load_tokenizer_and_processor
    from mint_ray.training.batching import encode_rows
    from mint_ray.training.budget import pair_tokens, trained_tokens
    from mint_ray.training.data import training_rows

    uri = mixed_prefs(tmp_path, ["train"] * 4 + ["validation"] * 4 + ["test"] * 2, frozenset({4, 5, 6, 7}))
    cfg = _config(tmp_path, uri, "objective=sft", "data.splits=[train, validation]", "data.target=ground_truth",
                  "data.filter=with_ground_truth", "optim.max_steps=2", "deepspeed.zero_stage=2",
                  "scaling.num_workers=1", "registry.enabled=false")
    summary = train_stage.run(cfg)
    assert summary["data_selection"] == {"rows_in_splits": 8, "rows_selected": 4,
                                         "left_out_filtered_no_ground_truth": 4, "left_out_no_ground_truth": 0}
    assert summary["training"]["steps"] == 2 and summary["training"]["data"]["rows_in"] == 4
    tags = mlflow.MlflowClient().get_run(summary["mlflow_run_id"]).data.tags
    # loss.nll_over (default response) is the NLL span of ORPO and SFT alike, recorded with the run.
    assert (tags["mint.nll_over"], cfg.loss.nll_over) == ("response", "response")
    assert (tags["mint.data.target"], tags["mint.data.filter"], tags["mint.data.splits"]) == \
        ("ground_truth", "with_ground_truth", "train,validation")
    meta = read_metadata(summary["model_uri"])
    assert (meta["data_target"], meta["data_splits"], meta["nll_over"]) == \
        ("ground_truth", ["train", "validation"], "response")
    # 2 steps of 2 pairs on one rank: one epoch, each of the 4 labelled cases once.
    tokenizer, _ = load_tokenizer_and_processor(summary["model_uri"], "causal_lm")
    pairs, _ = encode_rows(training_rows(cfg.data), tokenizer, cfg.batching)
    assert len(pairs) == 4
    assert trained_tokens(cfg, summary["model_uri"], 2, 1) == sum(pair_tokens(p) for p in pairs)
    unlabelled = cfg.data.model_copy(update={"splits": ["validation"]})
    with pytest.raises(MintError, match="no rows to train on"):
        train_stage.check_rows(cfg.model_copy(update={"data": unlabelled}))


def test_a_head_the_chunked_path_cannot_serve_is_refused_before_workers(tmp_path: Path) -> None:
    base = make_student_dir(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    cfg = load_config(Config, None, ["task=rare_disease", f"data.uri={tmp_path}/prefs", f"model.path={base}",
                                     "model.lora.enabled=false", "loss.logits_chunk_tokens=8"])
    with pytest.raises(ConfigError, match=r"loss.logits_chunk_tokens: .*final_logit_softcapping=30.0"):
        train_stage.check_model(cfg, str(base))
    train_stage.check_model(load_config(Config, None, ["task=rare_disease", f"data.uri={tmp_path}/prefs",
                                                       f"model.path={base}", "model.lora.enabled=false",
                                                       "loss.logits_chunk_tokens=0"]), str(base))
