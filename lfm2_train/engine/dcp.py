"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), and their conversion to Hugging Face.

Every rank writes its own shards of the model and optimizer state into `<checkpoint>/dcp/` (one `.distcp`
file per rank plus DCP's `.metadata`); nothing is gathered onto one rank. The state is keyed by parameter
name (`model.<fqn>`, `optim.state.<fqn>.exp_avg`, ...), so a checkpoint loads into any world size and any
of `none | ddp | fsdp2`: DCP reads, for each rank, exactly the slices its (sharded or whole) tensors need.

Nothing in a checkpoint runs code when read. DCP itself unpickles `.metadata` with `pickle.load` and
non-tensor items with `torch.load(weights_only=False)`; here `.metadata` goes through `SafeReader`, an
unpickler that only builds DCP's own metadata classes (and torch sizes, dtypes, paths), and non-tensor items
through `SafeLoadPlanner` with `torch.load(weights_only=True)`. Tensor data is read by DCP with
`weights_only=True` already.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

from .checkpoint import CheckpointError, rank_errors

DCP_DIR = "dcp"
MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"

_SAFE_MODULE_PREFIX = "torch.distributed.checkpoint."
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                 ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global named in the pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module.startswith(_SAFE_MODULE_PREFIX) and "." not in name) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata")


def read_metadata(path: Path) -> Metadata:
    """`.metadata` of a DCP directory, unpickled with the restricted unpickler."""
    try:
        data = path.read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:
        raise CheckpointError(f"{path} holds something other than DCP metadata ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}); refusing to unpickle it. A "
                              f"checkpoint written by this framework never does: delete the checkpoint or resume "
                              f"from another one") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} is not DCP metadata ({type(metadata).__name__})")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read without running code (see `read_metadata`)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyper-parameters) are read with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn} holds something other than plain "
                                  f"values ({type(err).__name__}); refusing to unpickle it") from None
        self.state_dict[read_item.dest_index.fqn] = obj


def save(state: dict[str, Any], directory: Path, process_group: Any = None, asynchronous: bool = False
         ) -> Future | None:
    """Write `state` (nested dicts of tensors / DTensors / plain values) as DCP into `directory`. Collective.

    asynchronous: the state is copied to host memory now and written by a background thread; the returned
    future completes once every rank's files and the metadata are on disk."""
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1)
    with _one_process_quietly():
        if asynchronous:
            response = dcp.async_save(state, storage_writer=writer, process_group=process_group)
            return getattr(response, "upload_completion", response)
        dcp.save(state, storage_writer=writer, process_group=process_group)
    return None


def load(state: dict[str, Any], directory: Path, process_group: Any = None) -> None:
    """Fill `state` in place from the DCP checkpoint in `directory` (any world size wrote it). Collective."""
    read_metadata(Path(directory) / ".metadata")  # refuse a foreign metadata file before DCP touches it
    try:
        with _one_process_quietly():
            dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner(),
                     process_group=process_group)
    except CheckpointException as err:  # DCP wraps each rank's error; ours name the file and what to do
        for exc in rank_errors(err):
            if isinstance(exc, CheckpointError):
                raise exc from None
        raise


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """Without a process group DCP works in one process, and warns each time that it assumes so: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---------------------------------------------------------------------------------------------- export
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A training checkpoint (`checkpoints/step-N/`) -> a Hugging Face directory, in one process.

    The model part of the DCP state is read into a model built on the CPU from the checkpoint's
    `model_config.json` (the optimizer state is never read); the tokenizer saved with the checkpoint is copied.
    The output is written into a temporary sibling and renamed, so a kill never leaves a partial directory."""
    from ..artifacts import replace_dir, temp_sibling
    from ..model import LFM2Config, LFM2ForCausalLM
    from ..model.hf_io import write_checkpoint
    from .checkpoint import CheckpointManager

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / DCP_DIR).is_dir():
        raise CheckpointError(f"{checkpoint} has no {DCP_DIR}/ directory: not a sharded training checkpoint "
                              f"(checkpoints of DeepSpeed runs hold their weights in model/ already)")
    problem = CheckpointManager.verify(checkpoint)
    if problem:
        raise CheckpointError(f"{checkpoint}: {problem}; not exporting it")
    config = LFM2Config.from_dict(json.loads((checkpoint / MODEL_CONFIG).read_text()),
                                  source=str(checkpoint / MODEL_CONFIG))
    with torch.device("meta"):
        model = LFM2ForCausalLM(config)
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    state = {"model": model.state_dict()}
    if config.tie_word_embeddings:
        del state["model"]["lm_head.weight"]  # stored once, as the embedding
    load(state, checkpoint / DCP_DIR)
    tmp = temp_sibling(out_dir)
    write_checkpoint(state["model"], config, tmp)
    tokenizer = checkpoint / TOKENIZER_DIR
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
    replace_dir(tmp, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m lfm2_train.engine.dcp <checkpoint dir> <output dir>`: export a training checkpoint."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lfm2_train.engine.dcp <checkpoint dir (checkpoints/step-N)> <output HF dir>")
        return 2
    out = export_checkpoint(args[0], args[1])
    print(f"exported {args[0]} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
