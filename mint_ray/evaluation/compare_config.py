"""What a comparison is (``mint-ray compare``'s ``Config``): its arms, the checks that they
can work and differ only in what the recipe varies, and each arm's training config.

The semantics (arms, per-arm data, step budget, ``varied``) are described in ``compare``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from mint_ray import storage
from mint_ray.config import RayConfig, StorageConfig, StrictModel, TrackingConfig, build_config, deep_merge
from mint_ray.errors import ConfigError
from mint_ray.evaluation.confounds import covers, find_confounds, flat_settings
from mint_ray.evaluation.generate import GenerationConfig
from mint_ray.evaluation.run import RetrievalConfig
from mint_ray.evaluation.training_report import Confound
from mint_ray.tasks import get_task

if TYPE_CHECKING:
    from mint_ray.training.config import Config as TrainConfig

ArmKind = Literal["base", "sft", "dpo", "orpo", "teacher", "text_ceiling", "rag", "model"]
# Arms that answer from a recorded ranking, with no model to generate.
RANKED = ("teacher", "text_ceiling")
TRAINED = ("sft", "dpo", "orpo")

# Training keys the comparison sets itself, and where they come from instead. An arm's
# (or the shared) ``train`` block that sets one is refused with its name: it would lose.
_SET_HERE = {
    "task": "the comparison's task",
    "objective": "the arm's kind",
    "model.kind": "the task decides it",
    "output_uri": "every arm writes under the comparison's output_uri",
    "run_name": "every arm's run is named compare-<task>-<arm>",
    "storage": "the comparison's own storage",
    "tracking": "the comparison's own tracking",
    "ray": "the comparison's own ray",
}
_START = "an arm starts from the base model (the shared train.model.path or train.model.tiny) or from init_from"
ARM_SET_HERE = {**_SET_HERE, "model.path": _START, "model.tiny": _START}
SHARED_SET_HERE = {**_SET_HERE, "data": "set data_uri and train_splits, or an arm's train.data"}


def keys_set_here(train: Mapping[str, Any], set_here: Mapping[str, str]) -> list[str]:
    """The dotted keys of ``set_here`` that ``train`` sets (pure)."""
    found = []
    for key in set_here:
        node: Any = train
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) and part in node else KeyError
        if node is not KeyError:
            found.append(key)
    return found


def _refuse_set_here(train: Mapping[str, Any], set_here: Mapping[str, str], where: str) -> None:
    keys = keys_set_here(train, set_here)
    if keys:
        raise ValueError(f"{where} sets " + "; ".join(f"{k} ({set_here[k]})" for k in keys)
                         + ": the comparison sets these itself, remove them")


# Arm-level settings a recipe may list in ``varied`` besides ``train.<setting>`` paths.
ARM_SETTINGS = ("init_from", "budget")
# The training settings the comparison sets per arm: the objective is what is compared, and
# where an arm starts and how many steps it takes are compared as init_from and budget.
_SET_PER_ARM = ("objective", "run_name", "output_uri", "model.path", "model.tiny", "model.reference_path",
                "optim.max_steps")
# The paper's default arms: DPO starts from SFT, on a budget of its own.
DEFAULT_ARMS_VARIED = ("init_from", "budget")


def _max_steps(train: Mapping[str, Any]) -> int | None:
    """``optim.max_steps`` of a raw ``train`` block when it is a step count (else the build says why)."""
    optim = train.get("optim")
    value = optim.get("max_steps") if isinstance(optim, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ArmConfig(StrictModel):
    """One arm of the comparison."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    kind: ArmKind
    model_uri: str | None = Field(None, description="reuse this model (no training); required for kind model")
    init_from: str | None = Field(None, description="a trained arm whose model this one starts from")
    train: dict[str, Any] = Field(default_factory=dict, description=(
        "training config overrides of this arm; train.data (uri, splits, target, filter) is merged over "
        "data_uri and train_splits; train.optim.max_steps sets the arm's own steps"))
    budget: Literal["total", "own"] = Field("total", description=(
        "total: the arm trains the step budget counted from the base model (minus the steps of the arm it "
        "starts from); own: a whole budget of its own on top of that arm (marked in the report)"))

    @model_validator(mode="after")
    def _consistent(self) -> ArmConfig:
        if self.kind == "model" and not self.model_uri:
            raise ValueError(f"arm {self.name}: kind model needs model_uri")
        if self.kind in RANKED and self.model_uri:
            raise ValueError(f"arm {self.name}: a {self.kind} arm is read from the rankings recorded with the "
                             "pairs (teacher) or beside the teacher (text_ceiling); drop model_uri")
        if self.kind in ("base", "rag") and self.model_uri:
            raise ValueError(f"arm {self.name}: the base model of every arm is train.model.path (a tiny one "
                             "is built without it); set that instead of model_uri, or use kind model")
        if (self.init_from or self.train or self.budget != "total") and self.kind not in TRAINED:
            raise ValueError(f"arm {self.name}: init_from, train and budget apply to trained kinds "
                             f"({', '.join(TRAINED)}), not {self.kind}")
        _refuse_set_here(self.train, ARM_SET_HERE, f"arm {self.name}: train")
        if self.budget == "own" and _max_steps(self.train) is not None:
            raise ValueError(f"arm {self.name}: budget own and train.optim.max_steps both set its own steps: "
                             "keep one")
        return self


def default_arms(task: str) -> list[ArmConfig]:
    """The paper's arms; RAG only for the text task."""
    # DPO starts from the SFT arm, as in the paper, with a budget of its own on top (marked).
    arms = [ArmConfig(name="base", kind="base"), ArmConfig(name="sft", kind="sft"),
            ArmConfig(name="dpo", kind="dpo", init_from="sft", budget="own"), ArmConfig(name="orpo", kind="orpo"),
            ArmConfig(name="teacher", kind="teacher")]
    return [*arms, ArmConfig(name="rag", kind="rag")] if get_task(task).modality == "text" else arms


class Config(StrictModel):
    """``mint-ray compare``: train or load every arm, evaluate all on one test split, one report."""

    task: Literal["rare_disease", "tissue_type"]
    data_uri: str = Field(description="the preference dataset (train pairs + test cases)")
    split: str = "test"
    train_splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    max_cases: int | None = Field(None, gt=0)
    arms: list[ArmConfig] | None = Field(None, description="default: base, sft, dpo, orpo, teacher (+ rag)")
    train: dict[str, Any] = Field(default_factory=dict, description=(
        "training config shared by the trained arms (optim, loss, model.lora, scaling...); "
        "model.path is the base checkpoint, without it a tiny base is built from model.tiny"))
    generation: GenerationConfig = GenerationConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    output_uri: str | None = Field(None, description="default <root>/comparisons/<task>")
    bootstrap_resamples: int = Field(1000, gt=0)
    varied: list[str] | None = Field(None, description=(
        "settings the trained arms may differ in besides their kind: train.<dotted setting> (a section "
        "covers what is under it), init_from, budget; default: none, or init_from and budget for the "
        "default arms"))
    allow_confounds: bool = Field(False, description=(
        "run although the trained arms differ in settings not in varied; the report lists them "
        "under Confounds"))
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _arms_fit(self) -> Config:
        arms = self.arm_configs
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique: {names}")
        for i, arm in enumerate(arms):
            if arm.init_from is not None and arm.init_from not in {a.name for a in arms[:i] if a.kind in TRAINED}:
                raise ValueError(f"arm {arm.name}: init_from={arm.init_from!r} must name a trained arm listed "
                                 "before it")
            if arm.kind == "rag" and get_task(self.task).modality != "text":
                raise ValueError(f"arm {arm.name}: the RAG baseline needs notes; task {self.task} has none")
        if self.split in self.train_splits:
            raise ValueError(f"split {self.split!r} is also in train_splits: the arms would be trained on "
                             "their test cases")
        _refuse_set_here(self.train, SHARED_SET_HERE, "train")
        for arm in arms:
            if arm.kind not in TRAINED:
                continue
            data = self.arm_data(arm)
            splits = data.get("splits") if isinstance(data, dict) else None
            if isinstance(splits, list) and self.split in splits:
                raise ValueError(f"arm {arm.name}: train.data.splits {splits} hold the test split "
                                 f"{self.split!r}: the arm would be trained on its test cases")
        confounds = self.confounds()
        if confounds and not self.allow_confounds:
            found = "; ".join(f"{c.setting} (" + ", ".join(f"{arm} {v}" for arm, v in c.values.items()) + ")"
                              for c in confounds)
            raise ConfigError(
                f"the trained arms differ in more than their objective: {found}. List a setting the "
                f"comparison means to vary in varied (here: varied: [{', '.join(c.setting for c in confounds)}]), "
                "make the arms' settings equal, or set allow_confounds: true to run anyway (the report "
                "then lists them under Confounds)")
        return self

    @property
    def varied_settings(self) -> list[str]:
        """``varied``, or for the default arms the settings they vary (DPO after SFT)."""
        if self.varied is not None:
            return self.varied
        return list(DEFAULT_ARMS_VARIED) if self.arms is None else []

    def planned_steps(self) -> dict[str, int | None]:
        """Every trained arm's total steps from the base model as planned; None where unknown
        (a given model's steps are known only when read, and without a budget epochs decide)."""
        planned: dict[str, int | None] = {}
        for arm in self.arm_configs:
            if arm.kind not in TRAINED:
                continue
            chain = planned.get(arm.init_from) if arm.init_from else 0
            own = None if arm.model_uri or chain is None else self.own_steps(arm, chain)
            planned[arm.name] = None if own is None or chain is None else chain + own
        return planned

    def confounds(self) -> list[Confound]:
        """The settings in which the arms trained here differ beyond their kind and ``varied``.

        Compares the arms' effective training configs (``train_config``, defaults filled in),
        their ``init_from`` and their planned total steps (``budget``). A ``varied`` entry that
        names no such setting is a ``ConfigError`` (a typo would silently allow nothing).
        """
        planned = self.planned_steps()
        settings = {
            arm.name: {"init_from": arm.init_from,
                       "budget": "unknown" if planned[arm.name] is None else f"{planned[arm.name]} steps",
                       **{name: value for name, value in
                          flat_settings(train_config(self, arm, "base").model_dump(mode="json"), "train.").items()
                          if not any(covers(f"train.{fixed}", name) for fixed in _SET_PER_ARM)}}
            for arm in self.arm_configs if arm.kind in TRAINED and not arm.model_uri}
        known = {name for flat in settings.values() for name in flat}
        for entry in self.varied if settings and self.varied else ():
            if not any(covers(entry, name) for name in known):
                raise ConfigError(f"varied entry {entry!r} names no setting the trained arms can differ in: use "
                                  f"{', '.join(ARM_SETTINGS)} or train.<a training setting> (e.g. train.optim.lr, "
                                  "train.data); the arm's steps are budget")
        return find_confounds(settings, self.varied_settings)

    @property
    def budget_steps(self) -> int | None:
        """The step budget of every trained arm: the shared ``train.optim.max_steps``."""
        return _max_steps(self.train)

    def arm_data(self, arm: ArmConfig) -> Any:
        """The arm's ``train.data`` merged over ``data_uri`` and ``train_splits`` (raw: the
        training config types it)."""
        data = arm.train.get("data", {})
        default = {"uri": self.data_uri, "splits": self.train_splits}
        return deep_merge(default, data) if isinstance(data, dict) else data

    def own_steps(self, arm: ArmConfig, chain: int | None) -> int | None:
        """The steps ``arm`` trains itself; ``chain``: the total steps of the arm it starts from
        (0 without ``init_from``), None when they are unknown. None: no budget, its epochs decide.

        Its ``train.optim.max_steps`` when set; ``budget: own`` or no ``init_from``: the budget;
        else the budget minus ``chain``, so its total equals every other arm's.
        """
        explicit, budget = _max_steps(arm.train), self.budget_steps
        if explicit is not None or budget is None:
            return explicit
        if arm.budget == "own" or not arm.init_from:
            return budget
        if chain is None:
            raise ConfigError(f"arm {arm.name} starts from {arm.init_from}, whose steps are unknown (its model "
                              "records none): set the arm's train.optim.max_steps, or budget: own")
        if budget - chain <= 0:
            raise ConfigError(
                f"arm {arm.name} starts from {arm.init_from}, whose {chain} steps already use the budget of "
                f"{budget} (train.optim.max_steps): give {arm.init_from} fewer steps (its train.optim.max_steps), "
                f"or set budget: own on {arm.name} (a budget of its own on top, marked in the report)")
        return budget - chain

    @property
    def arm_configs(self) -> list[ArmConfig]:
        return self.arms if self.arms is not None else default_arms(self.task)

    def output(self) -> str:
        return storage.absolute(self.output_uri or storage.join(self.storage.root, "comparisons", self.task))


# ---------------------------------------------------------------- each arm's training config


def train_config(cfg: Config, arm: ArmConfig | None, start_uri: str | None = None,
                 steps: int | None = None) -> TrainConfig:
    """The training stage's config for ``arm`` (None: the base model's, to build a tiny base),
    on the arm's own data (``Config.arm_data``); ``steps``: its own steps (``Config.own_steps``)."""
    from mint_ray.training.config import Config as TrainConfig

    kind = "mllama" if get_task(cfg.task).modality == "image" else "causal_lm"
    fixed: dict[str, Any] = {"task": cfg.task, "data": {"uri": cfg.data_uri, "splits": cfg.train_splits},
                             "model": {"kind": kind},
                             "storage": cfg.storage.model_dump(), "tracking": cfg.tracking.model_dump(),
                             "ray": cfg.ray.model_dump()}
    shared = cfg.train
    if arm is not None:
        shared = deep_merge(shared, arm.train)
        model: dict[str, Any] = {"path": start_uri, "tiny": None}
        full_finetune = not (shared.get("model", {}).get("lora") or {}).get("enabled", True)
        if arm.kind == "dpo" and full_finetune and not shared.get("model", {}).get("reference_path"):
            # The paper's DPO reference is the model it starts from (SFT for DPO-from-SFT);
            # LoRA gets it by switching the adapter off, full fine-tuning needs a frozen copy.
            model["reference_path"] = start_uri
        fixed = deep_merge(fixed, {"objective": arm.kind, "model": model, "data": cfg.arm_data(arm),
                                   "output_uri": storage.join(cfg.output(), "arms", arm.name),
                                   "run_name": f"compare-{cfg.task}-{arm.name}"})
        if steps is not None:
            fixed["optim"] = {"max_steps": steps}
    try:
        return build_config(TrainConfig, deep_merge(shared, fixed))
    except ConfigError as err:
        raise ConfigError(f"train settings{f' of arm {arm.name}' if arm else ''}: {err}") from None
