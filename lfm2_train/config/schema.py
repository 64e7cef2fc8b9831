"""Config schemas: one dataclass per group, registered in Hydra's ConfigStore.

Groups: `stage`, `model`, `data`, `optim`, `trainer`, `distributed`, `logger`, plus `recipe` (YAML files in
`lfm2_train/conf/recipe/` that set values across groups). Every node is typed, so a misspelled key in a
YAML file or on the command line fails with Hydra's "Key 'x' not in 'YConfig'" naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


# ------------------------------------------------------------------------------------------------ model
@dataclass
class ModelConfig:
    """Where the weights come from: `init_from` (an HF LFM2 directory) wins over `preset` (random init)."""

    preset: str = "tiny"
    init_from: str | None = None
    # LFM2Config fields to change on top of the preset (e.g. {hidden_size: 256}); validated by LFM2Config.
    overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"  # sdpa | flash_attn | eager


# ------------------------------------------------------------------------------------------------ data
@dataclass
class PacingSchema:
    kind: str = "none"  # none | linear | root | step
    start_fraction: float = 0.2  # share of the easy->hard order admitted at the start
    full_at: float = 0.8  # training progress at which everything is admitted
    steps: list[Any] = field(default_factory=list)  # kind=step: [[progress, fraction], ...]


@dataclass
class DataConfig:
    """A tokenized dataset directory (see `lfm2_train/data/format.py`); None = the bundled corpus."""

    path: str | None = None
    tokenizer: str | None = None  # None: the dataset's recorded tokenizer / the bundled one
    seq_len: int = 256
    order: str | None = None  # name of a curriculum order file under <path>/order/; None = seeded shuffle
    pacing: PacingSchema = field(default_factory=PacingSchema)
    val_fraction: float = 0.02
    val_max_documents: int = 256
    verify_hashes: bool = True  # re-hash every shard before the first step
    seed: int = 1234


# ------------------------------------------------------------------------------------------------ optim
@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: ["norm", "embedding", "bias"])  # also: "conv"
    # constant | cosine | linear | wsd (warmup-stable-decay) | decay (mid-training: fast decay from the start)
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    decay_shape: str = "linear"  # wsd / decay: linear | cosine | sqrt
    grad_clip: float = 1.0  # 0 = off


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class TrainerConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (e.g. "aot_eager" to debug without codegen)
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>
    max_nan_skips: int = 3
    log_every: int = 1
    progress_bar: bool = True
    stop_after_steps: int | None = None  # debug: behave as if SIGTERM arrived after this step


@dataclass
class DistributedConfig:
    backend: str = "none"  # none | ddp | fsdp2 | deepspeed
    zero_stage: int = 2  # deepspeed only: 1 | 2 | 3
    dist_backend: str | None = None  # torch.distributed backend; None = nccl on CUDA, gloo on CPU
    # deepspeed only: extra DeepSpeed config keys merged over the generated one (buckets, persistence...)
    deepspeed_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "lfm2_train"
    run_name: str | None = None
    plot: bool = True  # loss-curve PNG at the end


# ------------------------------------------------------------------------------------------------ stages
@dataclass
class GenerateStageConfig:
    """`stage=generate`: complete prompts with `model.init_from` (or the preset with random weights)."""

    name: str = "generate"
    tokenizer: str | None = None  # default: the checkpoint's own tokenizer, else the bundled tiny one
    prompts: list[str] = field(default_factory=lambda: ["The quick brown fox"])
    chat: bool = False  # wrap each prompt as a user turn with the chat template
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    dtype: str = "float32"  # float32 | bfloat16
    save_checkpoint: bool = True  # write the model (HF format) into the run directory


@dataclass
class PretrainStageConfig:
    """`stage=pretrain`: next-token prediction on packed token shards (also used for mid-training)."""

    name: str = "pretrain"


@dataclass
class KDSchema:
    """Tempered decoupled Top-K distillation: L = CE + lambda * L_KD (see lfm2_train/losses/distill.py)."""

    method: str = "decoupled"  # decoupled | truncated (naive renormalised top-K) | tail_bucket (K+1 buckets)
    temperature: float = 2.0  # tau for the conditional term (the mass term is never tempered)
    temperature_end: float | None = None  # anneal tau to this value (None = constant)
    weight: str = "teacher_mass"  # conditional-term weight w: teacher_mass (P_T) | one | constant
    weight_value: float = 1.0
    tau_squared: bool = True
    kd_weight: float = 1.0  # lambda against cross-entropy
    kd_weight_end: float | None = None  # anneal lambda to this value (None = constant)
    schedule: str = "linear"  # shape of both annealings: linear | cosine


@dataclass
class DistillStageConfig:
    """`stage=distill`: CE + lambda * L_KD from a teacher top-K cache, in lock-step with the token shards."""

    name: str = "distill"
    teacher_cache: str | None = None  # directory written by stage=cache_teacher
    k: int = 32  # must equal the cache's K
    kd: KDSchema = field(default_factory=KDSchema)


@dataclass
class CacheTeacherStageConfig:
    """`stage=cache_teacher`: a teacher's top-K log-probs for every dataset token (docs/DISTILLATION.md)."""

    name: str = "cache_teacher"
    teacher: str | None = None  # HF checkpoint directory (ours or any transformers causal LM) with tokenizer.json
    teacher_format: str = "auto"  # auto (lfm2/lfm2_moe -> ours, else transformers) | lfm2 | transformers
    output: str | None = None  # cache directory; None = <output_dir>/teacher_cache (set it to resume a run)
    k: int = 32
    logprob_dtype: str = "float16"  # float16 | bfloat16 (2-byte words; fp16 is 8x more precise here)
    max_length: int = 2048  # longer documents are processed in windows
    window_overlap: int | None = None  # context repeated at each next window's start; None = max_length // 8
    max_tokens_per_batch: int = 16384  # rows x row length per teacher forward
    block_documents: int = 512  # documents per resumable block
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 (autocast)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attn
    hash_teacher_weights: bool = True  # identify the teacher by a sha256 of its weight files (else by path)
    overwrite: bool = False  # replace a cache (complete or not) made from another teacher/dataset/K
    progress_bar: bool = True
    stop_after_blocks: int | None = None  # debug: stop as if interrupted after this many blocks


# ---- stage: sft (issue 6) -------------------------------------------------------------------------------


# ---- stage: preference (issue 6) ------------------------------------------------------------------------


# ---- stage: merge (issue 7) -----------------------------------------------------------------------------


# ---- stage: eval (issue 8) ------------------------------------------------------------------------------


# ---- stage: search (issue 8) ----------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------ root
@dataclass
class RootConfig:
    defaults: list[Any] = field(default_factory=lambda: [
        "_self_",
        {"stage": "pretrain"},
        {"model": "tiny"},
        {"data": "default"},
        {"optim": "adamw"},
        {"trainer": "default"},
        {"distributed": "none"},
        {"logger": "default"},
        {"recipe": None},
    ])
    stage: Any = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    distributed: DistributedConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None = torch's default (1 for CPU training < 20M params)
    output_dir: str = "${hydra:runtime.output_dir}"


def register_configs() -> None:
    from ..model.presets import PRESETS

    cs = ConfigStore.instance()
    cs.store(name="lfm2_train", node=RootConfig)
    cs.store(group="stage", name="generate", node=GenerateStageConfig)
    cs.store(group="stage", name="pretrain", node=PretrainStageConfig)
    cs.store(group="stage", name="midtrain", node=PretrainStageConfig(name="midtrain"))
    cs.store(group="stage", name="cache_teacher", node=CacheTeacherStageConfig)
    cs.store(group="stage", name="distill", node=DistillStageConfig)
    # sft / preference (issue 6)
    # merge (issue 7)
    # eval / search (issue 8)
    for preset in PRESETS:
        cs.store(group="model", name=preset, node=ModelConfig(preset=preset))
    cs.store(group="data", name="default", node=DataConfig)
    cs.store(group="optim", name="adamw", node=OptimConfig)
    cs.store(group="trainer", name="default", node=TrainerConfig)
    cs.store(group="distributed", name="none", node=DistributedConfig(backend="none"))
    cs.store(group="distributed", name="ddp", node=DistributedConfig(backend="ddp"))
    cs.store(group="distributed", name="fsdp2", node=DistributedConfig(backend="fsdp2"))
    for stage in (1, 2, 3):
        node = DistributedConfig(backend="deepspeed", zero_stage=stage)
        cs.store(group="distributed", name=f"zero{stage}", node=node)
    cs.store(group="logger", name="default", node=LoggerConfig)
    cs.store(group="logger", name="disabled", node=LoggerConfig(wandb=False, wandb_mode="disabled", plot=False))
