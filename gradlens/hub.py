"""Hugging Face hub ids: what a failed ``from_pretrained``/``load_dataset`` of one means, in one line.

transformers and datasets wrap the hub's errors in ``OSError``/``ConnectionError`` with messages written for their
own users ("We couldn't connect to 'https://huggingface.co'..." even when offline mode forbade connecting). The
original ``huggingface_hub`` exception stays in the chain (``__cause__``/``__context__``), so the cause is read
from its class, not from the wording.
"""

from __future__ import annotations

from collections.abc import Iterator

from gradlens.errors import cause


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception it was raised from or during, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def hub_cause(error: BaseException, repo_id: str, *, repo_type: str = "model", revision: str | None = None
              ) -> str | None:
    """Why loading the hub id ``repo_id`` failed, as the end of a one-line error, or None when ``error`` does not
    come from the hub (a broken file, a bad config: the caller's own message applies).

    Causes, by ``huggingface_hub`` exception class: a gated repository, one that does not exist (or is private), a
    revision it does not have, and files that are not in the cache while offline mode forbids downloading them or
    the hub cannot be reached. datasets re-raises gated and missing datasets as ``DatasetNotFoundError`` without the
    hub's exception, so for those its own message is kept.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    at = f" at revision {revision!r}" if revision not in (None, "main") else ""
    what = "file or directory" if repo_type == "dataset" else "directory"
    if repo_type == "dataset":
        from datasets.exceptions import DatasetNotFoundError

        if isinstance(error, DatasetNotFoundError):  # raised "from None": the hub's class is gone, its words stay
            return (f"no local {what} has that name, and the hub dataset cannot be had: {cause(error)} (a "
                    f"gated or private one: accept its terms at {page}, then hf auth login or set HF_TOKEN)")
    for e in _chain(error):
        if isinstance(e, GatedRepoError):
            return (f"it is a gated repository on the hub: accept its terms at {page} and log in "
                    "(hf auth login, or set HF_TOKEN)")
        if isinstance(e, RepositoryNotFoundError):
            return (f"no local {what} has that name and the hub has no {repo_type} {repo_id!r} (a private one "
                    "needs hf auth login or HF_TOKEN)")
        if isinstance(e, RevisionNotFoundError):
            return f"the hub {repo_type} {repo_id!r} has no revision {revision!r} (a branch, tag or commit)"
        if isinstance(e, HFValidationError):
            return f"it is not a local {what}, nor a hub id ('NAME' or 'ORG/NAME'): {cause(e)}"
        if isinstance(e, LocalEntryNotFoundError | ConnectionError):  # OfflineModeIsEnabled is a ConnectionError
            where = f"not in the {'datasets' if repo_type == 'dataset' else 'hub'} cache ({_cache_of(repo_type)}){at}"
            offline = constants.HF_HUB_OFFLINE or (repo_type == "dataset" and _datasets_offline()) or any(
                isinstance(c, OfflineModeIsEnabled) for c in _chain(e))
            if not offline:
                return (f"no local {what} has that name, the hub {repo_type} is {where}, and the hub cannot be "
                        f"reached ({cause(e)})")
            fetch = (f"load it once online (datasets.load_dataset('{repo_id}') or this command) or give a local file"
                     if repo_type == "dataset" else f"download it once online (hf download {repo_id}) or give a "
                     "local directory")
            return (f"no local {what} has that name, and the hub {repo_type} is {where} while HF_HUB_OFFLINE forbids "
                    f"downloading it: {fetch}")
    return None


def _datasets_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def _cache_of(repo_type: str) -> str:
    """Where an offline load looks: transformers in the hub cache, datasets in its own cache of prepared datasets
    (a downloaded dataset is converted there; the raw download in the hub cache is not read offline)."""
    from huggingface_hub import constants

    if repo_type == "dataset":
        import datasets.config

        return str(datasets.config.HF_DATASETS_CACHE)
    return constants.HF_HUB_CACHE

