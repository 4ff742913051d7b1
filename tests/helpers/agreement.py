"""The same ``gradlens record`` under two distributed engines (DDP against FSDP2 or DeepSpeed ZeRO): the run they share
and what "records the same" means, within float32 rounding measured in ulps of a module's largest entry; and a killed
and resumed run against the uninterrupted one under the same engine, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

EPS32 = float(np.finfo(np.float32).eps)


def clipped_record(steps: int) -> list[str]:
    """``gradlens record`` of ``steps`` steps with small batches, a high rate and max_grad_norm 1: every step clips,
    and the weights move enough that a wrong gather or read would show. Shards of one step each, so that a kill
    leaves committed steps behind."""
    return ["record", "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--max_grad_norm", "1.0",
            "--learning_rate", "0.01", "--logging_steps", "1", "--disable_tqdm", "true", "--n_train", "64", "--seed",
            "0", "--steps_per_shard", "1"]


def assert_gradients_agree(a, b, first_ulps: int, ulps: int, label: str) -> None:
    """Every recorded gradient of run ``b`` within ``ulps`` float32 ulps of a module's largest entry of run ``a``'s
    (``first_ulps`` at the first step; 0: bit for bit), and none of ``a``'s zero."""
    for step in a.steps:
        for name in a.modules:
            ga, gb = a.gradients(name, [step])[0], b.gradients(name, [step])[0]
            assert np.abs(ga).max() > 0, f"step {step} {name}: zero gradient"
            tol = (first_ulps if step == a.steps[0] else ulps) * EPS32 * float(np.abs(ga).max())
            worst = float(np.abs(gb.astype(np.float64) - ga).max())
            assert worst <= tol, f"step {step} {name}: {label} - DDP = {worst:.3g} > {tol:.3g}"


def assert_step_records_agree(a, b, ulps: int, keys: tuple[str, ...]) -> None:
    """The step records' ``keys`` within ``ulps`` float32 ulps, relative."""
    for ra, rb in zip(a.step_records, b.step_records, strict=True):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=ulps * EPS32, abs=0), f"step {ra['step']} {key}"


def assert_accumulators_agree(a, b, ulps: int) -> None:
    """The streaming statistics: counts exact, sign counts exact where no entry came within the tolerance of 0, the
    float sums within ``ulps`` float32 ulps of each field's largest entry."""
    acc_a, acc_b = a.accumulators(), b.accumulators()
    for name in a.modules:
        for field in ("count", "nonzero"):
            np.testing.assert_array_equal(getattr(acc_b[name], field), getattr(acc_a[name], field))
        # A sign count is exact but jumps by 2 where an entry within the tolerance of 0 flips sign: compare the
        # entries that never come that close.
        grads = a.gradients(name).astype(np.float64)
        near_zero = (np.abs(grads) <= ulps * EPS32 * np.abs(grads).max(axis=(1, 2), keepdims=True)).any(axis=0)
        assert near_zero.mean() < 0.5, name  # most entries are compared
        np.testing.assert_array_equal(acc_b[name].sumsign[~near_zero], acc_a[name].sumsign[~near_zero], name)
        for field in ("sum", "sumsq", "sumabs", "sqnorm", "dot_prev"):
            x, y = np.asarray(getattr(acc_a[name], field)), np.asarray(getattr(acc_b[name], field))
            scale = float(np.nanmax(np.abs(x))) if np.isfinite(x).any() else 0.0
            np.testing.assert_allclose(y, x, rtol=0, atol=ulps * EPS32 * max(scale, 1e-30), err_msg=f"{name} {field}")


def assert_resumed_equals(run, reference) -> None:
    """A killed and resumed run equals the uninterrupted one bit for bit: every step, gradient, running sum and
    step record's loss, norms and clip coefficient."""
    assert run.steps == reference.steps and run.meta["status"] == "complete"
    assert run.modules == reference.modules
    acc, acc_ref = run.accumulators(), reference.accumulators()
    for name in run.modules:
        np.testing.assert_array_equal(run.gradients(name), reference.gradients(name), err_msg=name)
        np.testing.assert_array_equal(acc[name].sum, acc_ref[name].sum, err_msg=name)
    keys = ("loss", "grad_norm", "clip_coef", "b_grad_norm")
    assert [[r[k] for k in keys] for r in run.step_records] == [[r[k] for k in keys] for r in reference.step_records]
