"""Synthetic runs for the store's tests: deterministic gradients, written with ``RunWriter``, and an independent
numpy reference of the accumulators."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np

from gradlens.store import ModuleSpec, RunWriter

NAMES_SHAPES = [("model.layers.0.self_attn.q_proj", (8, 4)), ("model.layers.0.mlp.down_proj", (6, 4)),
                ("model.layers.1.self_attn.v_proj", (5, 2))]
SPECS = [ModuleSpec.from_name(n, s) for n, s in NAMES_SHAPES]


def make_grads(step: int, specs: list[ModuleSpec] = SPECS) -> list[np.ndarray]:
    """Deterministic float32 gradients with some exact zeros, so nonzero counts and signs are exercised."""
    rng = np.random.default_rng(1000 + step)
    grads = []
    for spec in specs:
        g = rng.standard_normal(spec.shape).astype(np.float32)
        g[rng.random(spec.shape) < 0.2] = 0.0
        grads.append(g)
    return grads


def meta(step: int) -> dict:
    return {"loss": 1.0 / (step + 1), "learning_rate": np.float32(1e-4), "grad_norm_preclip": 2.0, "clip_coef": 1.0}


def write_run(path: Path, steps, **kw) -> None:
    with RunWriter(path, SPECS, **kw) as w:
        for s in steps:
            w.add_step(s, make_grads(s), meta(s))


def numpy_accumulators(steps, specs: list[ModuleSpec] = SPECS) -> list[dict[str, np.ndarray]]:
    """Independent reference: the moments computed directly over the stacked float64 gradients."""
    out = []
    for i in range(len(specs)):
        g = np.stack([make_grads(s, specs)[i] for s in steps]).astype(np.float64)
        flat = g.reshape(len(steps), -1)
        dots = np.full(len(steps), np.nan)
        dots[1:] = (flat[1:] * flat[:-1]).sum(axis=1)
        out.append({"count": len(steps), "sum": g.sum(0), "sumsq": (g**2).sum(0), "sumabs": np.abs(g).sum(0),
                    "sumsign": np.sign(g).sum(0), "nonzero": (g != 0).sum(0), "sqnorm": (flat**2).sum(1),
                    "dot_prev": dots})
    return out


def assert_accumulators(run, steps, exact: bool = False) -> None:
    acc = run.accumulators()
    np.testing.assert_array_equal(acc.steps, steps)
    for spec, ref in zip(SPECS, numpy_accumulators(steps), strict=True):
        got = acc[spec.name]
        for key, want in ref.items():
            if exact or key in ("count", "nonzero"):
                np.testing.assert_array_equal(getattr(got, key), want, err_msg=key)
            else:
                np.testing.assert_allclose(getattr(got, key), want, rtol=1e-12, atol=1e-12, err_msg=key)


def assert_same_accumulators(a, b) -> None:
    np.testing.assert_array_equal(a.steps, b.steps)
    for name in a.modules:
        for key in ("count", "sum", "sumsq", "sumabs", "sumsign", "nonzero", "sqnorm", "dot_prev"):
            np.testing.assert_array_equal(getattr(a[name], key), getattr(b[name], key), err_msg=f"{name}.{key}")


class Touch:
    """Unpickling this creates a marker file: proof that a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def committed_steps(out: Path) -> int:
    """Steps the manifest of ``out`` lists right now (0 before the first one; it is replaced atomically)."""
    try:
        return len(json.loads((out / "manifest.json").read_text())["steps"])
    except FileNotFoundError:
        return 0
