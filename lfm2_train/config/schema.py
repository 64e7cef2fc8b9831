"""Config schemas. Each stage owns one dataclass; `RootConfig` holds what every stage shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class GenerateStageConfig:
    """`stage=generate`: load a checkpoint (or build a preset with random weights) and complete prompts."""

    name: str = "generate"
    checkpoint: str | None = None  # Hugging Face LFM2 directory; None = `preset` with random weights
    preset: str = "tiny"  # used only when checkpoint is None
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
    attn_implementation: str = "sdpa"  # sdpa | flash_attn | eager
    save_checkpoint: bool = True  # write the model (HF format) into the run directory


@dataclass
class RootConfig:
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"stage": "generate"}])
    stage: Any = MISSING
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None = torch's default
    output_dir: str = "${hydra:runtime.output_dir}"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="lfm2_train", node=RootConfig)
    cs.store(group="stage", name="generate", node=GenerateStageConfig)
