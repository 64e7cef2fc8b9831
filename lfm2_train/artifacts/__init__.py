"""What every on-disk artifact shares: atomic writes, content hashes and manifests.

- `atomic`: files and directories written through a temporary sibling and renamed into place;
- `hashing`: the sha256 digests stored in manifests and caches (file, settings, named files, checkpoint,
  adapter), byte-for-byte stable so old artifacts keep validating;
- `manifest`: JSON manifests read/written atomically and compared with a run's settings, with a readable
  `key: cached X, now Y` account of what changed;
- `cache`: the one root of the content-addressed caches (`$LFM2_TRAIN_CACHE`);
- `model_dir`: the model-directory manifest and the completeness check consumers run before trusting one.
"""

from .atomic import (
    replace_dir,
    save_npy_atomic,
    temp_sibling,
    write_array_atomic,
    write_json_atomic,
    write_text_atomic,
)
from .cache import CACHE_ENV, cache_root
from .hashing import (
    adapter_sha256,
    checkpoint_files,
    checkpoint_sha256,
    files_sha256,
    sha256_file,
    sha256_json,
)
from .manifest import DataFormatError, describe_differences, differences, read_manifest, write_manifest
from .model_dir import MODEL_MANIFEST, model_dir_problem, write_model_manifest

__all__ = [
    "CACHE_ENV",
    "cache_root",
    "MODEL_MANIFEST",
    "DataFormatError",
    "adapter_sha256",
    "checkpoint_files",
    "checkpoint_sha256",
    "describe_differences",
    "differences",
    "files_sha256",
    "model_dir_problem",
    "read_manifest",
    "replace_dir",
    "save_npy_atomic",
    "sha256_file",
    "sha256_json",
    "temp_sibling",
    "write_array_atomic",
    "write_json_atomic",
    "write_manifest",
    "write_model_manifest",
    "write_text_atomic",
]
