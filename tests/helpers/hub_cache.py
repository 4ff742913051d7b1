"""A Hugging Face hub cache written by hand, so that hub ids resolve offline: what ``from_pretrained("ORG/NAME")``
finds after a download, without the download.

The layout is the hub cache's: ``HF_HUB_CACHE/models--ORG--NAME/snapshots/COMMIT/`` holds the files and
``refs/main`` names ``COMMIT``. Used by the tests' offline hub fixtures and by ``benchmarks/real_shape.py`` and
``benchmarks/gpu_check.py`` (which put a random-init model of a recipe's architecture under a local hub id).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_of(repo_id: str) -> str:
    """A stable 40-hex "commit" for ``repo_id`` (the cache only needs refs/main to name a snapshot directory)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def save_to_hub_cache(model, tokenizer, hf_home: str | os.PathLike[str], repo_id: str) -> Path:
    """Save ``model`` and ``tokenizer`` as the hub cache under ``hf_home`` holds a downloaded ``repo_id``; returns
    the snapshot directory."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit_of(repo_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit_of(repo_id))
    return snapshot


def offline_env(hf_home: str | os.PathLike[str]) -> dict[str, str]:
    """The environment that makes transformers and datasets use only the cache under ``hf_home``. The library
    modules read these variables once, at import: a child process gets them this way, this process needs
    :func:`patch_offline` too."""
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(Path(hf_home) / "hub"),
            "HF_DATASETS_CACHE": str(Path(hf_home) / "datasets"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def patch_offline(monkeypatch, hf_home: str | os.PathLike[str]) -> None:
    """Point this process's already imported huggingface_hub, transformers and datasets at the cache under
    ``hf_home``, offline (``monkeypatch`` undoes it after the test)."""
    import datasets.config
    from huggingface_hub import constants

    env = offline_env(hf_home)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HOME", env["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))


def save_dataset_to_cache(splits: dict[str, list[dict]], hf_home: str | os.PathLike[str], repo_id: str,
                          config_name: str = "default") -> Path:
    """Put ``splits`` (rows by split name) where an offline ``load_dataset(repo_id, config_name)`` finds them.

    Offline, datasets does not read the hub cache but its own cache of prepared datasets,
    ``HF_DATASETS_CACHE/ORG___NAME/CONFIG/VERSION/COMMIT/NAME-SPLIT.arrow``, which a first online load writes. This
    writes it with the JSON builder load_dataset uses for a repository of JSONL files, then moves the config
    directory to the name a download gives it (built from local files, it would carry a hash of their paths).
    Returns the config directory.
    """
    import json
    import shutil

    from datasets.packaged_modules.json.json import Json

    home, name = Path(hf_home), repo_id.split("/")[-1]
    sources = home / "dataset-sources" / repo_id / config_name
    sources.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (sources / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(cache_dir=str(home / "dataset-build"), dataset_name=name, config_name=config_name,
                   data_files={split: str(sources / f"{split}.jsonl") for split in splits}, hash=commit_of(repo_id))
    builder.download_and_prepare()
    target = home / "datasets" / repo_id.replace("/", "___") / config_name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(Path(builder.cache_dir).parents[1], target)
    return target
