"""The LoRA adapter as it was trained, read from the PEFT layers (their settings and ``requires_grad``): what the
recorder stores in the manifest (``config["adapter"]``); :func:`gradlens.store.runstate.adapter_line` and
:func:`~gradlens.store.runstate.adapter_note` say it where the run is read."""

from __future__ import annotations

from typing import Any

import torch


def _one(values: set[Any]) -> Any:
    """The single value all layers share, else the sorted list of the distinct ones."""
    return next(iter(values)) if len(values) == 1 else sorted(values, key=repr)


def describe_adapter(model: torch.nn.Module) -> dict[str, Any]:
    """The active adapter of every PEFT LoRA layer: rank, alpha, scaling, dropout, DoRA, rsLoRA, targets, and
    whether A (and DoRA's magnitude vector) trained."""
    from peft.tuners.lora import LoraLayer

    settings: dict[str, set[Any]] = {k: set() for k in ("r", "lora_alpha", "scaling", "dropout", "use_dora")}
    targets, a_grad, magnitude_grad = set(), [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        targets.add(name.rsplit(".", 1)[-1])
        for a in module.active_adapters:
            if a not in module.lora_A:
                continue
            settings["r"].add(module.r[a])
            settings["lora_alpha"].add(module.lora_alpha[a])
            settings["scaling"].add(float(module.scaling[a]))
            settings["dropout"].add(float(getattr(module.lora_dropout[a], "p", 0.0)))
            settings["use_dora"].add(bool(module.use_dora.get(a, False)))
            a_grad += [p.requires_grad for p in module.lora_A[a].parameters()]
            if a in module.lora_magnitude_vector:
                magnitude_grad += [p.requires_grad for p in module.lora_magnitude_vector[a].parameters()]
    config = _peft_config(model)
    dora = any(settings["use_dora"])
    return {
        "a_trainable": any(a_grad),
        "lora_fa": bool(a_grad) and not any(a_grad),
        "use_dora": dora,
        "dora_magnitude_trainable": any(magnitude_grad) if dora else None,
        "use_rslora": bool(getattr(config, "use_rslora", False)),
        "r": _one(settings["r"]),
        "lora_alpha": _one(settings["lora_alpha"]),
        "scaling": _one(settings["scaling"]),
        "dropout": _one(settings["dropout"]),
        "target_modules": sorted(targets),
    }


def _peft_config(model: torch.nn.Module) -> Any:
    """The active adapter's PEFT config, or None for a model not wrapped by PEFT."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    return configs.get(active if isinstance(active, str) else next(iter(configs)))


def describe_dataset(dataset: Any) -> str | None:
    """The Trainer's training data in a few words (rows and columns), for a run recorded from a user's own script."""
    if dataset is None:
        return None
    try:
        rows = f"{len(dataset)} rows"
    except TypeError:
        rows = "iterable"
    columns = getattr(dataset, "column_names", None)
    return f"{type(dataset).__name__}, {rows}" + (f", columns {', '.join(map(str, columns))}" if columns else "")
