"""Config schemas: one dataclass per group, registered in Hydra's ConfigStore.

Groups: `stage`, `model`, `data`, `optim`, `trainer`, `distributed`, `logger`, plus `recipe` (YAML files in
`recipes/` that set values across groups). Every node is typed, so a misspelled key in a
YAML file or on the command line fails with Hydra's "Key 'x' not in 'YConfig'" naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


# ------------------------------------------------------------------------------------------------ model
@dataclass
class LoRASchema:
    """LoRA / QLoRA for sft and preference (docs/LORA.md): frozen base, adapters saved in PEFT's format.
    Field names follow `peft.LoraConfig`."""

    r: int = 0  # adapter rank; 0 = off (full fine-tuning)
    lora_alpha: float = 16.0  # scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # on the adapter's input, training only
    # module names (a module matches a name it equals or ends with after a dot), or one regex string, or
    # "all-linear"; add embed_tokens to adapt the token embedding too
    target_modules: Any = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj",
                                                         "w1", "w2", "w3"])
    use_rslora: bool = False
    init_lora_weights: Any = True  # true (A kaiming-uniform, B zero) | gaussian | false (random B: tests only)
    adapter: str | None = None  # keep training this PEFT adapter directory (its adapter_config sets r, alpha, targets)
    quantize: str = "none"  # QLoRA base: none | nf4 | fp4 | int8 (CUDA + bitsandbytes: pip install lfm2_train[qlora])
    compute_dtype: str = "bfloat16"  # QLoRA 4-bit matmul dtype: bfloat16 | float16 | float32


@dataclass
class ModelConfig:
    """Where the weights come from: `init_from` (an HF LFM2 directory, or a PEFT adapter directory folded into
    its base) wins over `preset` (random init)."""

    preset: str = "tiny"
    init_from: str | None = None
    # LFM2Config fields to change on top of the preset (e.g. {hidden_size: 256}); validated by LFM2Config.
    overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"  # sdpa | flash_attn | eager
    lora: LoRASchema = field(default_factory=LoRASchema)


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

    path: str | None = None  # token shards (None = bundled corpus); sft/preference: chat shards (None = stage.dataset)
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
    async_checkpoint: bool = False  # write checkpoints in the background (torch backends; DCP async_save)
    resume: str = "auto"  # auto | never | <checkpoint dir>
    max_nan_skips: int = 3
    log_every: int = 1
    prefetch: int = 1  # batches this rank prepares ahead on a background thread (0 = inside the step)
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
    wandb_console: bool = False  # wandb's own console output; off = one summary line per stage


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
    wait_timeout_s: float = 3600.0  # rank 0 waits at most this long for the other ranks' shards, then fails


# ---- stage: sft ----------------------------------------------------------------------------------------

@dataclass
class SFTCurriculumSchema:
    """Easy -> hard order of the SFT conversations (docs/SFT.md)."""

    source: str = "none"  # none (seeded shuffle per epoch) | column | file
    column: str = "difficulty"  # source=column: the dataset column holding a difficulty (higher = harder)
    file: str | None = None  # source=file: written by `python -m data_pipelines.sft_difficulty`
    method: str = "sort"  # sort | buckets (lfm2_train.data.curriculum_order.build_order)
    n_buckets: int = 10


@dataclass
class SFTStageConfig:
    """`stage=sft`: masked cross-entropy on chat data, packed per conversation, optionally easy -> hard.

    Sequence length, validation split and seed come from `data.seq_len`, `data.val_fraction`,
    `data.val_max_documents`, `data.seed` (and `data.pacing`); `recipe=sft` sets the report's optimiser.
    """

    name: str = "sft"
    dataset: str | None = None  # datasets-loadable jsonl/json/parquet/csv file or dir; None = bundled arithmetic
    split: str = "train"
    messages_field: str = "messages"
    tools_field: str = "tools"  # optional column of JSON-schema tool lists
    tokenizer: str | None = None  # default: model.init_from's tokenizer, else the bundled tiny one
    bundled_rows: int = 2000  # dataset=None: rows of chat arithmetic generated from bundled_seed
    bundled_seed: int = 0
    bundled_levels: list[int] | None = None  # subset of lfm2_train.tasks.arithmetic.LEVELS; None = all
    epochs: float | None = 3.0  # sets trainer.max_steps; None = trainer.max_steps decides (data repeats)
    embedding_dropout: float = 0.0  # dropout on the embedding output (the only dropout LFM2 SFT uses)
    # Share of every batch's rows replayed from pre-training shards (keeps the language model; 0 = off)
    mix_pretrain: float = 0.0
    mix_data: str | None = None  # token shards to replay (the model's tokenizer); None = the bundled corpus
    cache_dir: str | None = None  # datasets cache for loading files; None = the datasets default
    curriculum: SFTCurriculumSchema = field(default_factory=SFTCurriculumSchema)


# ---- stage: preference ---------------------------------------------------------------------------------

@dataclass
class PreferenceLossTermSchema:
    """One term of the preference loss: dpo | ln_dpo | apo_zero | ln_apo_zero | ipo | hinge | simpo | nll, or a
    TRL name: sigmoid | sigmoid_norm | sft (= dpo | ln_dpo | nll) | robust | exo_pair | nca_pair | bco_pair |
    sppo_hard | aot | aot_unpaired | apo_down | discopop (docs/PREFERENCE.md)."""

    name: str = "ln_dpo"
    weight: float = 1.0
    length_normalize: bool | None = None  # None = the name's default (ln_*, sigmoid_norm, simpo: on; ipo: conventions)


@dataclass
class PreferenceStageConfig:
    """`stage=preference`: a weighted sum of direct-alignment losses on preference pairs (docs/PREFERENCE.md).

    Pairs longer than `data.seq_len` (prompt + response) are skipped; `data.val_fraction`,
    `data.val_max_documents` and `data.seed` hold out validation pairs; `recipe=preference` sets the
    report's optimiser (LR 8e-7 -> 8e-8 cosine).
    """

    name: str = "preference"
    dataset: str | None = None  # pairs: datasets-loadable jsonl/json/parquet/csv file or dir (prompt/chosen/rejected)
    split: str = "train"
    plain_text: str = "chat"  # string rows: chat (user / assistant turns with the template) | raw (texts as they are)
    tokenizer: str | None = None  # default: model.init_from's tokenizer, else the bundled tiny one
    losses: list[PreferenceLossTermSchema] = field(default_factory=lambda: [PreferenceLossTermSchema()])
    beta: float = 5.0
    label_smoothing: float = 0.0  # cDPO for dpo / simpo; eps of robust, exo_pair, aot, aot_unpaired
    margin: float = 0.0  # simpo's target reward margin gamma (TRL: simpo_gamma)
    conventions: str = "native"  # native | trl_compatible: TRL's numbers for TRL's names (ipo, nll, sigmoid)
    nll_reduction: str | None = None  # pair | token (chosen tokens' mean per micro-batch); None = the conventions'
    ld_alpha: float | None = None  # LD-DPO: weight of the tokens past the shorter response; None = off
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5  # alpha of alpha_divergence
    discopop_tau: float = 0.05  # discopop's temperature
    reference: str | None = None  # pi_ref HF directory; None = model.init_from
    ref_cache: str | None = None  # None = $LFM2_TRAIN_CACHE/ref_logps/<key> (content-addressed)
    ref_cache_overwrite: bool = False  # an explicit ref_cache made from other inputs: recompute (else refuse)
    ref_batch_pairs: int = 16  # pairs per reference forward
    epochs: float | None = 2.0  # sets trainer.max_steps; None = trainer.max_steps decides
    cache_dir: str | None = None  # datasets cache for loading files


# ---- stage: merge --------------------------------------------------------------------------------------
@dataclass
class MergeStageConfig:
    """`stage=merge`: mergekit-style merges streamed tensor by tensor, optionally chosen by evaluation.

    The merge configuration comes from `config` (a mergekit YAML) and/or the inline fields below (inline
    wins); see docs/MERGE.md. Several `candidates` and/or a `grid` with an `evaluation` run a selection.
    """

    name: str = "merge"
    config: str | None = None  # mergekit-style YAML file
    merge_method: str | None = None  # linear | slerp | task_arithmetic | ties | dare_ties | dare_linear | della | ...
    base_model: str | None = None  # checkpoint directory the task vectors are taken against
    models: list[Any] | None = None  # [{model: dir, parameters: {...}}]
    slices: list[Any] | None = None  # [{sources: [{model: dir, layer_range: [start, end)}]}] (replaces models)
    parameters: dict[str, Any] = field(default_factory=dict)  # global parameters (laid over the file's)
    dtype: str | None = None  # float32 | bfloat16 | float16; None = the base model's dtype
    tokenizer_source: str | None = None  # base (default) | a model directory
    expert_bias: str | None = None  # MoE routing bias: base (default) | mean
    candidates: list[Any] | None = None  # partial configurations merged over the one above (each may set name)
    grid: dict[str, Any] = field(default_factory=dict)  # {parameter or dotted key: [values]}, e.g. {t: [0.25, 0.75]}
    evaluation: str = "none"  # none | val_loss (data.path held-out split) | arithmetic
    eval_seq_len: int | None = None  # val_loss: None = data.seq_len
    eval_max_documents: int | None = None  # val_loss: None = data.val_max_documents
    eval_batch_size: int = 8  # rows (val_loss) or prompts (arithmetic) per forward
    eval_problems: int = 64  # arithmetic: problems (seeded by the root seed)
    eval_levels: list[int] | None = None  # arithmetic: task levels (lfm2_train.tasks.arithmetic.LEVELS); None = all
    eval_max_new_tokens: int = 24  # arithmetic: greedy tokens per answer
    include_inputs: bool = True  # rank the input models too
    select_inputs: bool = False  # the output may be an unmerged input when it outranks every merge
    keep_candidates: bool = True  # keep every candidate's directory under candidates/
    max_shard_size: str = "2GB"  # output safetensors shard size (e.g. 500MB, 5GB)
    hash_inputs: bool = True  # sha256 of every input weight file in the manifest
    # fold this PEFT adapter directory into base_model (None: the base it records) instead of a merge method;
    # adapter directories given as base_model / models / slices inputs are folded before merging either way
    merge_adapter: str | None = None




# ---- stage: eval ---------------------------------------------------------------------------------------
@dataclass
class EvalStageConfig:
    """`stage=eval`: a list of tasks on `model.init_from` (docs/EVAL.md). Each task is a mapping with a
    `kind` (perplexity | arithmetic | generation | multiple_choice | lm_eval) and that kind's keys."""

    name: str = "eval"
    tokenizer: str | None = None  # default: the checkpoint's own tokenizer, else the bundled tiny one
    tasks: list[Any] = field(default_factory=lambda: [{"kind": "perplexity"}, {"kind": "arithmetic"}])
    runner: str = "reference"  # inference path for generation / scoring (lfm2_train.evaluation.RUNNERS)
    # runner=fast only: int8 | w8a8 | q4_0 weights for generation tasks (what a quantized deployment answers);
    # scoring (perplexity, multiple choice) reads the model's own weights
    quant: str | None = None
    batch_size: int = 16  # prompts per generation batch, requests per scoring batch
    dtype: str = "float32"  # float32 | bfloat16
    limit: int | None = None  # at most this many examples per task (quick checks); None = all



# ---- stage: search -------------------------------------------------------------------------------------
@dataclass
class SearchSpaceSchema:
    """The grid of layouts; every combination within the parameter budget is a candidate."""

    hidden_sizes: list[int] = field(default_factory=lambda: [64, 128])
    num_layers: list[int] = field(default_factory=lambda: [4, 6])
    attention_counts: list[int] = field(default_factory=lambda: [1, 2])
    placements: list[str] = field(default_factory=lambda: ["spread"])  # spread | late | early
    conv_L_cache: list[int] = field(default_factory=lambda: [3, 5])  # short-conv kernel sizes
    ff_ratios: list[float] = field(default_factory=lambda: [3.0])  # SwiGLU width / hidden size
    head_dim: int = 16


@dataclass
class SearchStageConfig:
    """`stage=search`: measure layouts on this machine, train each briefly, rank on the quality /
    latency / memory front (docs/SEARCH.md). Other keys of `model` (vocab, norms, ...) come from `model.preset`."""

    name: str = "search"
    space: SearchSpaceSchema = field(default_factory=SearchSpaceSchema)
    param_budget: int = 1_000_000  # total parameters (tied head counted once)
    min_params: int = 0
    max_candidates: int | None = 8  # seeded sample when more layouts fit; None = all
    # measurement (one subprocess per candidate)
    contexts: list[int] = field(default_factory=lambda: [128, 512])  # prompt lengths
    decode_tokens: int = 32
    batch_size: int = 1
    threads: int = 1
    dtype: str = "float32"  # float32 | bfloat16
    repeats: int = 2
    runtime: str = "fast"  # fast (lfm2_train/inference/fast.py, the deployment path) | reference (the training model)
    measure_timeout_s: float = 300.0
    # budgets (None = none); latency budgets apply at every context
    max_ttft_ms: float | None = None
    max_decode_ms: float | None = None  # decode p95 per token
    max_rss_mb: float | None = None
    # quality proxy: a short pretrain run on the run's `data`, then the validation loss
    train_steps: int = 40
    train_seq_len: int = 128
    train_batch_size: int = 8
    val_documents: int = 64
    # ranking
    latency_metric: str = "decode_p50_ms"  # ttft_ms | decode_p50_ms | decode_p95_ms, at the largest context
    memory_metric: str = "peak_rss_mb"  # peak_rss_mb | rss_delta_mb
    reference_point: list[float] | None = None  # (loss, latency, memory); None = nadir + margin x range
    reference_margin: float = 0.1



# ---- stage: chain -------------------------------------------------------------------------------------
@dataclass
class ChainStageConfig:
    """`stage=chain` (the default): the whole pipeline from one chain file (docs/CHAIN.md)."""

    name: str = "chain"
    chain: str = "tiny"  # a packaged chain (recipes/chains/<name>.yaml) or a path to a chain YAML
    workdir: str | None = None  # None = outputs/chain-<chain name>; fixed so re-running skips / resumes
    until: str | None = None  # stop after this step (the steps before it still skip / resume)
    eval_problems: int = 128  # chat-arithmetic problems scored after each `evaluate: true` step
    eval_seed: int = 12345  # the same problems for every model of the chain
    eval_levels: list[int] | None = None  # task levels (lfm2_train/tasks/arithmetic.py LEVELS); None = the chain's


# ---- stage: export ---------------------------------------------------------------------------------------
@dataclass
class ExportStageConfig:
    """`stage=export`: a trained model directory as a Hugging Face directory or a llama.cpp GGUF file
    (docs/DEPLOY.md). The output goes to `stage.output`, or `<output_dir>/model` (hf) /
    `<output_dir>/model-<dtype>.gguf` (gguf); a summary to `<output_dir>/summary.json`.
    dtypes: hf float32 | bfloat16 | float16; gguf f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0."""

    name: str = "export"
    source: str | None = None  # the model directory to export; None = model.init_from
    format: str = "hf"  # hf | gguf
    dtype: str | None = None  # weight / quantisation type (see above); None = as stored (hf), f16 (gguf)
    output: str | None = None  # output path (a directory for hf, a file for gguf); None = under output_dir
    check_transformers: bool = True  # hf: load the copy in transformers (when installed) and compare logits
    tokenizer: str | None = None  # gguf: directory with tokenizer.json / tokenizer_config.json; None = source
    pre_tokenizer: str | None = None  # gguf: llama.cpp's tokenizer.ggml.pre; None = detected (lfm2 | gpt-2)
    model_name: str | None = None  # gguf: general.name; None = the source directory's name
    # gguf: the output projection's type (output.weight, or token_embd.weight when tied); None = dtype.
    # llama.cpp keeps it above 4 bits (q8_0 here) in its q4 files; FastLFM2's q4_0 keeps its head at 8 bits too.
    output_dtype: str | None = None
    # a PEFT adapter directory folded into `source` first (a source that is itself an adapter directory is
    # folded into the base it records without this)
    merge_adapter: str | None = None


# ---- stage: plan ----------------------------------------------------------------------------------------
@dataclass
class PlanStageConfig:
    """`stage=plan`: per-rank memory and throughput of a training recipe at real size, on fake tensors
    (docs/SCALING.md). The node is open: a recipe's own stage keys (stage.teacher_cache, stage.kd, ...)
    compose under it, and the planner re-reads the recipe to learn which stage it plans. Its settings are
    the root key `plan` (PlanConfig)."""

    name: str = "plan"


@dataclass
class PlanConfig:
    """Settings of `stage=plan` (ignored by every other stage)."""

    gpus: int | None = None  # world size; None = the GPU count the recipe states (1 when it states none)
    gpu_memory_gb: float = 80.0  # memory of one GPU, GiB
    reserved_gb: float = 5.0  # CUDA context, NCCL buffers, allocator fragmentation: not tensors, not tracked
    mfu: float = 0.4  # model FLOPs utilisation assumed for the throughput estimate
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU (989 = H100 SXM)
    all_recipes: bool = False  # plan every shipped recipe on its stated hardware (a markdown table)
    recipes: list[str] = field(default_factory=list)  # or plan these recipes so (a markdown table)


# ------------------------------------------------------------------------------------------------ root
@dataclass
class RootConfig:
    defaults: list[Any] = field(default_factory=lambda: [
        "_self_",
        {"stage": "chain"},
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
    plan: PlanConfig = field(default_factory=PlanConfig)  # read by stage=plan only
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
    cs.store(group="stage", name="chain", node=ChainStageConfig)
    cs.store(group="stage", name="sft", node=SFTStageConfig)
    cs.store(group="stage", name="preference", node=PreferenceStageConfig)
    cs.store(group="stage", name="merge", node=MergeStageConfig)
    cs.store(group="stage", name="eval", node=EvalStageConfig)
    cs.store(group="stage", name="search", node=SearchStageConfig)
    cs.store(group="stage", name="export", node=ExportStageConfig)
    # plan: an open node, so a recipe's stage keys (stage.teacher_cache, stage.kd, ...) compose under it
    plan_node = OmegaConf.structured(PlanStageConfig)
    OmegaConf.set_struct(plan_node, False)
    cs.store(group="stage", name="plan", node=plan_node)
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
