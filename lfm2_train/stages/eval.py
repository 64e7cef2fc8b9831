"""`stage=eval`: run a list of evaluation tasks on a checkpoint; write `eval_results.json`,
`eval_results.md` (and `eval_samples.jsonl`) to the run directory and print the table."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data.format import check_compatible, load_manifest
from ..data.resolve import resolve_dataset
from ..engine.model_setup import DTYPES, build_model
from ..evaluation.report import markdown_table, write_results
from ..evaluation.runner import make_runner
from ..evaluation.tasks import (
    ArithmeticSpec,
    GenerationSpec,
    LmEvalSpec,
    MultipleChoiceSpec,
    PerplexitySpec,
    TaskResult,
    parse_task,
    run_arithmetic,
    run_generation,
    run_lm_eval,
    run_multiple_choice,
    run_perplexity,
)
from ..tokenizer import checkpoint_tokenizer, model_tokenizer_dir


def _apply_limit(spec: Any, limit: int | None) -> Any:
    if limit:
        if isinstance(spec, ArithmeticSpec):
            spec.n = min(spec.n, limit)
        elif isinstance(spec, (GenerationSpec, MultipleChoiceSpec, LmEvalSpec)):
            spec.limit = min(spec.limit, limit) if spec.limit else limit
    return spec


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    if stage.dtype not in DTYPES:
        raise ValueError(f"stage.dtype={stage.dtype!r}; choose one of {sorted(DTYPES)}")
    raw_tasks = OmegaConf.to_container(stage.tasks, resolve=True) or []
    if not raw_tasks:
        raise ValueError("stage.tasks is empty: nothing to evaluate")
    specs = [_apply_limit(parse_task(t, i), stage.limit) for i, t in enumerate(raw_tasks)]  # fail before loading
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"stage.tasks has duplicate names {names}; set a distinct 'name' on each")

    if stage.quant is not None and stage.runner != "fast":
        raise ValueError(f"stage.quant={stage.quant} runs on the fast CPU path: set stage.runner=fast")
    model = build_model(cfg.model).to(DTYPES[stage.dtype]).eval()
    tokenizer = checkpoint_tokenizer(stage, cfg.model.init_from, model.config.vocab_size)
    runner = make_runner(model, stage.runner, stage.batch_size, quant=stage.quant)
    if not cfg.model.init_from:
        print(f"note: model.init_from is not set: evaluating a randomly initialised {cfg.model.preset!r} preset")

    results: list[TaskResult] = []
    for spec in specs:
        start = time.perf_counter()
        if isinstance(spec, PerplexitySpec):
            own = model_tokenizer_dir(cfg.model.init_from)  # the bundled corpus in the model's own tokens
            dataset_dir = Path(spec.path) if spec.path else resolve_dataset(cfg.data, tokenizer=own)[0]
            check_compatible(load_manifest(dataset_dir), tokenizer_fingerprint=tokenizer.fingerprint(),
                             vocab_size=model.config.vocab_size, source=str(dataset_dir))
            done = [run_perplexity(spec, runner, dataset_dir, cfg.data)]
        elif isinstance(spec, ArithmeticSpec):
            done = [run_arithmetic(spec, runner, tokenizer)]
        elif isinstance(spec, GenerationSpec):
            done = [run_generation(spec, runner, tokenizer)]
        elif isinstance(spec, MultipleChoiceSpec):
            done = [run_multiple_choice(spec, runner, tokenizer)]
        else:
            done = run_lm_eval(spec, runner, tokenizer)
        elapsed = time.perf_counter() - start
        for r in done:
            r.seconds = elapsed / len(done)
        results.extend(done)

    out_dir = Path(cfg.output_dir)
    header = {"model": cfg.model.init_from or f"random:{cfg.model.preset}", "params": model.num_parameters(),
              "dtype": stage.dtype, "runner": stage.runner,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    doc = write_results(out_dir, results, header)
    print("\n" + markdown_table(results) + f"\nresults in {out_dir / 'eval_results.json'}")
    return {"tasks": doc["tasks"], "output_dir": str(out_dir)}
