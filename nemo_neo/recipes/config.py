"""The recipe's hydra config, turned once into typed configs and validated before any work.

The yaml (conf/prune_distill.yaml + conf/preset/*.yaml) reads like the papers' hyperparameter
tables; `build` is the one place that maps its sections onto the library's typed configs
(TrainConfig / OptimConfig / LoRAConfig / KDLossConfig / ImportanceConfig / ParallelConfig and the
workflows' MethodConfig), so a typo in a key fails here, by name, and the stages receive objects,
never the raw DictConfig.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import nemo_neo
from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.errors import ConfigError
from nemo_neo.models.gpt import recompute_overrides
from nemo_neo.parallel import ParallelConfig
from nemo_neo.peft.apply import LoRAConfig
from nemo_neo.prune.importance import ImportanceConfig
from nemo_neo.prune.search import MemorySpec
from nemo_neo.recipes.arch_search import MeasureSpec, SearchConfig
from nemo_neo.recipes.methods import METHODS, MethodConfig
from nemo_neo.train.loop import TrainConfig
from nemo_neo.train.optim import OptimConfig

STAGES = ("correct", "prune", "cache_teacher", "distill", "evaluate", "export")
# the stages that run under parallel.virtual_pipeline (model chunks); the others hold one model per rank
VIRTUAL_PIPELINE_STAGES = ("distill",)
OPTIONAL_STAGES = ("cache_teacher",)  # run only when `stages` names them
CONF_DIR_ENV = "NEMO_NEO_CONF_DIR"
CORRECTION_MODES = ("full", "lora")


class RecipeConfigError(ConfigError):
    """The recipe's configuration cannot be run as given (message names the key and the fix)."""


@dataclass
class DataSection:
    """Text files (tokenized once into the indexed format, in the cache) or Megatron indexed datasets
    (`blend` with `split`, or `blend_per_split`), both read through megatron-core's GPTDataset."""

    text_files: list = field(default_factory=list)
    blend: list | None = None  # [w, prefix, w, prefix, ...] or [prefix, ...] (Megatron-LM's layout)
    blend_per_split: dict | None = None  # {train: blend, valid: blend[, test: blend]}
    split: str = "969,30,1"  # with `blend`: each dataset's documents cut into train / valid / test
    seq_length: int = 256
    valid_fraction: float = 0.1  # text files: the held-out share of each source
    max_valid_sequences: int | None = 64
    seed: int = 1234
    index_cache: str | None = None  # where tokenized text and GPTDataset indices go (default: the user cache)
    mmap_bin_files: bool = False  # map the .bin files instead of one pread per sample (RSS then grows with them)


@dataclass
class CorrectSection:
    mode: str = "full"
    in_parallel: bool = False
    input: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @property
    def method(self) -> MethodConfig:
        """Correction is the teacher's own LM fine-tune: full-parameter CE, or CE on adapters."""
        return MethodConfig(method="sft" if self.mode == "full" else "lora", lora=self.lora)


@dataclass
class PruneSection:
    input: str | None = None
    target: dict = field(default_factory=dict)
    drop_layers: list | None = None
    depth_metric: str = "loss"
    task_limit: int | None = None
    data_dir: str | None = None
    random_init: bool = False
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    search: SearchConfig | None = None  # Minitron's architecture search instead of a fixed target (budget set)


@dataclass
class CacheTeacherSection:
    """The optional cache_teacher stage: the distill teacher's top-K targets of every training sample
    (`nemo_neo.distill.cache_writer`), read by the distill stage instead of running the teacher."""

    dir: str | None = None  # default <run_dir>/cache_teacher/cache
    top_k: int = 32
    temperature: float = 1.0
    chunk_samples: int = 64
    micro_batch_size: int = 4
    values_dtype: str = "float16"


@dataclass
class DistillSection:
    method: MethodConfig = field(default_factory=MethodConfig)
    student: str | None = None
    teacher: str | None = None
    teacher_cache: str | None = None  # a teacher cache dir (kd / llm_neo); default: the cache_teacher stage's
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def loss(self) -> KDLossConfig:
        return self.method.loss


@dataclass
class EvaluateSection:
    micro_batch_size: int = 4
    tasks: list = field(default_factory=list)
    task_limit: int | None = None
    data_dir: str | None = None


@dataclass
class ExportSection:
    input: str | None = None
    dtype: str = "bfloat16"
    fp8: bool = False
    fp8_calib_samples: int = 64


@dataclass
class RecipeConfig:
    """Everything the stages read, typed. Built by `build` from the composed hydra config."""

    run_dir: str
    resume: bool
    stages: list
    keep_training_state: bool  # a finished stage keeps its training checkpoints (else only its output model)
    teacher_checkpoint: str | None
    data: DataSection
    parallel: ParallelConfig
    correct: CorrectSection
    prune: PruneSection
    cache_teacher: CacheTeacherSection
    distill: DistillSection
    evaluate: EvaluateSection
    export: ExportSection


def source_checkout() -> Path | None:
    """The source checkout nemo_neo is imported from (the directory whose pyproject.toml declares
    nemo_neo, above the package), or None for an installed wheel."""
    for parent in Path(nemo_neo.__file__).resolve().parents:
        project = parent / "pyproject.toml"
        if project.is_file() and 'name = "nemo_neo"' in project.read_text(errors="replace"):
            return parent
    return None


def conf_dir(explicit=None) -> Path:
    """The hydra config directory: `explicit` (a --config-dir option), else $NEMO_NEO_CONF_DIR, else
    the conf/ of the source checkout nemo_neo runs from. The one place that locates conf/."""
    if explicit:
        path, how = Path(explicit), "--config-dir"
    elif os.environ.get(CONF_DIR_ENV):
        path, how = Path(os.environ[CONF_DIR_ENV]), f"${CONF_DIR_ENV}"
    else:
        checkout = source_checkout()
        if checkout is None:
            raise RecipeConfigError(f"no config directory: nemo_neo is not running from a source checkout; pass "
                                    f"--config-dir DIR (a copy of the repository's conf/) or set {CONF_DIR_ENV}")
        path, how = checkout / "conf", "the source checkout"
    if not path.is_dir():
        raise RecipeConfigError(f"config directory {path} (from {how}) does not exist; pass --config-dir DIR "
                                f"or set {CONF_DIR_ENV} to the repository's conf/")
    return path.resolve()


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def build_dataclass(cls, values: dict, where: str):
    """`cls(**values)`, or one RecipeConfigError naming an unknown key (with the known ones) or a bad value."""
    return _build(cls, values, where)


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise RecipeConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a library check, or a value of the wrong type
        raise RecipeConfigError(f"{where}: {e}") from None


def train_config(node, where: str) -> TrainConfig:
    """A `train:` section: loop keys (steps, batch sizes, eval/save cadence) and optimizer keys
    (lr, min_lr, warmup_steps, weight_decay, clip_grad, ...) side by side, as in the papers' tables."""
    values = _plain(node)
    loop_keys = {f.name for f in fields(TrainConfig)} - {"optim"}
    optim = _build(OptimConfig, {k: v for k, v in values.items() if k not in loop_keys}, f"{where} (optimizer)")
    return _build(TrainConfig, {**{k: v for k, v in values.items() if k in loop_keys}, "optim": optim}, where)


def method_config(method: str, loss_node, lora_node, where: str) -> MethodConfig:
    """A training method with its whole loss (every KDLossConfig field, e.g. top_k, jsd_beta,
    chunk_tokens, divergence) and its adapters."""
    loss = _build(KDLossConfig, _plain(loss_node), f"{where}.loss")
    lora = _build(LoRAConfig, _plain(lora_node), f"{where}.lora")
    if method not in METHODS:
        raise RecipeConfigError(f"{where}.method={method!r}: use one of {list(METHODS)}")
    return _build(MethodConfig, {"method": method, "loss": loss, "lora": lora}, where)


def search_config(node) -> SearchConfig | None:
    """prune.search, typed (unknown keys refused by name, nested ones too); None while no budget is set."""
    values = _plain(node)
    where = "prune.search"
    for key in ("budget", "multiple_of"):  # conf/ lists every key, null = not set
        values[key] = {k: v for k, v in _plain(values.get(key)).items() if v is not None}
    values["memory"] = _build(MemorySpec, _plain(values.get("memory")), f"{where}.memory")
    values["measure"] = _build(MeasureSpec, _plain(values.get("measure")), f"{where}.measure")
    search = _build(SearchConfig, values, where)
    return search if search.enabled else None


def check_virtual_pipeline(parallel: ParallelConfig, distill: DistillSection, correct: CorrectSection, stages) -> None:
    """parallel.virtual_pipeline: what the interleaved distill stage supports, one error naming the fix."""
    v, pp = parallel.virtual_pipeline, parallel.pipeline_parallel
    if v is None or v == 1 or "distill" not in stages:
        return
    off = "or set parallel.virtual_pipeline=null"
    if v < 1 or pp < 2:
        raise RecipeConfigError(f"parallel.virtual_pipeline={v} splits each pipeline rank's layers into chunks: it needs "
                                f"pipeline_parallel >= 2 (got {pp}); raise pipeline_parallel {off}")
    if not distill.method.trains_on_teacher or distill.teacher_cache or "cache_teacher" in stages or correct.in_parallel:
        raise RecipeConfigError(f"parallel.virtual_pipeline={v} runs distill.method=kd or llm_neo with the teacher online "
                                "(no teacher cache, correct.in_parallel=false); change those, " + off)
    t = distill.train
    world = int(os.environ.get("WORLD_SIZE", parallel.tensor_parallel * pp))
    dp = max(world // (parallel.tensor_parallel * pp), 1)
    micro = t.global_batch_size // max(t.micro_batch_size * dp, 1)
    if micro < pp:
        raise RecipeConfigError(f"distill.train: {micro} micro-batch(es) per step per data-parallel rank (global_batch_size="
                                f"{t.global_batch_size} / micro_batch_size={t.micro_batch_size} / DP={dp}) but megatron's "
                                f"interleaved schedule needs at least pipeline_parallel={pp}; raise global_batch_size "
                                f"(or lower micro_batch_size), {off}")


def build(cfg: DictConfig) -> RecipeConfig:
    """The typed recipe config, or one `RecipeConfigError` naming the key and the fix."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeConfigError(f"the config needs a value for {', '.join(missing)} (the preset marks them ???); set "
                                "them on the command line, e.g. teacher.checkpoint=/path/to/checkpoint")
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RecipeConfigError(f"unknown stage(s) {unknown} in stages={stages}; available, in order: {list(STAGES)}")
    c, p, d = cfg.correct, cfg.prune, cfg.distill
    if c.mode not in CORRECTION_MODES:
        raise RecipeConfigError(f"correct.mode={c.mode!r}: use one of {list(CORRECTION_MODES)}")
    correct = CorrectSection(mode=c.mode, in_parallel=bool(c.in_parallel), input=c.input,
                             train=train_config(c.train, "correct.train"),
                             lora=_build(LoRAConfig, _plain(c.lora), "correct.lora"))
    distill = DistillSection(method=method_config(d.method, d.loss, d.lora, "distill"), student=d.student,
                             teacher=d.teacher, teacher_cache=d.get("teacher_cache"),
                             train=train_config(d.train, "distill.train"))
    if (distill.teacher_cache or "cache_teacher" in stages) and not distill.method.trains_on_teacher:
        raise RecipeConfigError(f"a teacher cache (distill.teacher_cache, the cache_teacher stage) is for distill.method "
                                f"kd or llm_neo, not {distill.method.method!r}")
    if (distill.teacher_cache or "cache_teacher" in stages) and correct.in_parallel:
        raise RecipeConfigError("correct.in_parallel=true trains the teacher during distillation: its logits cannot "
                                "come from a teacher cache")
    if correct.in_parallel and distill.method.method != "kd":
        raise RecipeConfigError("correct.in_parallel=true corrects the teacher while a full-parameter student "
                                f"distills from it; it needs distill.method=kd (got {distill.method.method!r})")
    prune_values = {k: v for k, v in _plain(p).items() if k not in ("importance", "search")}
    prune = _build(PruneSection, {**prune_values, "target": dict(prune_values.get("target") or {}),
                                  "importance": _build(ImportanceConfig, _plain(p.importance), "prune.importance"),
                                  "search": search_config(p.get("search"))},
                   "prune")
    if prune.search is not None and (prune.target or prune.drop_layers):
        raise RecipeConfigError("prune.search chooses the pruned shape itself: clear the fixed target (prune.target=null "
                                "prune.drop_layers=null; presets set one), or drop the search budget")
    if "prune" in stages and not prune.target and not prune.drop_layers and prune.search is None:
        raise RecipeConfigError("the prune stage needs prune.target (e.g. {ffn_hidden_size: 768, hidden_size: 432} "
                                "or {num_layers: 16}), prune.drop_layers, or a search budget (prune.search.budget.params=100e6)")
    parallel = _build(ParallelConfig, _plain(cfg.parallel), "parallel")
    data = _build(DataSection, _plain(cfg.data), "data")
    try:
        recompute_overrides(parallel.recompute, parallel.recompute_modules)
    except ConfigError as e:
        raise RecipeConfigError(f"parallel.{e}") from None
    if parallel.uses_sequence_parallel and data.seq_length % parallel.tensor_parallel:
        raise RecipeConfigError(f"parallel.sequence_parallel=true splits each sequence over tensor_parallel="
                                f"{parallel.tensor_parallel} ranks: data.seq_length={data.seq_length} must be a multiple "
                                "of it (change one, or set parallel.sequence_parallel=false)")
    check_virtual_pipeline(parallel, distill, correct, stages)
    return RecipeConfig(
        run_dir=cfg.run_dir, resume=bool(cfg.resume), stages=stages,
        keep_training_state=bool(cfg.get("keep_training_state", False)), teacher_checkpoint=cfg.teacher.checkpoint,
        data=data, parallel=parallel,
        correct=correct, prune=prune, distill=distill,
        cache_teacher=_build(CacheTeacherSection, _plain(cfg.get("cache_teacher")), "cache_teacher"),
        evaluate=_build(EvaluateSection, _plain(cfg.evaluate), "evaluate"),
        export=_build(ExportSection, _plain(cfg.export), "export"),
    )
