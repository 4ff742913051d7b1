"""Base-weight drift guard: did the frozen base weights of the adapted layers change during training?

They should not: LoRA trains only the adapter. But under GRPO with vLLM weight sync, TRL merges the adapter into the
base weights and unmerges it again, in place, at every sync (``merge_adapter`` / ``unmerge_adapter``); in bf16,
``W + BA - BA`` is not ``W``, so the base weights drift a little with every sync (trl issue 6688). A placement
comparison run that way compares placements *and* a drifting base model. :class:`DriftGuard` fingerprints the base
weights at train begin and train end and says so when they moved. Under FSDP2 each process fingerprints the block of
the base weights it holds, and the processes agree whether any block moved.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback

from gradlens.callback_order import add_first
from gradlens.dtensors import is_sharded, local
from gradlens.errors import GradlensError, GradlensWarning
from gradlens.lora import require_lora
from gradlens.models import unwrap

CHECKSUM_CHUNK = 2**22  # entries per float64 piece of a checksum: 32 MiB of transient float64


def base_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module name, base weight)`` of every PEFT LoRA layer (names without PEFT's ``base_model.model.``); under
    FSDP2 this process's block of it."""
    from peft.tuners.lora import LoraLayer

    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            yield name.removeprefix("base_model.model."), local(module.get_base_layer().weight)


def checksum(weights: list[torch.Tensor]) -> dict[str, float]:
    """Float64 sum and sum of squares over all ``weights``: two numbers that move when any weight does (one host
    sync for all layers). Taken over :data:`CHECKSUM_CHUNK`-entry pieces, so the float64 copy is one piece at a time,
    not a whole weight (a 7B MLP weight in float64 is over 1 GB)."""
    with torch.no_grad():
        parts = []
        for w in weights:
            for piece in w.detach().reshape(-1).split(CHECKSUM_CHUNK):
                wide = piece.to(torch.float64)
                parts.append(torch.stack([wide.sum(), wide.square_().sum()]))
        total = torch.stack([p.to(parts[0].device) for p in parts]).sum(0).tolist()
    return {"sum": total[0], "sum_sq": total[1]}


class DriftGuard(TrainerCallback):
    """Fingerprint the base weights of the adapted layers at train begin and train end; warn if they changed.

    ``report`` is filled in place (a dict that a :class:`~gradlens.record.recorder.GradientRecorder` given it in its
    ``config`` writes into the run manifest when it closes: add the guard *before* the recorder, so that the guard's
    ``on_train_end`` runs first). With ``keep_copy`` (default) a host copy of the weights gives the exact number of
    changed layers and the largest absolute change; without it only the checksums are compared. Under DDP only the
    main process keeps a copy (every process holds the same weights; the others compare checksums).
    """

    def __init__(self, keep_copy: bool = True) -> None:
        self.keep_copy = keep_copy
        self.report: dict[str, Any] = {"checked": False}
        self._copies: list[torch.Tensor] = []
        self._kept = False  # whether start() kept a copy
        self._sharded = False  # FSDP2: each process guards its block; the processes agree at finish()

    @classmethod
    def attach(cls, trainer: Any, keep_copy: bool = True) -> DriftGuard:
        """Create the guard and add it *first*, so it sees the weights before and after every other callback."""
        guard = cls(keep_copy)
        add_first(trainer, [guard])
        return guard

    def start(self, model: torch.nn.Module, copy: bool = True) -> None:
        """Fingerprint the base weights now (the reference for :meth:`finish`); ``copy=False``: checksums only, even
        with ``keep_copy``."""
        require_lora(unwrap(model), "drift guard: the model")
        found = list(base_weights(model))
        weights = [w for _, w in found]
        self._sharded = any(is_sharded(p) for p in unwrap(model).parameters())
        self._kept = self.keep_copy and copy
        self._copies = [w.detach().to("cpu", copy=True) for w in weights] if self._kept else []
        self.report.clear()
        self.report.update(checked=False, layers=len(found), entries=sum(w.numel() for w in weights),
                           dtype=str(weights[0].dtype).removeprefix("torch."), checksum_begin=checksum(weights))

    def finish(self, model: torch.nn.Module) -> dict[str, Any]:
        """Compare the base weights with :meth:`start`'s fingerprint; update and return :attr:`report`."""
        if "checksum_begin" not in self.report:
            raise GradlensError("drift guard: finish() before start(): nothing to compare with")
        found = list(base_weights(model))
        end = checksum([w for _, w in found])
        changed, max_change = [], None
        if self._copies:
            max_change = 0.0
            with torch.no_grad():
                for (name, w), copy in zip(found, self._copies, strict=True):
                    before = copy.to(w.device)
                    if not torch.equal(w, before):
                        changed.append(name)
                        max_change = max(max_change, float((w.float() - before.float()).abs().max()))
            self._copies = []
        drifted = bool(changed) if self._kept else end != self.report["checksum_begin"]
        if self._sharded and torch.distributed.is_initialized():  # did any process's block move?
            flag = torch.tensor([float(drifted)], device=found[0][1].device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            drifted = bool(flag.item())
        self.report.update(checked=True, checksum_end=end, max_abs_change=max_change, drifted=drifted,
                           changed_layers=len(changed) if self._kept else None,
                           first_changed=changed[0] if changed else None)
        if drifted:
            warnings.warn(describe(self.report), GradlensWarning, stacklevel=2)
        return self.report

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start(model, copy=state.is_world_process_zero)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.finish(model)


def describe(report: dict[str, Any]) -> str:
    """One line for the console: whether and how far the base weights moved."""
    if not report.get("checked"):
        return "drift guard: not checked"
    if not report["drifted"]:
        return f"drift guard: base weights of the {report['layers']} adapted layers unchanged"
    how = ""
    if report["max_abs_change"] is not None:
        how = (f" ({report['changed_layers']} of {report['layers']} layers, max |change| "
               f"{report['max_abs_change']:.3g}, first {report['first_changed']})")
    return (f"drift guard: the base weights of the adapted layers changed during training{how}; LoRA must leave them "
            f"frozen. Under GRPO with vLLM weight sync TRL merges and unmerges the adapter in place, which in "
            f"{report['dtype']} drifts them (trl issue 6688): this run trained against a moving base model")
