"""``GradientRecorder``: a ``TrainerCallback`` that records every LoRA-B gradient of a (TRL) Trainer run.

It reads the ``lora_B`` gradients in ``on_pre_optimizer_step``: once per optimizer step, after gradient accumulation,
after the all-reduce, and *after* the Trainer clipped them. The Trainer does not hand the pre-clip norm to callbacks,
so the recorder reads it from the Trainer's own clipping (:class:`~gradlens.record.clip.ClipWatch` wraps
``accelerator.clip_grad_norm_`` for the run): the clip coefficient ``c`` is the factor that clipping applied, and the
pre-clip B norm is ``||g_post|| / c``. The stored gradient is ``g_post`` (what the optimizer used); the raw gradient
is ``g_post / c``.

Only the main process writes, through a background writer: a training step pays for one copy of the gradients into a
reusable flat buffer on their own device, its norm, and one host sync (the norm, the clipping's norm and the loss),
with no per-module Python beyond listing the gradients; the statistics (on that device), the cast to the storage
dtype, the copy to the host and the disk I/O run on the writer's thread. Under DDP the processes agree at each
recorded step and at train end whether the main process failed, so a failure stops every process together
(:mod:`gradlens.record.collective`).
A run that learns nothing is said: steps whose recorded gradients are all zero (``zero_gradient``) or, under GRPO,
whose every group has equal rewards (``zero_reward_std``) are flagged in their step records and warned about.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gradlens.callback_order import add_first
from gradlens.dtensors import is_sharded
from gradlens.engines import refuse_sharded
from gradlens.errors import GradlensError
from gradlens.models import unwrap
from gradlens.modules import ModuleFilter, ModuleSpec, match_modules
from gradlens.record.adapter import describe_adapter, describe_dataset
from gradlens.record.checks import (
    SignalCounter,
    epoch_length,
    generation_batch,
    generation_reuse,
    missing_reward_metrics,
    missing_state_note,
    missing_trainer_state,
    warn,
)
from gradlens.record.clip import ClipWatch, clip_statistics
from gradlens.record.collective import agree, distributed
from gradlens.record.sharded import ShardedGather, squares_held_here
from gradlens.record.zero import ZeroRead, full_shape, zero_read
from gradlens.sparse.space import LORA_B, WHAT, space_parameters
from gradlens.store import DTYPES, AsyncRunWriter, RunWriter
from gradlens.store.background import NORM_CHUNK
from gradlens.store.runstate import adapter_line, adapter_note, resume_hint, stop_reason

LOG_PREFIX = "gradlens/"


class GradientRecorder(TrainerCallback):
    """Record LoRA-B gradients, per-step metadata and streaming statistics of a Trainer run into ``output_dir``.

    Args:
        output_dir: the run directory (see :mod:`gradlens.store`).
        modules: which LoRA modules to record: ``None`` for all, module names or projection types
            (``["v_proj", "down_proj"]``), or a callable ``name -> bool``.
        every_n_steps: record optimizer steps ``n, 2n, ...`` only.
        dtype: storage dtype of the raw shards: ``float32``, ``bfloat16`` or ``float16`` (statistics stay float64).
        save_raw: write raw gradient shards; ``False`` keeps only the streaming accumulators.
        resume: continue an existing run in ``output_dir`` (steps it holds are skipped); otherwise it must be new.
        steps_per_shard: steps per raw shard (default: up to 64 steps or 256 MiB); a kill loses at most one shard.
        max_queue: flat gradient buffers in the ring the training step copies into before the writer thread catches
            up (the step waits only when all are in flight).
        config: provenance stored in the manifest (the Trainer's arguments are added automatically).
        seed: the run's seed, stored in the manifest.
        trainer: the Trainer, optional; with it each step also records the loss and, for GRPO, reward statistics.
            Use :meth:`attach` to add the recorder and bind the trainer in one call.
        announce: print one line at train begin (where, what, dtype, regime, adapter); a trained A is warned about
            either way.
        space: ``"lora_b"`` (LoRA's B, the default) or ``"weight"`` (the trainable base weights of a model without an
            adapter, :mod:`gradlens.sparse.space`); recorded alike, and the manifest says which.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, modules: ModuleFilter = None, every_n_steps: int = 1,
                 dtype: str = "float32", save_raw: bool = True, resume: bool = False,
                 steps_per_shard: int | None = None, max_queue: int = 4, config: dict[str, Any] | None = None,
                 seed: int | None = None, trainer: Any = None, announce: bool = True, space: str = LORA_B) -> None:
        if every_n_steps < 1:
            raise GradlensError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if dtype not in DTYPES:
            raise GradlensError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if steps_per_shard is not None and steps_per_shard < 1:
            raise GradlensError(f"steps_per_shard must be >= 1, got {steps_per_shard}")
        self.output_dir = Path(output_dir)
        self.module_filter = modules
        self.every_n_steps = every_n_steps
        self.dtype = dtype
        self.save_raw = save_raw
        self.resume = resume
        self.steps_per_shard = steps_per_shard
        self.max_queue = max_queue
        self.config = dict(config or {})
        self.seed = seed
        self.trainer = trainer
        self.announce = announce
        self.space = space
        self.writer: AsyncRunWriter | None = None
        self.specs: list[ModuleSpec] = []
        self.steps_recorded = 0
        # recorded steps of this session without a learning signal
        self.signal = SignalCounter(self._warn, what=WHAT[space])
        self._params: list[torch.nn.Parameter] = []
        self._gather: ShardedGather | None = None  # FSDP2: the recorded gradients are DTensors, gathered each step
        self._zero: ZeroRead | None = None  # DeepSpeed ZeRO: read whole inside the engine's step, before it
        self._clip = ClipWatch()
        self._clip_unseen_said = False
        self._failure: BaseException | None = None  # under DDP: raised on every process at the next agreement
        self._exit_hook: Callable[[], None] | None = None
        self._loss_seen = (0.0, None)  # (trainer._tr_loss at the last read, trainer._globalstep_last_logged then)
        self._reward: tuple[float | None, ...] = (None, None, None)  # reward mean, std, share of zero-std groups
        self._last_b_norm = math.nan
        self._main = True
        self._per_epoch: int | None = None  # micro-batches per epoch, None without a dataloader length
        self._read = {"loss": False, "rewards": False, "check_rewards": False}
        self._planned: int | None = None  # the Trainer's max_steps at train begin
        self._ended: tuple[int, int] | None = None  # (global_step, max_steps) at train end; None: it never came
        self.adapter: dict[str, Any] = {}
        self._source: dict[str, Any] = {}  # the model's name or path and the training data, as the Trainer holds them

    @classmethod
    def attach(cls, trainer: Any, output_dir: str | os.PathLike[str], **kwargs: Any) -> GradientRecorder:
        """Create a recorder bound to ``trainer`` and add it *first* among its callbacks.

        First, so that the scalars it adds in ``on_log`` reach the console, TensorBoard and W&B callbacks.
        """
        recorder = cls(output_dir, trainer=trainer, **kwargs)
        add_first(trainer, [recorder])
        return recorder

    # ---------------------------------------------------------------------------------------------------------------
    # Trainer events

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        model = unwrap(model)
        found = space_parameters(model, self.space, "GradientRecorder: the model")
        kept = set(match_modules([n for n, _ in found], self.module_filter))
        if not kept:
            raise GradlensError(f"module filter {self.module_filter!r} matches none of the {len(found)} "
                                f"{WHAT[self.space]} modules (e.g. {found[0][0]})")
        chosen = [(n, p) for n, p in found if n in kept]
        sharding = refuse_sharded("cannot be recorded", args, self.trainer, [p for _, p in found], ("DeepSpeed",))
        if sharding == "DeepSpeed" and self.space != LORA_B:
            raise GradlensError("space 'weight' is not supported under DeepSpeed (only LoRA-B is read through ZeRO); "
                                "use space lora_b, or DDP for space weight")
        # DeepSpeed: refused here unless ZeRO-1/2/3 as tested; then every process reads in the engine's step
        self._zero = zero_read(self.trainer, [p for _, p in chosen], self._next_step_recorded,
                               state.is_world_process_zero) if sharding == "DeepSpeed" else None
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise GradlensError(f"the {WHAT[self.space]} weight of {frozen[0]} does not require grad; only trainable "
                                "modules can be recorded")
        self.specs = [ModuleSpec.from_name(n, full_shape(p)) for n, p in chosen]
        self._params = [p for _, p in chosen]
        if self._zero is not None:
            self._zero.install()
        ours = {id(p) for p in self._params}
        # Every other trainable parameter counts in the global norm the Trainer clipped (unrecorded LoRA modules too).
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in ours]
        # FSDP2: every process learns every process's blocks now (a collective), then one gather a recorded step.
        self._gather = ShardedGather(self._params, extra=1) if any(is_sharded(p) for p in self._params) else None
        self._clip.install(self.trainer)
        self._main = state.is_world_process_zero
        self._planned = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self.adapter = describe_adapter(model) if self.space == LORA_B else {
            "space": self.space, "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in found})}
        self._source = {"model": getattr(getattr(model, "config", None), "name_or_path", None),
                        "dataset": describe_dataset(getattr(self.trainer, "train_dataset", None))}
        notes = self._check_setup(args, train_dataloader)
        error = None
        if self._main:
            for note in notes:
                self._warn(note)
            try:
                self._open_writer(args, notes)
            except Exception as e:  # an OSError too: every process must stop, not only this one
                error = e
        agree(error)
        if self._main and self.announce:
            self._announce()
        if (note := adapter_note(self.adapter)) is not None:
            self._warn(f"{note}; the analysis assumes a frozen A (LoRA-FA), so read its results with that in mind")

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        recorded = step % self.every_n_steps == 0
        # Read loss and rewards at every step: the Trainer keeps summing the loss and empties its reward metrics at
        # each log, so a skipped step must not leak into the next recorded one.
        loss = self._step_loss(recorded)
        grpo_meta = self._grpo_meta(args, step)
        clipped = self._clip.take()  # at every step: a skipped step's clipping must not count for the next one
        read = self._zero.take() if self._zero is not None else None
        if not recorded:
            return
        if distributed():  # the mean loss over processes, and whether the main process failed (then all raise)
            failure = self._failure or (self.writer.failure() if self.writer is not None else None)
            loss = agree(failure, loss)
            loss = None if loss is None else loss / torch.distributed.get_world_size()
        gathered = None
        if self._gather is not None:  # on every process: the blocks of every recorded gradient to the main process
            others = squares_held_here([p.grad for p in self._others]) if clipped is None else 0.0
            gathered = self._gather.gather([p.grad for p in self._params], [others])
        if not state.is_world_process_zero:
            return
        try:
            if self._zero is not None:  # read whole and clipped inside DeepSpeed's step, with its norm and factor
                if read is None:
                    raise GradlensError(f"{self._zero.name}: the engine's step did not run before step {step}'s "
                                        "on_pre_optimizer_step, so its gradients were not read")
                # The other gradients' squares (the second part) are unused where the clipping is known.
                gathered, clipped = (read[0], torch.zeros(1, dtype=torch.float64)), read[1]
            self._record(step, args, loss, clipped, grpo_meta, optimizer, state, gathered)
        except Exception as e:
            if not distributed():
                raise
            self._failure = e
            self._warn(f"recording failed at step {step}: {e}; every process stops at the next recorded step or at "
                       "train end")

    def _record(self, step: int, args, loss: torch.Tensor | None, clipped: tuple[torch.Tensor, torch.Tensor] | None,
                grpo_meta: dict[str, Any], optimizer, state,
                gathered: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Copy this step's gradients into the writer's ring, take its statistics (one host sync), queue it.

        ``gathered``: under FSDP2, the full gradients and the other gradients' summed squares (:class:`ShardedGather`).
        """
        grads = gathered[0] if gathered is not None else [p.grad for p in self._params]
        if any(g is None for g in grads):
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self._params, strict=True)]
        slot = self.writer.stage(grads)  # one fused copy into a flat buffer on their device
        with torch.no_grad():
            device = slot.flat.device
            if clipped is not None:
                extra = list(clipped)
            elif gathered is not None:  # no clipping seen, FSDP2: the other gradients' squares, summed over processes
                extra = [gathered[1][0]]
            else:  # no clipping seen: the global norm from the gradients themselves
                extra = [sums_of_squares([[p.grad for p in self._others if p.grad is not None]], device)]
            if loss is not None:
                extra.append(loss)
            parts = [slot.squared_norm(), *(t.to(device, torch.float64).reshape(()) for t in extra)]
            values = torch.stack(parts).tolist()  # the step's one host sync
        b_sq, rest = values[0], values[1:]
        seen = (rest.pop(0), rest.pop(0)) if clipped is not None else None
        others_sq = rest.pop(0) if clipped is None else 0.0
        coef, pre_norm, post_norm, b_norm = clip_statistics(args.max_grad_norm, seen, b_sq, others_sq)
        if coef is None and not self._clip_unseen_said:
            self._clip_unseen_said = True
            self._warn(f"step {step}: the Trainer's gradient clipping (accelerator.clip_grad_norm_) was not seen, so "
                       "clip_coef, grad_norm and b_grad_norm are not recorded (None) for such steps")
        meta: dict[str, Any] = {
            "loss": rest[0] if loss is not None else None,
            "learning_rate": float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
            "grad_norm": pre_norm,
            "grad_norm_clipped": post_norm,
            "clip_coef": coef,
            "b_grad_norm": b_norm,
            "zero_gradient": b_sq == 0.0,  # exactly: nothing in the recorded modules moves (e.g. constant reward)
            "epoch": state.epoch,
        }
        self._last_b_norm = b_norm if b_norm is not None else math.nan
        meta.update(grpo_meta)
        self.signal.note(step, meta)
        self.writer.queue(step, slot, meta)  # the rest is the writer's thread
        self.steps_recorded += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.writer is None or logs is None or "loss" not in logs:  # add to training logs only
            return
        latest = {"cos_prev": self.writer.latest.get("cos_prev", math.nan),
                  "sign_stability": self.writer.latest.get("sign_stability", math.nan),
                  "b_grad_norm": self._last_b_norm}  # pre-clip, unlike the stored (clipped) gradients
        live = {f"{LOG_PREFIX}{k}": v for k, v in latest.items() if math.isfinite(v)}
        logs.update(live)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(live)

    def on_train_end(self, args, state, control, **kwargs):
        self._ended = (state.global_step, state.max_steps)
        if (summary := self.signal.summary()) is not None:
            self._warn(summary)
        error = self._failure
        try:
            self.close()
        except Exception as e:
            error = error or e
        agree(error)  # under DDP every process stops together if the main process failed

    def close(self) -> None:
        """Flush and close the run (also done at train end and at interpreter exit); unwrap the Trainer's clipping
        (and DeepSpeed's step).

        The run is complete if training ended at its planned last step; else stopped, with the reason: the exception
        being raised as this runs (an interrupt, an error), or training that ended early.
        """
        self._clip.remove()
        if self._zero is not None:
            self._zero.remove()
        hook, self._exit_hook = self._exit_hook, None
        if hook is not None:
            atexit.unregister(hook)
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close(stopped=self._stop_reason())

    def _stop_reason(self) -> str | None:
        """None if training ended at its last planned step; else why the run stopped (see :func:`stop_reason`)."""
        if self._ended is not None:
            step, planned = self._ended
            return None if not planned or step >= planned else f"training ended early, at step {step}"
        # close() runs in the `finally` of a failed train() (exc_info), or at exit after an uncaught one (last_value)
        return stop_reason(sys.exc_info()[1] or getattr(sys, "last_value", None))

    def _announce(self) -> None:
        """One line at train begin: where the run goes, what is recorded, in which dtype, under which regime."""
        entries = sum(s.size for s in self.specs)
        regime = "GRPO" if self.signal.grpo else type(self.trainer).__name__ if self.trainer is not None else "Trainer"
        planned = f", {self._planned} steps planned" if self._planned else ""
        storage = f"{self.dtype} shards" if self.save_raw else "statistics only, no shards"
        letter = "B" if self.space == LORA_B else "W"
        print(f"gradlens: recording {len(self.specs)} {WHAT[self.space]} modules ({entries:,} {letter} entries) every "
              f"{self.every_n_steps} step(s) into {self.output_dir} ({storage}, {regime}{planned}); adapter: "
              f"{adapter_line(self.adapter)}", flush=True)

    # ---------------------------------------------------------------------------------------------------------------
    # Helpers

    def _warn(self, message: str) -> None:
        if self._main:  # under DDP every process sees the same: say it once
            warn(message)

    def _check_setup(self, args, train_dataloader) -> list[str]:
        """Warnings about this run's setup (said on the console and stored in the manifest); sets what to read."""
        self.signal.grpo = hasattr(args, "num_generations")
        self._per_epoch = epoch_length(train_dataloader)
        notes = []
        if self.trainer is not None:
            missing = missing_trainer_state(self.trainer, self.signal.grpo)
            if missing:
                notes.append(missing_state_note(self.trainer, missing))
            rewards = self.signal.grpo and "_metrics" not in missing
            self._read = {"loss": "loss" not in missing.values(), "rewards": rewards, "check_rewards": rewards}
        if self.signal.grpo and (reuse := generation_reuse(args)):
            notes.append(reuse)
        return notes

    def _open_writer(self, args, notes: list[str]) -> None:
        if self.writer is not None:
            return
        config = {"recorder": {"modules": repr(self.module_filter), "every_n_steps": self.every_n_steps,
                               "dtype": self.dtype, "save_raw": self.save_raw, "warnings": notes,
                               "processes": torch.distributed.get_world_size() if distributed() else 1,
                               "sharding": "FSDP2" if self._gather is not None else
                               self._zero.name if self._zero is not None else None, "space": self.space},
                  "adapter": self.adapter, **self._source,
                  "trainer_class": type(self.trainer).__name__ if self.trainer is not None else None,
                  "training_args": json.loads(args.to_json_string()), **self.config}
        run = RunWriter(self.output_dir, self.specs, dtype=self.dtype, save_raw=self.save_raw,
                        steps_per_shard=self.steps_per_shard, config=config,
                        seed=self.seed if self.seed is not None else args.seed, resume=self.resume,
                        planned_steps=self._planned, resume_hint=resume_hint(self.config))
        self.writer = AsyncRunWriter(run, max_queue=self.max_queue)
        self._exit_hook = _close_at_exit(self)

    def _next_step_recorded(self) -> bool:
        """Whether the optimizer step about to run is recorded (read inside DeepSpeed's step, before the Trainer
        counts it)."""
        return (self.trainer.state.global_step + 1) % self.every_n_steps == 0

    def _step_loss(self, recorded: bool = True) -> torch.Tensor | None:
        """This step's training loss (a float64 tensor), from the Trainer's running sum (which it resets at each log).

        Must be called at every optimizer step; the local loss (the caller averages it over processes).
        """
        if not self._read["loss"]:
            return None
        t = self.trainer
        total = t._tr_loss.detach().to(torch.float64, copy=True)  # this process's running sum
        last_logged = t._globalstep_last_logged
        seen, seen_logged = self._loss_seen
        self._loss_seen = (total, last_logged)
        if not recorded:
            return None
        return total - (seen if seen_logged == last_logged else 0.0)  # a new tensor: total stays local

    def _grpo_meta(self, args, step: int) -> dict[str, Any]:
        """GRPO only: reward statistics of the generation batch this step trained on last, and that batch's index.

        The index follows from public state alone (see :func:`generation_batch`).
        """
        if not self.signal.grpo:
            return {}
        if self._read["rewards"]:
            rewards = self.trainer._metrics.get("train", {})
            # The first step has always generated, so its metrics must be there.
            if self._read.pop("check_rewards", False) and (note := missing_reward_metrics(self.trainer, rewards)):
                self._read["rewards"] = False
                self._warn(note)
            if self._read["rewards"] and rewards.get("reward"):  # emptied at each log; a reused batch keeps them
                self._reward = (float(rewards["reward"][-1]), float(rewards["reward_std"][-1]),
                                float(rewards["frac_reward_zero_std"][-1]))
        frac_zero = self._reward[2]
        return {"reward_mean": self._reward[0], "reward_std": self._reward[1], "frac_reward_zero_std": frac_zero,
                "zero_reward_std": None if frac_zero is None else frac_zero == 1.0,
                "generation_batch": generation_batch(args, step, self._per_epoch)}


def sums_of_squares(groups: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The float64 sum of squares of each group of tensors, as one tensor on ``device``, without a host sync.

    Fused float32 norms (float64 for float64 tensors; one ``_foreach_norm`` per device and dtype, as
    ``clip_grad_norm_`` computes them) of every tensor, or of its :data:`NORM_CHUNK`-entry chunks if larger, squared
    and summed in float64: the float32 error stays that of one chunk's reduction, whatever the size (a CPU norm of a
    whole 10M-entry tensor is off by ~6000 eps). Used for the gradients outside the recorded modules when the
    Trainer's clipping was not seen.
    """
    kinds: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
    for g, tensors in enumerate(groups):
        for t in tensors:
            chunks, owners = kinds.setdefault((t.device, t.dtype), ([], []))
            parts = (t.detach(),) if t.numel() <= NORM_CHUNK else t.detach().reshape(-1).split(NORM_CHUNK)
            chunks.extend(parts)
            owners.extend([g] * len(parts))
    sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in groups]
    for (_, dtype), (chunks, owners) in kinds.items():  # owners ascend: each group's chunks are contiguous
        norms = torch._foreach_norm(chunks, 2, dtype=torch.promote_types(dtype, torch.float32))  # float64 stays
        squares = torch.stack(norms).to(device, torch.float64).square()
        for g, part in enumerate(squares.split([owners.count(g) for g in range(len(groups))])):
            sums[g] += part.sum()
    return torch.stack(sums)


def _close_at_exit(recorder: GradientRecorder) -> Callable[[], None]:
    """Flush a recorder at interpreter exit (e.g. after an exception in ``train``), without keeping it alive; returns
    the hook, which :meth:`GradientRecorder.close` unregisters."""
    ref = weakref.ref(recorder)

    def close() -> None:
        r = ref()
        if r is not None:
            r._exit_hook = None  # running now: nothing left to unregister
            r.close()

    atexit.register(close)
    return close
