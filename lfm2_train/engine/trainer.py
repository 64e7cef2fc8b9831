"""The training loop every stage shares.

A stage builds a `TrainJob` (model, batch source, loss, validation batches, what to export) and calls
`Trainer(cfg, job).fit()`. The loop owns: LR schedule, gradient accumulation normalised by the batch source's
loss normaliser summed over the *global* batch (so 1 process x 4 rows and 2 processes x 2 rows compute the same
update), clipping, the NaN/inf policy, validation, checkpoints, resume and signals. Stages extend it through
callbacks (`engine/callbacks.py`); the MoE bias update is one.

Host syncs: bookkeeping (normaliser, loss and metric sums, the stop flag) stays on the device and is reduced
with one collective per step; the loop reads it back once per step (`_read_step`), which the NaN/inf policy
needs before the optimizer step. The other syncs are listed in docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from ..artifacts import replace_dir, temp_sibling, write_model_manifest
from ..data.format import write_json_atomic
from ..data.prefetch import RankBatches
from ..exit_codes import EXIT_INTERRUPTED
from ..model import LFM2ForCausalLM
from ..model.hf_io import write_checkpoint
from ..model.lfm2 import read_state_dict
from ..model.lora import LoRAConfig
from ..model.peft_io import read_adapter_state, save_adapter
from .backends import make_backend
from .callbacks import Callback, ExpertBiasUpdate
from .checkpoint import CheckpointManager, load_tensors, rng_state, set_rng_state
from .dcp import MODEL_CONFIG, TOKENIZER_DIR
from .distributed import Runtime
from .observe import MetricsLogger, plot_losses
from .optim import LRSchedule

# (model, batch) -> (loss sum, labelled-token count[, {metric: sum over tokens}]); metrics are logged as means.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple]


SMALL_MODEL = 20_000_000  # parameters; below this, CPU training uses one intra-op thread unless `threads` is set


def cpu_bf16_support() -> bool | None:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX); None where we cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


class BatchSource(Protocol):
    """Where training batches come from. Two optional methods refine the bookkeeping:

    - `normaliser(batch) -> int tensor`: what the summed loss is divided by (default: non-ignored `labels`,
      the labelled tokens of an LM batch; a preference source counts pairs);
    - `tokens(batch) -> int tensor`: the real tokens of the batch, for `tokens`, `tok/s` and `tokens_seen`
      (default: the normaliser).
    """

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    @property
    def state(self) -> Any: ...


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row of the run; the message names the step."""


@dataclass
class TrainJob:
    model: LFM2ForCausalLM
    train: BatchSource
    loss_fn: LossFn
    val_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    tokenizer: Any = None  # saved next to exported weights
    inputs: dict[str, Any] = field(default_factory=dict)  # hashes of what went in, for the output manifest
    # Validation objective; None = loss_fn. (Distillation validates on plain CE, comparable across runs.)
    eval_loss_fn: LossFn | None = None
    # Extensions of the loop (schedules of loss weights and temperatures, ...), called after the built-in ones.
    callbacks: list[Callback] = field(default_factory=list)
    # LoRA: the model carries adapters (model/lora.py); checkpoints and the output hold only the adapter,
    # in PEFT's format, and the optimizer only its parameters.
    lora: LoRAConfig | None = None


class Trainer:
    def __init__(self, cfg: DictConfig, job: TrainJob, runtime: Runtime | None = None) -> None:
        self.cfg = cfg
        self.job = job
        self.runtime = runtime or Runtime.from_env(cfg.distributed)
        self.out_dir = Path(cfg.output_dir)
        t = cfg.trainer
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"trainer.precision={t.precision!r}; choose fp32 or bf16")
        if t.precision == "bf16" and self.runtime.device.type == "cpu" and cpu_bf16_support() is False:
            warnings.warn("trainer.precision=bf16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16): every "
                          "bf16 matmul is emulated and can be many times slower than fp32; use "
                          "trainer.precision=fp32 on this machine", stacklevel=2)
        if t.async_checkpoint and cfg.distributed.backend == "deepspeed":
            raise ValueError("trainer.async_checkpoint=true needs a torch backend (none | ddp | fsdp2); DeepSpeed "
                             "writes its own checkpoint format synchronously")
        if t.micro_batch_size < 1 or t.grad_accum < 1 or t.max_steps < 1:
            raise ValueError("trainer.micro_batch_size, trainer.grad_accum and trainer.max_steps must be >= 1")
        if job.lora is None and (OmegaConf.select(cfg, "model.lora.r", default=0)
                                 or OmegaConf.select(cfg, "model.lora.adapter", default=None)):
            raise ValueError(f"model.lora applies to stage=sft and stage=preference; stage={cfg.stage.name} trains "
                             "every weight — unset model.lora.r / model.lora.adapter")
        if cfg.threads is None and self.runtime.device.type == "cpu" and job.model.num_parameters() < SMALL_MODEL:
            # Tiny models are per-op-latency bound: a second OpenMP thread only adds wake-up cost, which turns
            # into milliseconds per op when the other core is busy (measured: 8x slower whole runs).
            torch.set_num_threads(1)
        self.backend = make_backend(job.model, cfg, self.runtime, trainable_only=job.lora is not None)
        if not isinstance(job.train, RankBatches):
            job.train = RankBatches(job.train, self.runtime.rank, self.runtime.world_size, t.get("prefetch", 1))
        self.schedule = LRSchedule.from_config(cfg.optim, t.max_steps)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", keep_last=t.keep_last)
        self.step = 0
        self.nan_skips = 0
        self.tokens_seen = 0
        # The latest logged train / validation metrics, kept in checkpoints so that re-running a finished
        # stage reports the same summary as the run that finished it.
        self.last_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._stop_agreed = False  # some rank was signalled (agreed through the step's collective)
        self.callbacks: list[Callback] = [ExpertBiasUpdate(), *job.callbacks]
        self._pending: _PendingCheckpoint | None = None  # an asynchronous checkpoint being written
        self._ckpt_group: Any = None

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def config(self):
        return self.job.model.config

    def _autocast(self):
        if self.cfg.trainer.precision == "bf16":
            return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _local_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch source (`RankBatches`) hands over only this rank's rows of the global micro-batch, whose
        order does not depend on the number of processes; they only need to reach the device."""
        return {k: v.to(self.runtime.device) for k, v in batch.items()}

    def _count(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch source's `normaliser` / `tokens` of a batch, as a long tensor on the device."""
        fn = getattr(self.job.train, name, None)
        if fn is None and name == "tokens":
            fn = getattr(self.job.train, "normaliser", None)
        value = fn(batch) if fn is not None else (batch["labels"] != -100).sum()
        return torch.as_tensor(value, dtype=torch.long, device=self.runtime.device)

    def _export(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        if self.job.lora is not None:
            save_adapter(state, self.job.lora, directory)
        else:
            write_checkpoint(state, self.config, directory)
        if self.job.tokenizer is not None:
            self.job.tokenizer.save_pretrained(directory)

    def _load_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        if self.job.lora is not None:
            return read_adapter_state(directory)
        return read_state_dict(directory, self.config)

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """A checkpoint of this step: the backend's (sharded) model and optimizer state, written by every rank,
        plus what rank 0 alone writes (trainer and data state, RNG, config, model config, tokenizer).

        With `trainer.async_checkpoint` the state is copied to host memory now and written by a background
        thread while training goes on; rank 0 renames the directory into place once every rank's files are on
        disk (DCP's future completes after the metadata, which is written last)."""
        self.finish_checkpoint()
        step, asynchronous = self.step, bool(self.cfg.trainer.async_checkpoint)

        def write_own(tmp: Path) -> None:
            torch.save(rng_state(), tmp / "rng.pt")
            state = {"step": self.step, "nan_skips": self.nan_skips, "tokens_seen": self.tokens_seen,
                     "data": _jsonable(self.job.train.state), "world_size": self.runtime.world_size,
                     "last_metrics": self.last_metrics, "val_metrics": self.val_metrics}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            (tmp / MODEL_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2))
            if self.job.tokenizer is not None:
                self.job.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)

        # Rank 0 creates the directory and its own files first; then every rank writes its shards into it.
        own = str(self.ckpt.save(step, write_own, commit=False)) if self.runtime.is_main else None
        tmp = Path(self.runtime.broadcast_object(own))
        group = self._checkpoint_group() if asynchronous else None
        try:
            future = self.backend.save(tmp, self._export, asynchronous=asynchronous, process_group=group)
        except BaseException as err:
            if self.runtime.is_main:
                self.ckpt.fail(step, err)
            raise
        path = self.ckpt.root / f"step-{step:08d}"
        if future is not None:
            self._pending = _PendingCheckpoint(future, step)
            if self.runtime.is_main:  # put it in place as soon as it is written, not only at the next save
                future.add_done_callback(lambda _: self._pending_commit(step))
            return path
        self.runtime.barrier()  # every rank's shards are on disk
        if self.runtime.is_main:
            self.ckpt.commit(step)
        self.runtime.barrier()
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def finish_checkpoint(self) -> None:
        """Wait for an asynchronous checkpoint still being written; rank 0 makes sure it is in place."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        try:
            pending.future.result()
        except BaseException:
            if self.runtime.is_main:
                self.ckpt.abandon(pending.step)
            raise
        if self.runtime.is_main:
            self._pending_commit(pending.step, pending)
        self.runtime.barrier()
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.ckpt.root / f"step-{pending.step:08d}")

    def _pending_commit(self, step: int, pending: _PendingCheckpoint | None = None) -> None:
        """Rank 0, from DCP's thread when the write completes or from `finish_checkpoint`: commit once."""
        pending = pending or self._pending
        if pending is None or pending.step != step:
            return
        with pending.lock:
            if pending.committed or pending.future.exception() is not None:
                return
            self.ckpt.commit(step)
            pending.committed = True

    def _checkpoint_group(self) -> Any:
        """Asynchronous saves run their collectives from a background thread: on a separate gloo group, never
        on the training group (NCCL), as torch.distributed.checkpoint recommends."""
        if not self.runtime.distributed:
            return None
        if self._ckpt_group is None:
            import torch.distributed as dist

            self._ckpt_group = dist.new_group(backend="gloo")
        return self._ckpt_group

    def _choose_resume_point(self) -> Path | None:
        """Rank 0 picks the checkpoint to continue from and sets aside the ones that are not in that run's
        past, so a later automatic resume can never pick them (see engine/checkpoint.py)."""
        mode = self.cfg.trainer.resume
        existing = self.ckpt.step_dirs()
        if mode == "never":
            if existing:
                print(f"trainer.resume=never: {len(existing)} checkpoint(s) of an earlier run in {self.ckpt.root} "
                      f"are moved to {self.ckpt.root / 'set-aside'}; starting from step 0")
            self.ckpt.retire_after(-1, "belongs to an earlier run (trainer.resume=never)")
            return None
        if mode == "auto":
            path = self.ckpt.latest_valid()
            kept = int(path.name.split("-")[1]) if path is not None else -1
            self.ckpt.retire_after(kept, "failed verification")
            if path is None and existing:
                print(f"WARNING: no valid checkpoint among the {len(existing)} in {self.ckpt.root}; "
                      f"starting from step 0")
            return path
        path = Path(mode)
        problem = CheckpointManager.verify(path) if path.is_dir() else "does not exist"
        if problem:
            raise FileNotFoundError(f"trainer.resume={mode}: checkpoint {problem}")
        if path.resolve().parent == self.ckpt.root.resolve():
            self.ckpt.retire_after(int(path.name.split("-")[1]), f"is newer than trainer.resume={mode}")
        return path

    def maybe_resume(self) -> Path | None:
        chosen = self._choose_resume_point() if self.runtime.is_main else None
        path = self.runtime.broadcast_object(str(chosen) if chosen else None)
        if path is None:
            return None
        path = Path(path)
        self.backend.load(path, self._load_weights)
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.nan_skips, self.tokens_seen = state["step"], state["nan_skips"], state["tokens_seen"]
        self.last_metrics = state.get("last_metrics") or {}
        self.val_metrics = state.get("val_metrics") or {}
        self.job.train.load_state(state["data"])
        set_rng_state(load_tensors(path / "rng.pt"))
        if self.runtime.is_main:
            print(f"Resumed from {path} at step {self.step}")
        return path

    # ---------------------------------------------------------------------------------------------- signals
    def _install_signals(self) -> dict[int, Any]:
        def handler(signum, _frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread (e.g. inside a test runner thread)
                pass
        return previous

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.job.val_batches:
            return {}
        model = self.backend.model
        model.eval()
        dev = self.runtime.device
        sums = torch.zeros(2, dtype=torch.float64, device=dev)  # loss sum, count: one host read at the end
        with self._autocast():
            for batch in self.job.val_batches:
                loss, n = (self.job.eval_loss_fn or self.job.loss_fn)(
                    model, {k: v.to(dev) for k, v in batch.items()})[:2]
                sums[0] += loss.detach().double()
                sums[1] += torch.as_tensor(n, device=dev).double()
        model.train()
        total, count = sums.tolist()
        val = total / max(count, 1)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    # ---------------------------------------------------------------------------------------------- the loop
    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; None if it was skipped (non-finite loss or gradient)."""
        t = self.cfg.trainer
        world, dev = self.runtime.world_size, self.runtime.device
        lr = self.schedule(self.step)
        self.backend.set_lr(lr)
        for cb in self.callbacks:
            cb.on_step_start(self, self.step)
        global_rows = t.micro_batch_size * world
        try:
            micro = [self._local_rows(self.job.train.next_batch(global_rows)) for _ in range(t.grad_accum)]
        except StopIteration:
            raise RuntimeError(f"training data exhausted at step {self.step}: the document sequence is shorter "
                               "than trainer.max_steps needs") from None
        # The normaliser, known before any backward, and the real tokens: reduced on the device, no host sync.
        local = torch.stack([sum(self._count("normaliser", b) for b in micro),
                             sum(self._count("tokens", b) for b in micro)])
        counts = self.runtime.all_reduce_sum(local)
        # DP wrappers average gradients over ranks; scale so the result is sum / n_global. (An empty batch makes
        # the scale inf; it is reported by _read_step before anything is applied.)
        scale = (world / counts[0].double()).float()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        extra: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            with self.backend.sync_context(i == len(micro) - 1), self._autocast():
                out = self.job.loss_fn(self.backend.model, batch)
                loss = out[0]
                self.backend.backward(loss * scale.to(loss.dtype))
            loss_sum += loss.detach().double()
            for k, v in (out[2] if len(out) > 2 else {}).items():
                v = torch.as_tensor(v, device=dev).detach().double()
                extra[k] = extra[k] + v if k in extra else v
        names = sorted(extra)
        stop = torch.tensor(float(self._stop_signal is not None), dtype=torch.float64, device=dev)
        sums = self.runtime.all_reduce_sum(torch.stack([loss_sum, stop, *(extra[k] for k in names)]))
        grad_norm_t = self.backend.clip_grad_norm(self.cfg.optim.grad_clip)
        n_global, tokens, loss_total, grad_norm, stopped, *extra_sums = self._read_step(counts, sums, grad_norm_t)
        self._stop_agreed = stopped > 0
        if n_global == 0:
            raise ValueError(f"step {self.step}: the batch has no labelled tokens (documents too short?)")
        loss_value = loss_total / n_global
        means = {k: v / n_global for k, v in zip(names, extra_sums)}
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.backend.zero_grad()
            self.nan_skips += 1
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            if self.nan_skips > t.max_nan_skips:
                raise TrainingDiverged(
                    f"non-finite {what} at step {self.step} ({self.nan_skips} skipped steps > trainer.max_nan_skips="
                    f"{t.max_nan_skips}); lower optim.lr or check the data of this step"
                )
            warnings.warn(f"step {self.step}: non-finite {what}; update skipped ({self.nan_skips}/{t.max_nan_skips})",
                          stacklevel=2)
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, None)
            return None
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        self.backend.step()
        self.backend.zero_grad()
        self.tokens_seen += tokens
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, **means}
        for cb in self.callbacks:
            cb.on_step_end(self, self.step, metrics)
        return metrics

    @staticmethod
    def _read_step(counts: torch.Tensor, sums: torch.Tensor, grad_norm: torch.Tensor | float) -> list[float]:
        """The step's one host sync: [normaliser, tokens, loss sum, grad norm, stop flag, metric sums...]."""
        norm = torch.as_tensor(grad_norm, dtype=torch.float64, device=sums.device).reshape(1)
        values = torch.cat([counts.double(), sums[:1], norm, sums[1:]]).tolist()
        values[0], values[1] = int(values[0]), int(values[1])
        return values

    def fit(self) -> dict[str, Any]:
        t = self.cfg.trainer
        self.maybe_resume()
        start_step = self.step
        run_config = OmegaConf.to_container(self.cfg, resolve=True)
        logger = MetricsLogger(self.out_dir, self.cfg, total_steps=t.max_steps, start_step=start_step,
                               enabled=self.runtime.is_main, run_config=run_config)
        previous_handlers = self._install_signals()
        status = "finished"
        started = time.perf_counter()
        self.backend.model.train()
        try:
            while self.step < t.max_steps:
                tick = time.perf_counter()
                metrics = self.train_step()
                self.step += 1
                if metrics is not None:
                    metrics["tok/s"] = metrics["tokens"] / max(time.perf_counter() - tick, 1e-9)
                    self.last_metrics = metrics
                    # Step 1 always: at real size a step takes minutes, and the first line says the run is alive.
                    if self.step % t.log_every == 0 or self.step == t.max_steps or self.step == 1:
                        logger.log(self.step, metrics)
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    val = self.evaluate()
                    if val:
                        self.val_metrics = val
                        logger.log(self.step, val)
                        for cb in self.callbacks:
                            cb.on_validation(self, val)
                logger.advance()
                # Ranks may receive SIGTERM at different step boundaries: they agree (any rank stopped -> all stop)
                # through the flag summed with the step's metrics, or one rank would checkpoint while another
                # trains on. One process needs no agreement and sees a signal as soon as the step ends.
                signalled = self._stop_agreed if self.runtime.distributed else self._stop_signal is not None
                stop = signalled or (t.stop_after_steps is not None and self.step >= t.stop_after_steps)
                if stop and self.step < t.max_steps:
                    self.save_checkpoint()
                    status = "interrupted"
                    if self.runtime.is_main:
                        why = f"signal {self._stop_signal}" if self._stop_signal else "trainer.stop_after_steps"
                        print(f"\nStopped at step {self.step} ({why}); checkpoint written. Re-run with "
                              f"trainer.resume=auto and the same output_dir to continue (exit code "
                              f"{EXIT_INTERRUPTED}).")
                    break
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                    self.save_checkpoint()
            self.finish_checkpoint()
        finally:
            self.job.train.close()
            logger.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

        # A re-run of a finished stage trains nothing; its summary still reports the run that finished it.
        summary: dict[str, Any] = {"status": status, "steps": self.step, "start_step": start_step,
                                   "seconds": round(time.perf_counter() - started, 2), "tokens": self.tokens_seen,
                                   "loss": self.last_metrics.get("loss"), **self.val_metrics}
        if status == "finished":
            if start_step < self.step:  # else the checkpoint we resumed from is this one
                self.save_checkpoint()
                self.finish_checkpoint()
            summary["final"] = str(self.export_final())
            if self.runtime.is_main and self.cfg.logger.plot:
                summary["loss_curve"] = _plot_or_warn(logger.jsonl_path, self.out_dir / "loss_curve.png",
                                                      self.cfg.stage.name)
        self.ckpt.wait()  # the background hashes of the large checkpoint files
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        if self.runtime.is_main:
            write_json_atomic(self.out_dir / "summary.json", summary)
        return summary

    def export_final(self) -> Path:
        """The stage's output: a Hugging Face directory (a PEFT adapter directory under LoRA) plus a manifest
        of what went in, put in place whole (temporary directory + rename), so a kill during the export never
        leaves a partial `final/`."""
        final = self.out_dir / "final"
        state = self.backend.full_model_state()
        if self.runtime.is_main:
            tmp = temp_sibling(final)
            self._export(state, tmp)
            write_model_manifest(tmp, {"stage": self.cfg.stage.name, "steps": self.step,
                                       "tokens_seen": self.tokens_seen, "inputs": self.job.inputs})
            replace_dir(tmp, final)
        self.runtime.barrier()
        return final


@dataclass
class _PendingCheckpoint:
    """An asynchronous save in flight; committed (renamed into place) exactly once, by rank 0."""

    future: Any
    step: int
    committed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _plot_or_warn(metrics_path: Path, png: Path, title: str) -> str | None:
    """The loss curve is a convenience: whatever goes wrong with it, the finished stage stays finished."""
    try:
        out = plot_losses(metrics_path, png, title=title)
    except Exception as err:  # noqa: BLE001 - a plot must never fail a stage
        warnings.warn(f"loss curve not drawn ({type(err).__name__}: {err}); {metrics_path} is intact", stacklevel=2)
        return None
    return str(out) if out else None


def _jsonable(state: Any) -> Any:
    if hasattr(state, "to_dict"):
        return state.to_dict()
    return state
