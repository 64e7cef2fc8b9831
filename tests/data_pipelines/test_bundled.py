"""The bundled dataset's cache directory: stable for one installation, distinct for another checkout."""

from pathlib import Path

import data_pipelines.bundled as bundled


def test_cache_key_is_stable_and_tied_to_the_installed_location(monkeypatch, tmp_path):
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path))
    first = bundled.bundled_dataset_dir()
    assert first == bundled.bundled_dataset_dir() and first.parent == tmp_path
    monkeypatch.setattr(bundled, "bundled_corpus_dir", lambda: Path("/elsewhere/lfm2_train/assets/corpus"))
    assert bundled.bundled_dataset_dir() != first  # another checkout: its own directory, not a refusal
