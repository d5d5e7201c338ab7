"""The DeepSpeed config, generated from the typed training config (pure)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from mint_ray.config import StrictModel


class DeepSpeedConfig(StrictModel):
    zero_stage: int = Field(3, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DeepSpeedConfig:
        # DeepSpeed offloads parameters only when it partitions them (ZeRO-3); below
        # that, the setting would be dropped without a word.
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload_params needs deepspeed.zero_stage=3 (it is "
                             f"{self.zero_stage}): set zero_stage=3, or offload_params=false")
        return self


class OptimConfig(StrictModel):
    """Paper defaults: lr 5e-5 cosine with 10% warmup, weight decay 0, max grad norm 0.3."""

    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(0.3, gt=0)
    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    # Global batch = micro_batch_size * gradient_accumulation_steps * workers; when
    # set, it must divide exactly (checked before workers start).
    global_batch_size: int | None = Field(None, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    seed: int = 0


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, total_steps: int) -> dict[str, Any]:
    """A DeepSpeed config dict; the schedule is cosine with linear warmup."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1 and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    # Small models (tests) would otherwise keep everything persistent.
                    stage3_param_persistence_threshold=0)
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # DeepSpeed's WarmupCosineLR needs at least one warmup step.
    warmup = max(1, int(total_steps * optim.warmup_ratio))
    optimizer: dict[str, Any] = {"type": "AdamW", "params": {
        "lr": optim.lr, "weight_decay": optim.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}}
    if not ds.offload_optimizer:
        # Plain torch AdamW: avoids building FusedAdam (no CUDA toolchain needed).
        optimizer["params"]["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "optimizer": optimizer,
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup,
            "warmup_type": "linear", "cos_min_ratio": 0.0, "warmup_min_ratio": 0.0}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
