"""The device path of recording: torch statistics against an independent float64 numpy computation (1,000 steps with
all-zero, NaN and infinite steps), and the background writer's ring of reusable buffers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from gradlens.modules import ModuleSpec
from gradlens.stats.device import DeviceStats
from gradlens.stats.streaming import StreamingStats
from gradlens.store import AsyncRunWriter, RunWriter, open_run

SPECS = [ModuleSpec.from_name("model.layers.0.self_attn.v_proj", (12, 4)),
         ModuleSpec.from_name("model.layers.0.mlp.down_proj", (20, 4))]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS64 = np.finfo(np.float64).eps


def known_gradients(n: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``n`` steps of float32 gradients over six decades of scale, with exact zeros, a sign-consistent block, one
    all-zero step, one step with a NaN and one with an infinity."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(n):
        grads = []
        for spec in SPECS:
            g = (rng.standard_normal(spec.shape) * 10.0 ** rng.uniform(-4, 2)).astype(np.float32)
            g[rng.random(spec.shape) < 0.3] = 0
            g[:2] = np.abs(g[:2]) + np.float32(1e-3)  # two rows that keep one sign
            grads.append(g)
        steps.append(grads)
    if n > 400:
        steps[5] = [np.zeros(s.shape, np.float32) for s in SPECS]
        steps[17][1][3, 2] = np.nan
        steps[400][0][0, 0] = np.inf
    return steps


def reference(steps: list[list[np.ndarray]]) -> tuple[list[int], list[dict[str, np.ndarray]]]:
    """The finite steps and each module's moments, computed at once over the stacked float64 gradients."""
    keep = [t for t, grads in enumerate(steps) if all(np.isfinite(g).all() for g in grads)]
    out = []
    for i in range(len(SPECS)):
        g = np.stack([steps[t][i] for t in keep]).astype(np.float64)
        flat = g.reshape(len(keep), -1)
        dots = np.full(len(keep), np.nan)
        dots[1:] = np.einsum("td,td->t", flat[1:], flat[:-1])
        out.append({"sum": g.sum(0), "sumsq": (g * g).sum(0), "sumabs": np.abs(g).sum(0), "sumsign": np.sign(g).sum(0),
                    "nonzero": (g != 0).sum(0), "sqnorm": np.einsum("td,td->t", flat, flat), "dot_prev": dots,
                    "scale": np.abs(g).sum(0), "row_scale": np.abs(flat).sum(1)})
    return keep, out


@pytest.mark.parametrize("device", DEVICES)
def test_device_statistics_equal_float64_numpy_after_1000_steps(device):
    steps = known_gradients(1000)
    total = StreamingStats(SPECS)
    part = DeviceStats(SPECS)
    for t, grads in enumerate(steps):
        part.add(t, [torch.from_numpy(g).to(device) for g in grads])
        if t % 97 == 96:  # commits of 97 steps, each summed from zero and chained onto the last by its prev
            total.merge(part.host())
            part = DeviceStats(SPECS, prev=total.prev)
    total.merge(part.host())
    keep, ref = reference(steps)
    assert total.steps == keep and len(keep) == 998  # the NaN and the infinite step are left out, the zero step kept
    n = len(keep)
    for i, want in enumerate(ref):
        # n float64 roundings of partial sums bounded by the sum of |terms|: at most n * eps64 * sum|g| (sum|g|^2)
        for key, bound in (("sum", want["scale"]), ("sumabs", want["scale"]), ("sumsq", want["sumsq"])):
            err = np.abs(total.sums[i][key] - want[key])
            assert (err <= n * EPS64 * bound).all(), key
            assert (err <= 1e-6 * np.maximum(np.abs(want[key]), 1e-300) + n * EPS64 * bound).all(), key
        np.testing.assert_array_equal(total.sums[i]["sumsign"], want["sumsign"])
        np.testing.assert_array_equal(total.nonzero[i], want["nonzero"])
        d = SPECS[i].size
        np.testing.assert_allclose(total.sqnorm[i], want["sqnorm"], rtol=d * EPS64)
        got_dots = np.asarray(total.dot_prev[i])
        assert np.isnan(got_dots[0]) and not np.isnan(got_dots[1:]).any()
        # |<g_t, g_{t-1}>| rounding: d * eps64 * sum_j |g_t,j g_{t-1},j| <= d * eps64 * ||g_t|| ||g_{t-1}||
        norms = np.sqrt(want["sqnorm"])
        assert (np.abs(got_dots[1:] - want["dot_prev"][1:]) <= d * EPS64 * norms[1:] * norms[:-1]).all()
        assert (total.sums[i]["sumsign"][:2] == n - 1).all()  # the sign-consistent rows, zero only in the zero step


def test_a_nonfinite_step_changes_nothing():
    stats = DeviceStats(SPECS)
    good = [torch.ones(s.shape) for s in SPECS]
    assert stats.add(0, good)
    bad = [torch.ones(s.shape) for s in SPECS]
    bad[1][0, 0] = float("nan")
    assert not stats.add(1, bad)
    assert stats.add(2, good)
    host = stats.host()
    assert host.steps == [0, 2]
    np.testing.assert_array_equal(host.sums[1]["sum"], np.full(SPECS[1].shape, 2.0))
    assert host.dot_prev[1][1] == SPECS[1].size  # chained onto step 0, not onto the NaN step


class GatedWriter(RunWriter):
    """A RunWriter whose steps wait for a gate: stands for a disk slower than training."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def add_step(self, step, grads, meta):
        self.gate.wait(timeout=30)
        super().add_step(step, grads, meta)


def test_ring_blocks_only_when_every_buffer_is_in_flight(tmp_path):
    steps = known_gradients(6, seed=1)
    writer = GatedWriter(tmp_path / "run", SPECS, steps_per_shard=2)
    aw = AsyncRunWriter(writer, max_queue=2)
    mine = [[torch.from_numpy(g.copy()) for g in grads] for grads in steps]
    t0 = time.perf_counter()
    aw.submit(0, mine[0], {})  # the thread takes it and waits at the gate: one buffer in flight
    aw.submit(1, mine[1], {})  # the second buffer: still no wait
    assert time.perf_counter() - t0 < 5
    for tensors in mine[:2]:  # submit copied them: the caller may reuse its tensors at once
        for t in tensors:
            t.zero_()
    third = threading.Thread(target=aw.submit, args=(2, mine[2], {}))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # every buffer in flight: the training step waits
    writer.gate.set()
    third.join(timeout=30)
    assert not third.is_alive()
    for t in range(3, 6):
        aw.submit(t, mine[t], {})
    aw.close()
    run = open_run(tmp_path / "run")
    assert run.steps == list(range(6))
    for i, spec in enumerate(SPECS):
        want = np.stack([steps[t][i] for t in range(6)])
        np.testing.assert_array_equal(run.gradients(spec.name), want)  # buffers reused, every step intact


def test_one_buffer_ring_keeps_every_step(tmp_path):
    steps = known_gradients(9, seed=2)
    with AsyncRunWriter(RunWriter(tmp_path / "run", SPECS, dtype="bfloat16", steps_per_shard=4), max_queue=1) as aw:
        buf = [torch.empty(s.shape) for s in SPECS]
        for t, grads in enumerate(steps):
            for b, g in zip(buf, grads, strict=True):  # the same tensors every step, as a trainer's .grad
                b.copy_(torch.from_numpy(g))
            aw.submit(t, buf, {})
    run = open_run(tmp_path / "run")
    for i, spec in enumerate(SPECS):
        want = torch.from_numpy(np.stack([s[i] for s in steps])).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(run.gradients(spec.name), want)
    _, ref = reference(steps)
    np.testing.assert_allclose(run.accumulators()[SPECS[1].name].sumabs, ref[1]["sumabs"], rtol=1e-12)


class ThreadCountWriter(RunWriter):
    """Notes the torch intra-op thread count its steps run with (on the background thread)."""

    seen: list[int]

    def add_step(self, step, grads, meta):
        self.seen.append(torch.get_num_threads())
        super().add_step(step, grads, meta)


def test_writer_thread_runs_single_threaded_and_leaves_the_process_default(tmp_path):
    before = torch.get_num_threads()
    writer = ThreadCountWriter(tmp_path / "run", SPECS)
    writer.seen = []
    with AsyncRunWriter(writer) as aw:
        assert torch.get_num_threads() == before
        for t, grads in enumerate(known_gradients(3)):
            aw.submit(t, grads, {})
    assert writer.seen == [1, 1, 1]
    assert torch.get_num_threads() == before
    seen_elsewhere = []
    other = threading.Thread(target=lambda: seen_elsewhere.append(torch.get_num_threads()))
    other.start()
    other.join()
    assert seen_elsewhere == [before]  # threads started later get the process default, not the writer's 1
