"""Hugging Face hub ids: what a failed ``from_pretrained``/``load_dataset`` of one means, in one line.

transformers and datasets wrap the hub's errors in ``OSError``/``ConnectionError`` with messages written for their
own users ("We couldn't connect to 'https://huggingface.co'..." even when offline mode forbade connecting). The
original ``huggingface_hub`` exception stays in the chain (``__cause__``/``__context__``), so the cause is read
from its class, not from the wording.
"""

from __future__ import annotations

from collections.abc import Iterator


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
    revision it does not have, and files that are not in the hub cache while offline mode forbids downloading them
    or the hub cannot be reached.
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

    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    at = f" at revision {revision!r}" if revision not in (None, "main") else ""
    for e in _chain(error):
        if isinstance(e, GatedRepoError):
            return (f"it is a gated repository on the hub: accept its terms at {page} and log in "
                    "(hf auth login, or set HF_TOKEN)")
        if isinstance(e, RepositoryNotFoundError):
            return (f"no local directory has that name and the hub has no {repo_type} {repo_id!r} (a private one "
                    "needs hf auth login or HF_TOKEN)")
        if isinstance(e, RevisionNotFoundError):
            return f"the hub {repo_type} {repo_id!r} has no revision {revision!r} (a branch, tag or commit)"
        if isinstance(e, HFValidationError):
            return f"it is not a local directory, nor a hub id ('NAME' or 'ORG/NAME'): {first_line(e)}"
        if isinstance(e, LocalEntryNotFoundError | OfflineModeIsEnabled):
            where = f"not in the hub cache ({constants.HF_HUB_CACHE}){at}"
            if constants.HF_HUB_OFFLINE or any(isinstance(c, OfflineModeIsEnabled) for c in _chain(e)):
                return (f"no local directory has that name, and the hub {repo_type} is {where} while HF_HUB_OFFLINE "
                        f"forbids downloading it: download it once online (hf download {repo_id}"
                        f"{' --repo-type dataset' if repo_type == 'dataset' else ''}) or give a local directory")
            return (f"no local directory has that name, the hub {repo_type} is {where}, and the hub cannot be "
                    f"reached ({first_line(e)})")
    return None


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
