"""A training plan as a person reads it: per-rank peak memory by kind against the GPU's memory (fits / DOES
NOT FIT, with what to change), model FLOPs per token and tokens/s at an assumed MFU; one plan or a table."""

from __future__ import annotations

from dataclasses import dataclass

from .flops import FlopsPerToken
from .planner import StepMemory

GIB = 2**30
NOTES = ("MoE routing balanced; torch.compile not applied; CPU autocast for CUDA autocast; attention FLOPs for "
         "one document per row; CUDA context / NCCL / fragmentation covered by plan.reserved_gb")


@dataclass
class Plan:
    """One training config planned on `gpus` GPUs: what was measured and what it was measured against."""

    recipe: str
    stage: str
    preset: str
    backend: str
    gpus: int
    seq_len: int
    rows_per_gpu: int  # micro_batch_size (pairs count two rows)
    grad_accum: int
    memory: StepMemory | None  # None: the stage does not train
    flops: FlopsPerToken | None
    params: int
    gpu_memory_gb: float
    reserved_gb: float
    mfu: float
    peak_tflops: float
    seconds: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_gpu * self.gpus * self.grad_accum * self.seq_len

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.peak / GIB + self.reserved_gb <= self.gpu_memory_gb

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.mfu * self.peak_tflops * 1e12 / self.flops.total if self.flops else 0.0

    def verdict(self) -> str:
        if self.memory is None:
            return f"stage={self.stage} does not train: nothing to plan"
        need = self.memory.peak / GIB
        if self.fits:
            return f"fits: {need:.1f} GiB per rank + {self.reserved_gb:g} reserved <= {self.gpu_memory_gb:g} GiB"
        return (f"DOES NOT FIT: {need:.1f} GiB per rank + {self.reserved_gb:g} reserved > {self.gpu_memory_gb:g} "
                f"GiB per GPU on {self.gpus} GPU(s); lower trainer.micro_batch_size (raise grad_accum), turn on "
                "trainer.activation_checkpointing, or shard with distributed=fsdp2")

    def report(self) -> str:
        lines = [f"plan: recipe={self.recipe} stage={self.stage} model={self.preset} "
                 f"({self.params / 1e6:,.1f}M params) distributed={self.backend} on {self.gpus} GPU(s) x "
                 f"{self.gpu_memory_gb:g} GiB"]
        if self.memory is None:
            return "\n".join([*lines, f"  {self.verdict()}"])
        lines.append(f"  batch: {self.rows_per_gpu} row(s)/GPU x {self.seq_len} tokens x grad_accum {self.grad_accum} "
                     f"= {self.tokens_per_step:,} tokens per step")
        if self.memory is not None:
            m = self.memory
            lines.append(f"  per-rank peak: {m.peak / GIB:.2f} GiB = params {m.params / GIB:.2f} + grads "
                         f"{m.grads / GIB:.2f} + optimizer {m.optimizer / GIB:.2f} + activations "
                         f"{m.activations / GIB:.2f}")
        if self.flops is not None:
            tps = self.tokens_per_s_per_gpu
            lines.append(f"  model FLOPs/token: {self.flops.total / 1e9:.2f} GFLOP "
                         f"({self.flops.active_params / 1e9:.2f}B active weights; "
                         f"attention {self.flops.attention / 1e9:.2f} GFLOP)")
            lines.append(f"  at MFU {self.mfu:g} of {self.peak_tflops:g} TFLOP/s: {tps:,.0f} tokens/s per GPU, "
                         f"{tps * self.gpus:,.0f} tokens/s in all, {self.tokens_per_step / (tps * self.gpus):.2f} s "
                         "per step")
        lines.append(f"  {self.verdict()}")
        lines.append(f"  (assumed: {NOTES})")
        return "\n".join(lines)


def markdown_table(plans: list[Plan]) -> str:
    """Several plans as one table (the one in docs/SCALING.md)."""
    head = ("| recipe | stage | model | dist | GPUs | rows/GPU x seq | accum | params | grads | optim | activ | "
            "peak GiB | fits? | GFLOP/token | tok/s/GPU |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        if p.memory is None:
            rows.append(f"| {p.recipe} | {p.stage} | | | | | | | | | | | no training step | | |")
            continue
        m = p.memory
        g = [f"{x / GIB:.1f}" for x in (m.params, m.grads, m.optimizer, m.activations, m.peak)]
        fits = "yes" if p.fits else "**DOES NOT FIT**"
        rows.append(f"| {p.recipe} | {p.stage} | {p.preset} | {p.backend} | {p.gpus} | "
                    f"{p.rows_per_gpu} x {p.seq_len} | {p.grad_accum} | {' | '.join(g)} | {fits} | "
                    f"{p.flops.total / 1e9:.2f} | "
                    f"{p.tokens_per_s_per_gpu:,.0f} |")
    return "\n".join(rows)
