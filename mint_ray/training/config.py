"""The typed config of the student-training stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig
from mint_ray.errors import ConfigError
from mint_ray.students import LoraAdapterConfig, StudentKind, TinyStudentConfig, pretrained_dir
from mint_ray.training.batching import PairLengthConfig
from mint_ray.training.deepspeed_config import DeepSpeedConfig, OptimConfig

Objective = Literal["orpo", "dpo", "simpo", "sft"]


class StudentConfig(StrictModel):
    """Where the student comes from: a checkpoint directory, a pretrained student shipped in a
    pip package, or a tiny model built here."""

    kind: StudentKind = "causal_lm"
    # HF directory (local or s3://), e.g. a copy of meta-llama/Llama-3.2-3B-Instruct.
    path: str | None = None
    # A student a pip package ships (students.PRETRAINED, e.g. smollm2-135m-instruct): its
    # folder in the node's model cache becomes ``path`` (a given ``path`` is where the run
    # starts instead, e.g. a comparison's arm).
    pretrained: str | None = None
    tiny: TinyStudentConfig | None = None
    lora: LoraAdapterConfig = LoraAdapterConfig()
    freeze_vision: bool = True
    # DPO's frozen reference. Under LoRA, None means the base weights (adapter
    # switched off); full fine-tuning must name a checkpoint here. The paper's
    # DPO starts from SFT: set ``path`` to the SFT run's exported model (merged),
    # which is then both the starting point and the reference.
    reference_path: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _pretrained_folder(cls, data: Any) -> Any:
        # The cache is per node: each process that reads the config (the driver, every Ray
        # Train worker) makes sure its node has the folder; converted by the first, then a hit.
        if isinstance(data, dict) and data.get("pretrained") is not None and data.get("tiny") is None:
            folder = str(pretrained_dir(data["pretrained"]))
            data = {**data, "path": data.get("path") or folder}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.path is None) == (self.tiny is None) or (self.pretrained and self.tiny):
            raise ValueError("set exactly one of model.path (a checkpoint), model.pretrained (a packaged "
                             "student) or model.tiny (build one)")
        return self


class LossConfig(StrictModel):
    beta: float = Field(0.1, gt=0)  # ORPO lambda / DPO beta (paper: 0.1)
    # The NLL span of ORPO's NLL term and of SFT alike, so the two arms differ only in the
    # preference term. "response": the answer only (TRL's completion-only SFT loss);
    # "sequence": prompt + answer, TRL's ORPO form (the original ORPO code, MINT's runs).
    # DPO and SimPO have no NLL term. The value used is recorded with the run.
    nll_over: Literal["sequence", "response"] = "response"
    # SimPO works on a different scale than ORPO/DPO (its paper: beta 2.0, gamma 0.5).
    simpo_beta: float = Field(2.0, gt=0)
    simpo_gamma: float = 0.5
    dpo_label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # Forward [prompt | chosen | rejected] once instead of the prompt twice.
    packed: bool = True
    # Tokens per chunk of the LM head (training.chunked_logprobs): log-probabilities are
    # computed from the hidden states only where the loss reads, one chunk's logits alive
    # at a time, instead of full [rows, length, vocab] logits. 0 = off (the plain path).
    logits_chunk_tokens: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        # A recipe written before the one NLL span gets the fix, not only "unknown key".
        if isinstance(data, dict) and "sft_nll_over" in data:
            raise ConfigError("loss.sft_nll_over was removed: loss.nll_over is now the NLL span of ORPO and "
                              "SFT alike (default response, the answer only; sequence adds the prompt): "
                              "delete loss.sft_nll_over and set loss.nll_over")
        return data


class DataConfig(StrictModel):
    """Which rows of a preference dataset a run trains on, and which answer it is taught
    (see ``training.data``: rows left out are counted with their reason)."""

    uri: str  # a preference dataset (local or s3://) written by `mint-ray preferences`
    splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    # chosen: the teacher's chosen list (MINT and its preference baselines);
    # ground_truth: the case's label in the task's answer format (SFT on the truth).
    target: Literal["chosen", "ground_truth"] = "chosen"
    # with_ground_truth: only the rows whose case has a label (the labelled cases).
    filter: Literal["all", "with_ground_truth"] = "all"


class WorkerScalingConfig(StrictModel):
    """One worker per GPU (or CPU slot). ``placement_strategy`` SPREAD puts workers
    on different nodes where it can; PACK fills a node first (fewer hops for NCCL)."""

    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class CheckpointConfig(StrictModel):
    every_n_steps: int = Field(50, gt=0)
    num_to_keep: int = Field(2, gt=0)
    max_failures: int = Field(1, ge=-1)
    # A checkpoint URI from an earlier run to continue from (resume on request).
    resume_from: str | None = None


class RegistryConfig(StrictModel):
    enabled: bool = True
    # Default: the task's one registry name (Task.registered_model); every arm is a version of it.
    name: str | None = None


class Config(StrictModel):
    task: Literal["rare_disease", "tissue_type"]
    objective: Objective = "orpo"
    run_name: str | None = None
    data: DataConfig
    batching: PairLengthConfig = PairLengthConfig()
    model: StudentConfig = StudentConfig(tiny=TinyStudentConfig())
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: WorkerScalingConfig = WorkerScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    # MLflow metrics every N steps (the console shows progress on its own schedule).
    log_every_n_steps: int = Field(10, gt=0)
    output_uri: str | None = None  # default: <storage.root>/students/<run name>
    registry: RegistryConfig = RegistryConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.task == "tissue_type" and self.model.kind != "mllama":
            raise ValueError("task tissue_type is image-only: set model.kind=mllama")
        if self.task == "rare_disease" and self.model.kind == "mllama":
            raise ValueError("task rare_disease is text-only: set model.kind=causal_lm")
        if self.objective == "dpo" and not self.model.lora.enabled and self.model.reference_path is None:
            # Full fine-tuning leaves no frozen copy of the base: a second (sharded)
            # model must be named explicitly, since it doubles parameter memory.
            raise ValueError("objective dpo with full fine-tuning needs model.reference_path "
                             "(a frozen reference checkpoint), or enable model.lora")
        if self.data.target == "ground_truth" and self.objective != "sft":
            # The truth alone is an SFT target; a preference needs a rejected answer beside it.
            raise ValueError(f"data.target=ground_truth is an SFT target but objective={self.objective}: "
                             "set objective=sft, or data.target=chosen for the teacher's pairs")
        opt = self.optim
        if opt.global_batch_size is not None:
            per_step = opt.micro_batch_size * opt.gradient_accumulation_steps * self.scaling.num_workers
            if opt.global_batch_size != per_step:
                raise ValueError(
                    f"optim.global_batch_size={opt.global_batch_size} does not equal "
                    f"micro_batch_size*gradient_accumulation_steps*num_workers={per_step}: "
                    "adjust one of them")
        return self

    @property
    def name(self) -> str:
        return self.run_name or f"{self.task}-{self.objective}"

    @property
    def nll_span(self) -> Literal["sequence", "response"] | None:
        """The span of the NLL term that trains: ``loss.nll_over`` for ORPO and SFT, None for
        DPO and SimPO (their losses have no NLL term)."""
        return self.loss.nll_over if self.objective in ("orpo", "sft") else None
