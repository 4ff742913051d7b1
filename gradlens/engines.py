"""Which distributed engine a training run uses, seen from a Trainer's arguments, its accelerator, accelerate's
launcher environment or the parameters themselves; the recorder and sparse-B training refuse the engines whose
per-process gradients they cannot read or mask whole from ``param.grad`` (DeepSpeed ZeRO, FSDP1) in the same words,
unless the caller reads them another way (the recorder reads DeepSpeed through its engine,
:mod:`gradlens.record.zero`)."""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from typing import Any

import torch

from gradlens.errors import GradlensError

SUPPORTED_SETUPS = ("one process (CPU or one GPU), DDP across processes (torchrun, or accelerate launch with a "
                    "multi-GPU config) or FSDP2 (accelerate launch with fsdp_version: 2); the recorder also reads "
                    "DeepSpeed ZeRO-1/2/3 in fp32")


def sharded_training(args: Any, trainer: Any, params: Sequence[torch.nn.Parameter]) -> str | None:
    """The name of a sharding scheme whose ``param.grad`` is not the full gradient (DeepSpeed, FSDP1), or None.

    Under DeepSpeed ZeRO and FSDP1 each process holds a shard (or nothing) in ``param.grad`` behind the engine's own
    flat buffers, not the full averaged gradient the recorder reads. FSDP2 keeps each gradient a ``DTensor`` whose
    blocks the recorder gathers (:mod:`gradlens.record.sharded`), so it is not refused. The run is recognised by any
    of: the Trainer's arguments, the Trainer's accelerator, accelerate's launcher environment, or the parameters
    themselves (ZeRO-3 partitions, FSDP1's flattened parameters).
    """
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None or \
            getattr(trainer, "is_deepspeed_enabled", False) or env_flag("ACCELERATE_USE_DEEPSPEED") or \
            any(hasattr(p, "ds_id") for p in params):
        return "DeepSpeed"
    if fsdp_version(args, trainer) == 1 or any(getattr(p, "_fsdp_flattened", False) for p in params):
        return "FSDP1"
    return None


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (as accelerate's launcher writes them)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_version(args: Any, trainer: Any) -> int | None:
    """The FSDP version this run asks for (1 or 2), or None without FSDP: from the Trainer's accelerator, else its
    arguments, else accelerate's launcher environment (``FSDP_VERSION``; the launcher writes 1 when a config has
    none)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1))
    if getattr(args, "fsdp_plugin_args", None):
        return int(args.fsdp_plugin_args.get("fsdp_version", 1))
    if env_flag("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def refuse_sharded(what: str, args: Any, trainer: Any, params: Sequence[torch.nn.Parameter],
                   supported: Collection[str] = ()) -> str | None:
    """Raise one line (on every process alike: each sees the same setup) when ``what`` cannot run under this run's
    sharding scheme (see :func:`sharded_training`) and the caller does not handle it (``supported``); else return
    the scheme's name (None for none)."""
    sharding = sharded_training(args, trainer, params)
    if sharding is not None and sharding not in supported:
        raise GradlensError(f"{sharding} shards gradients, so param.grad is not the full gradient and {what}; shard "
                            "with FSDP2 instead (fsdp_version: 2 in the accelerate config, see docs/distributed.md): "
                            f"gradlens supports {SUPPORTED_SETUPS}")
    return sharding
