"""The per-worker training loop that Ray Train runs on every rank.

One process per GPU (or CPU slot). Every rank: loads the student partitioned
under ZeRO-3, tokenizes the preference table, takes its equal share of pairs,
and steps in lockstep. Rank 0 shows the progress (a bar on a terminal, else a line
every few steps or 30 s), logs to MLflow every ``log_every_n_steps`` and writes the
model at the end (under LoRA: the adapter, and the base merged with it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mint_ray import console, losses, storage, students
from mint_ray.model_folders import local_copy, publish_dir, write_metadata
from mint_ray.training.batching import EncodedPair, PreferenceBatch, collate_pairs, encode_rows, prefetched
from mint_ray.training.config import Config
from mint_ray.training.data import training_rows
from mint_ray.training.deepspeed_config import deepspeed_config
from mint_ray.training.logprobs import PairLogps, policy_logps
from mint_ray.training.merge import ADAPTER_CONFIG, merge_lora, peft_adapter_name, save_adapter
from mint_ray.training.vision import MllamaForward, pixel_inputs

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train shows a worker's `print` twice; its logging records once.
log = logging.getLogger(__name__)
# Beside the exported weights: a probe input and the training engine's logits on it, at its
# last PROBE_POSITIONS positions (all of them would be seq x vocab: ~250 MB at Llama's 128k).
EXPORT_CHECK = "mint_export_check.safetensors"
PROBE_POSITIONS = 16


def shard_for_rank(pairs: list[EncodedPair], rank: int, world: int, seed: int, epoch: int
                   ) -> list[EncodedPair]:
    """This rank's pairs for ``epoch``: a seeded shuffle, split evenly (remainder dropped),
    so every rank takes the same number of steps."""
    order = list(range(len(pairs)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    per_rank = len(order) // world
    return [pairs[i] for i in order[rank * per_rank:(rank + 1) * per_rank]]


# Metrics cross ranks as float64: token counts stay exact far past fp32's 2**24 (a
# step's sum over 16+ ranks of long sequences), the sums of fp32/bf16 metrics lose
# nothing, NCCL and gloo both reduce it natively, and a vector of ~15 values costs
# no more in float64 than in fp32.
REDUCE_DTYPE = torch.float64


def accumulate_metrics(total: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor],
                       weight: float) -> dict[str, torch.Tensor]:
    """``total + weight * metrics`` key by key, as detached tensors on the metrics' device.

    Reads no value: a ``float()`` per micro-step would wait for the GPU to finish it."""
    out = dict(total)
    for k, v in metrics.items():
        v = v.detach().to(REDUCE_DTYPE) * weight
        out[k] = out[k] + v if k in out else v
    return out


def mean_across_ranks(device_values: dict[str, torch.Tensor], host_values: dict[str, float],
                      device: torch.device) -> dict[str, float]:
    """The mean over ranks of every value: one ``all_reduce`` on ``device``, one copy to the host.

    NCCL refuses CPU tensors, so the host figures (token counts, seconds) join the
    device tensors on the device. Every rank must pass the same keys."""
    keys, host_keys = sorted(device_values), sorted(host_values)
    on_device = [device_values[k].reshape(()).to(device, REDUCE_DTYPE) for k in keys]
    host = torch.tensor([float(host_values[k]) for k in host_keys], dtype=REDUCE_DTYPE).to(device)
    packed = torch.cat([torch.stack(on_device), host]) if on_device else host
    dist.all_reduce(packed)
    means = (packed / dist.get_world_size()).tolist()
    return dict(zip(keys + host_keys, means, strict=True))


def gather_per_rank(values: dict[str, float], device: torch.device) -> dict[str, list[float]]:
    """Every rank's ``values``, rank by rank, in one ``all_reduce`` on ``device``: each rank
    fills its own row of a zero ``[world, keys]`` table."""
    keys = sorted(values)
    table = torch.zeros(dist.get_world_size(), len(keys), dtype=REDUCE_DTYPE, device=device)
    table[dist.get_rank()] = torch.tensor([float(values[k]) for k in keys], dtype=REDUCE_DTYPE).to(device)
    dist.all_reduce(table)
    columns = table.T.tolist()
    return {k: columns[i] for i, k in enumerate(keys)}


class Objective:
    """Turns a batch into (loss, metrics) for the configured objective.

    ``reference`` (DPO only) gives the frozen reference's summed logps for a batch.
    """

    def __init__(self, cfg: Config, reference: Callable[[PreferenceBatch], PairLogps] | None):
        self.cfg, self.reference = cfg, reference

    def __call__(self, policy: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, loss_cfg = self.cfg, self.cfg.loss
        average = cfg.objective != "dpo"  # DPO compares summed logps; the others, means
        # DPO and SimPO never read the NLL: "response" lets a chunked head skip the prompt.
        nll_over = cfg.nll_span or "response"
        out: PairLogps = policy_logps(policy, batch, packed=loss_cfg.packed, nll_over=nll_over,
                                      average=average, chunk_tokens=loss_cfg.logits_chunk_tokens)
        if cfg.objective == "orpo":
            return losses.orpo_loss(out.chosen, out.rejected, out.chosen_nll, loss_cfg.beta, out.valid)
        if cfg.objective == "simpo":
            return losses.simpo_loss(out.chosen, out.rejected, loss_cfg.simpo_beta, loss_cfg.simpo_gamma,
                                     out.valid)
        if cfg.objective == "sft":
            return losses.sft_loss(out.chosen_nll)
        assert self.reference is not None
        ref = self.reference(batch)
        return losses.dpo_loss(out.chosen, out.rejected, ref.chosen, ref.rejected, loss_cfg.beta,
                               loss_cfg.dpo_label_smoothing, out.valid)


def load_trained_state(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load a checkpoint saved with ``exclude_frozen_parameters``: every key but the frozen
    parameters' must be there (a non-strict load alone would skip a missing adapter silently)."""
    result = dst.load_state_dict(src, strict=False)
    # remove_duplicate=False: a tied weight is a state-dict key under each of its names.
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the checkpoint does not match the model being trained: missing "
                           f"{missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")


def _load_model(cfg: Config, path: Path, ds_config: dict[str, Any], dtype: torch.dtype) -> Any:
    """Load the student; under ZeRO-3 its weights are partitioned at load time."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config) if cfg.deepspeed.zero_stage == 3 else None
    try:
        # Under ZeRO-3 the load starts DeepSpeed's communication (zero.Init), which prints.
        with console.quiet_prints():
            return students.load_student(path, cfg.model.kind, dtype)
    finally:
        # Left registered, a later rank-0-only from_pretrained would enter a collective.
        del keep
        unset_hf_deepspeed_config()


def train_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.optim.seed)
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    # Ray Train's device for this worker (its local GPU under use_gpu, else the CPU).
    device = ray.train.torch.get_device()

    base_dir = local_copy(loop_config["base_uri"])
    tokenizer, processor = students.load_tokenizer_and_processor(base_dir, cfg.model.kind)
    rows = training_rows(cfg.data)
    image_of = {r["sample_id"]: r.get("image_uri") for r in rows}
    pairs, stats = encode_rows(rows, tokenizer, cfg.batching,
                               require_image=cfg.model.kind == "mllama")

    micro, accum = cfg.optim.micro_batch_size, cfg.optim.gradient_accumulation_steps
    per_rank = len(pairs) // world
    steps_per_epoch = per_rank // (micro * accum)
    if steps_per_epoch == 0:
        raise RuntimeError(f"{len(pairs)} usable pairs are too few for {world} workers x micro batch "
                           f"{micro} x accumulation {accum}")
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total_steps = min(total_steps, cfg.optim.max_steps)

    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, total_steps)
    model = _load_model(cfg, base_dir, ds_config, dtype)
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.model.kind == "mllama" and cfg.model.freeze_vision:
        students.freeze_vision_tower(model)
    if cfg.model.lora.enabled:
        if cfg.deepspeed.gradient_checkpointing:
            model.enable_input_require_grads()
        model = students.apply_lora(model, cfg.model.lora, cfg.model.kind)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with console.quiet_prints():
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable,
                                                       config=ds_config)

    def wrap(m: Any) -> Any:
        if cfg.model.kind == "mllama":
            return MllamaForward(m, tokenizer.convert_tokens_to_ids("<|image|>"), dtype)
        return m

    ref_engine = None
    if cfg.objective == "dpo" and cfg.model.reference_path is not None:
        # A separate frozen reference, sharded like the policy and kept in eval mode.
        ref_model = _load_model(cfg, local_copy(cfg.model.reference_path), ds_config, dtype).eval()
        ref_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        with console.quiet_prints():
            ref_engine, *_ = deepspeed.initialize(model=ref_model, config=ref_config)
        ref_engine.eval()

    def reference_logps(batch: PreferenceBatch) -> PairLogps:
        with torch.no_grad():
            if ref_engine is not None:
                return policy_logps(wrap(ref_engine), batch, packed=cfg.loss.packed, nll_over="response",
                                    average=False, chunk_tokens=cfg.loss.logits_chunk_tokens)
            # Under LoRA the base weights are the reference: the adapter switched off.
            with engine.module.disable_adapter():
                return policy_logps(wrap(engine), batch, packed=cfg.loss.packed, nll_over="response",
                                    average=False, chunk_tokens=cfg.loss.logits_chunk_tokens)

    objective = Objective(cfg, reference_logps if cfg.objective == "dpo" else None)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.checkpoint.resume_from:
        # An earlier run's checkpoint (local or s3://), on request.
        fs, path = storage.filesystem(cfg.checkpoint.resume_from)
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            # The checkpoint holds only what trains; the frozen base is already loaded.
            _, client_state = engine.load_checkpoint(ckpt_dir, load_module_strict=False,
                                                     custom_load_fn=load_trained_state)
        start_step = int(client_state["step"])
        if rank == 0:
            log.info("[train] resumed from %s at step %d/%d", checkpoint.path, start_step, total_steps)

    total_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    local_params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                       for p in engine.module.parameters())
    mlflow_client = _mlflow(loop_config) if rank == 0 else None
    if rank == 0:
        # All rows used whole: nothing to say (the counts go to MLflow below).
        log.log(logging.INFO if stats.truncated_rows or stats.dropped else logging.DEBUG, "[train] %s",
                stats.summary())
        log.info("[train] %d workers, %d steps/epoch, %d steps, ZeRO-%d, objective %s, packed %s", world,
                 steps_per_epoch, total_steps, cfg.deepspeed.zero_stage, cfg.objective, cfg.loss.packed)
        _log(mlflow_client, loop_config, {f"data.{k}": v for k, v in stats.as_metrics().items()}, 0)

    progress = console.Progress(f"[train] {cfg.objective}", total_steps, logger=log, start=start_step,
                                every_n=console.every_n_for(total_steps)) if rank == 0 else None
    run_tokens, run_seconds = 0.0, 0.0

    def micro_batches() -> Iterator[PreferenceBatch]:
        """Every micro-batch of the run in order, on the host (pinned for a GPU), images included."""
        shard, shard_epoch = [], -1
        for step in range(start_step, total_steps):
            epoch, index = divmod(step, steps_per_epoch)
            if epoch != shard_epoch:  # one shuffle per epoch, not one per step
                shard, shard_epoch = shard_for_rank(pairs, rank, world, cfg.optim.seed, epoch), epoch
            for a in range(accum):
                first = (index * accum + a) * micro
                chunk = shard[first:first + micro]
                batch = collate_pairs(chunk, tokenizer.pad_token_id)
                if cfg.model.kind == "mllama":
                    images = [storage.read_bytes(image_of[p.sample_id]) for p in chunk]
                    batch = dataclasses.replace(batch, extras=pixel_inputs(processor, images))
                yield batch.pin_memory() if device.type == "cuda" else batch

    # Built by a background thread two micro-batches ahead: reading and preprocessing the
    # images no longer sits between two forwards.
    batches = prefetched(micro_batches(), depth=2)
    for step in range(start_step, total_steps):
        step_metrics: dict[str, torch.Tensor] = {}
        tokens = 0
        t_step = time.time()
        for _ in range(accum):
            batch = next(batches)
            tokens += batch.num_tokens()  # counted on the host copy: no device sync
            # From pinned memory: the copy queues behind the previous backward instead of waiting for it.
            batch = batch.to(device, non_blocking=True)
            loss, metrics = objective(wrap(engine), batch)
            engine.backward(loss)
            engine.step()
            step_metrics = accumulate_metrics(step_metrics, metrics, 1 / accum)
        # The one host sync of the step: its metrics, reduced across ranks on the device.
        agg = mean_across_ranks(step_metrics, {
            "tokens": tokens, "step_seconds": time.time() - t_step,
            "rss_gb": psutil.Process().memory_info().rss / 2**30}, device)
        step_tokens, step_seconds = agg.pop("tokens") * world, agg.pop("step_seconds")
        agg["tokens_per_s"] = step_tokens / max(step_seconds, 1e-9)
        if step > start_step:  # the first step of an attempt pays for warm-up
            run_tokens += step_tokens
            run_seconds += step_seconds
        agg["lr"] = scheduler.get_last_lr()[0] if scheduler is not None else cfg.optim.lr
        agg["step"] = step + 1
        done = step + 1
        if progress is not None:
            progress.update(1, loss=agg["loss"], lr=f"{agg['lr']:.1e}", **{"tok/s": round(agg["tokens_per_s"])})
        if rank == 0 and (done % cfg.log_every_n_steps == 0 or done == total_steps):
            _log(mlflow_client, loop_config, agg, done)
        if done % cfg.checkpoint.every_n_steps == 0 or done == total_steps:
            with tempfile.TemporaryDirectory() as ckpt_dir:
                # Only what trains (a LoRA adapter and its optimizer state): the frozen base
                # is the model folder's, ~12 GB (3B) / ~33 GB (11B) per save otherwise.
                engine.save_checkpoint(ckpt_dir, tag=f"step{done:06d}", client_state={"step": done},
                                       exclude_frozen_parameters=True)
                # One name on every rank: Ray merges the ranks' shards into one checkpoint.
                ray.train.report(agg, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                                 checkpoint_dir_name=f"checkpoint_step{done:06d}")

    batches.close()
    if progress is not None:
        progress.close()
    # Per-rank figures (ZeRO-3 shards parameters and optimizer state across ranks).
    # ZeRO wraps the torch optimizer; its state (Adam moments) covers this rank's partition.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optim_numel = sum(t.numel() for state in inner.state.values() for t in state.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    memory = {"param_shard_fraction": local_params / max(total_params, 1),
              "optimizer_state_numel": float(optim_numel),
              "peak_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if device.type == "cuda":  # every rank of a run is on the same kind of device: same keys
        memory["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    per_rank = {f"{k}_rank{r}": v for k, column in gather_per_rank(memory, device).items()
                for r, v in enumerate(column)}
    nodes = [ray.get_runtime_context().get_node_id()] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    summary = {"steps": total_steps, "resumed_from_step": start_step, "world_size": world,
               "tokens_per_s": run_tokens / run_seconds if run_seconds else None,
               "node_ids": nodes, "total_params": total_params, "data": stats.as_metrics(), **per_rank}
    probe = collate_pairs(pairs[:1], tokenizer.pad_token_id)
    export_model(engine, cfg, base_dir, tokenizer, processor, loop_config, rank, summary, probe, image_of)
    if rank == 0:
        _log(mlflow_client, loop_config, per_rank, total_steps)
    ray.train.report({"step": total_steps})


def _probe_inputs(probe: PreferenceBatch, processor: Any, images: list[bytes] | None) -> dict[str, Any]:
    """The probe pair's ``[prompt|chosen]`` as plain model inputs."""
    ids = torch.cat([probe.prompt_ids[0, : probe.prompt_lens[0]], probe.chosen_ids[0, : probe.chosen_lens[0]]])
    inputs: dict[str, Any] = {"input_ids": ids[None]}
    if images:
        inputs.update(pixel_inputs(processor, images))
    return inputs


def export_model(engine: Any, cfg: Config, base_dir: Path, tokenizer: Any, processor: Any,
                 loop_config: dict[str, Any], rank: int, summary: dict[str, Any],
                 probe: PreferenceBatch, image_of: dict[str, Any]) -> None:
    """Write the trained model as a Hugging Face folder to ``model_uri`` (and a LoRA run's
    adapter to ``adapter_uri``).

    A collective: every rank must call it (ZeRO-3 gathers the shards). With LoRA only the
    adapter is gathered; rank 0 merges it into the node's base folder tensor by tensor
    (``training.merge``), in the recipe's dtype. Full fine-tuning saves the consolidated
    16-bit weights as they are. The engine's logits at the probe's last positions are saved
    beside the weights (``EXPORT_CHECK``), so the export can be checked against a fresh reload.
    """
    from safetensors.torch import save_file

    images = None
    if cfg.model.kind == "mllama":
        images = [storage.read_bytes(next(v for v in image_of.values() if v))]
    probe_inputs = _probe_inputs(probe, processor, images)
    engine.eval()
    with torch.no_grad():
        forward = MllamaForward(engine, tokenizer.convert_tokens_to_ids("<|image|>"), torch.float32) \
            if cfg.model.kind == "mllama" else engine
        logits = forward(**{k: v.to(engine.device) for k, v in probe_inputs.items()}).logits
        engine_logits = logits[:, -PROBE_POSITIONS:].float().cpu()
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    adapter = gather_adapter(engine, rank) if cfg.model.lora.enabled else None
    state = None
    if not cfg.model.lora.enabled and cfg.deepspeed.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective; the weights land on rank 0
    elif not cfg.model.lora.enabled and rank == 0:
        state = engine.module.state_dict()
    if rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "model")
        if adapter is not None:
            adapter_dir = save_adapter(Path(tmp, "adapter"), adapter, engine.module.peft_config["default"])
            publish_dir(adapter_dir, loop_config["adapter_uri"], marker=ADAPTER_CONFIG, overwrite=True)
            summary = {**summary, "adapter_uri": loop_config["adapter_uri"]}
            merge_lora(base_dir, adapter_dir, out, cfg.model.kind, dtype)
        else:
            # 5 GB shards: each file is one streamed multipart upload, well under S3's limits.
            engine.module.save_pretrained(out, state_dict=state, max_shard_size="5GB")
        tokenizer.save_pretrained(out)
        if processor is not None:
            processor.save_pretrained(out)
        write_metadata(out, {**loop_config["metadata"], "training": summary})
        save_file({"logits": engine_logits.contiguous(),
                   **{k: v.contiguous() for k, v in probe_inputs.items()}}, str(out / EXPORT_CHECK))
        # A restarted group re-exports over its own earlier attempt.
        publish_dir(out, loop_config["model_uri"], overwrite=True)
    log.debug("[train] model written to %s", loop_config["model_uri"])  # the driver says where


def gather_adapter(engine: Any, rank: int) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's saved names, on rank 0 (empty elsewhere). A collective.

    One parameter gathered at a time from its ZeRO-3 partitions: the frozen base is never
    gathered, and the device holds one whole LoRA matrix at a time, not the whole adapter
    (r=256 on the 11B is ~2 GB). Below ZeRO-3 the parameters are whole and the gather is a no-op.
    """
    import deepspeed

    adapter = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param]):
            if rank == 0:
                adapter[peft_adapter_name(name)] = param.detach().cpu().clone()
    return adapter


def _mlflow(loop_config: dict[str, Any]) -> Any:
    if not loop_config.get("run_id"):
        return None
    from mlflow import MlflowClient

    return MlflowClient(loop_config["tracking_uri"])


def _log(client: Any, loop_config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    if client is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(loop_config["run_id"], metrics=[
        Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()])

