"""Model merging (mergekit's methods and YAML), streamed tensor by tensor, with selection by evaluation."""

from .checks import MergeCompatibilityError
from .config import METHODS, MergeConfigError, MergeSpec, load_merge_config, parse_merge_config
from .runner import MergePlan, merge_checkpoints
from .selection import arithmetic_evaluation, expand_candidates, select_merge, validation_loss_evaluation

__all__ = ["METHODS", "MergeCompatibilityError", "MergeConfigError", "MergePlan", "MergeSpec", "arithmetic_evaluation",
           "expand_candidates", "load_merge_config", "merge_checkpoints", "parse_merge_config", "select_merge",
           "validation_loss_evaluation"]
