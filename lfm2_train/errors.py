"""Which exceptions are a person's to fix (bad paths, values, inputs), and how they are shown.

Such errors print as one or two lines naming the key or file and exit with `EXIT_USAGE`; the traceback is
for bugs, and for anyone who asks for it with `HYDRA_FULL_ERROR=1` (Hydra's own switch) or `--verbose`.
"""

from __future__ import annotations

import os
import sys

from .engine.checkpoint import CheckpointError as TrainingCheckpointError
from .engine.trainer import TrainingDiverged
from .exit_codes import EXIT_USAGE
from .inference.native import NativeKernelError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # config values, data formats, chain / merge specs, incompatible inputs (all subclass it)
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    TrainingCheckpointError, TrainingDiverged, NativeKernelError,
)


def verbose_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or "--verbose" in argv


def pop_verbose_flag(argv: list[str]) -> bool:
    """Remove `--verbose` (Hydra would refuse it) and turn it into Hydra's own switch."""
    if "--verbose" not in argv:
        return False
    argv.remove("--verbose")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    return True


def report(err: BaseException) -> int:
    """Print `err` for a person and return the exit code; re-raise what is not a user error."""
    if not isinstance(err, USER_ERRORS) or verbose_requested():
        raise err
    message = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and message.startswith("'"):
        message = message.strip("'")
    print(f"error: {message}", file=sys.stderr)
    print("(run with --verbose or HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
    return EXIT_USAGE
