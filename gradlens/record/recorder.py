"""``GradientRecorder``: a ``TrainerCallback`` that records every LoRA-B gradient of a (TRL) Trainer run.

It reads the ``lora_B`` gradients in ``on_pre_optimizer_step``: once per optimizer step, after gradient accumulation,
after the all-reduce, and *after* the Trainer clipped them. The Trainer does not hand the pre-clip norm to callbacks,
so the recorder takes its own copy of the local accumulated ``lora_B`` gradients in a post-accumulate-grad hook (the
gradients before any all-reduce or clipping), averages it over processes, and compares it with what the optimizer is
about to see: the ratio is the clip coefficient ``c`` and the pre-clip global norm is ``||g_post|| / c``. The stored
gradient is ``g_post`` (what the optimizer used); the raw gradient is ``g_post / c``.

Only the main process writes, through a background writer, so a training step waits only for the device-to-host copy.
"""

from __future__ import annotations

import atexit
import math
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gradlens.errors import GradlensError
from gradlens.models import lora_b_parameters, unwrap
from gradlens.modules import ModuleFilter, ModuleSpec, match_modules
from gradlens.store import DTYPES, AsyncRunWriter, RunWriter

LOG_PREFIX = "gradlens/"
# Entries per float64 block of the clip-coefficient sums (8 MiB: reused by the allocator, no page faults).
BLOCK_ENTRIES = 2**20


def _blocks(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total size stays within ``limit`` (a larger item stands alone)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if groups[-1] and total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


SUPPORTED_SETUPS = ("one process (CPU or one GPU), or DDP across processes (torchrun, or accelerate launch with a "
                    "multi-GPU config)")


def sharded_training(args: Any, trainer: Any, params: Sequence[torch.nn.Parameter]) -> str | None:
    """The name of the sharding scheme this run uses (DeepSpeed or FSDP), or None if gradients are whole.

    Under DeepSpeed ZeRO and FSDP each process holds a shard (or nothing) in ``param.grad``, not the full averaged
    gradient the recorder reads. The run is recognised by any of: the Trainer's arguments, the Trainer's
    accelerator, accelerate's launcher environment, or the parameters themselves (FSDP2 DTensors, ZeRO-3 partitions).
    """
    from torch.distributed.tensor import DTensor

    def env(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None or \
            getattr(trainer, "is_deepspeed_enabled", False) or env("ACCELERATE_USE_DEEPSPEED") or \
            any(hasattr(p, "ds_id") for p in params):
        return "DeepSpeed"
    if getattr(args, "fsdp_plugin_args", None) or getattr(trainer, "is_fsdp_enabled", False) or \
            env("ACCELERATE_USE_FSDP") or any(isinstance(p, DTensor) for p in params):
        return "FSDP"
    return None


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
        config, seed: provenance stored in the manifest (the Trainer's arguments are added automatically).
        trainer: the Trainer, optional; with it each step also records the loss and, for GRPO, reward statistics
            and the generation batch. Use :meth:`attach` to add the recorder and bind the trainer in one call.
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, modules: ModuleFilter = None, every_n_steps: int = 1,
                 dtype: str = "float32", save_raw: bool = True, resume: bool = False,
                 steps_per_shard: int | None = None, max_queue: int = 4, config: dict[str, Any] | None = None,
                 seed: int | None = None, trainer: Any = None) -> None:
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
        self.writer: AsyncRunWriter | None = None
        self.specs: list[ModuleSpec] = []
        self.steps_recorded = 0
        self._params: list[torch.nn.Parameter] = []
        self._local: list[torch.Tensor | None] = []  # local accumulated gradient copies, reused across steps
        self._fresh: list[bool] = []  # whether _local[i] was written since the last optimizer step
        self._hooks: list[Any] = []
        self._loss_seen = (0.0, None)  # (trainer._tr_loss at the last read, trainer._globalstep_last_logged then)
        self._reward = (math.nan, math.nan)
        self._last_b_norm = math.nan

    @classmethod
    def attach(cls, trainer: Any, output_dir: str | os.PathLike[str], **kwargs: Any) -> GradientRecorder:
        """Create a recorder bound to ``trainer`` and add it *first* among its callbacks.

        First, so that the scalars it adds in ``on_log`` reach the console, TensorBoard and W&B callbacks.
        """
        recorder = cls(output_dir, trainer=trainer, **kwargs)
        trainer.callback_handler.callbacks.insert(0, recorder)
        return recorder

    # ---------------------------------------------------------------------------------------------------------------
    # Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = unwrap(model)
        found = list(lora_b_parameters(model))
        if not found:
            raise GradlensError("model has no PEFT LoRA adapter (no LoraLayer found); nothing to record")
        kept = set(match_modules([n for n, _ in found], self.module_filter))
        if not kept:
            raise GradlensError(f"module filter {self.module_filter!r} matches none of the {len(found)} LoRA modules "
                                f"(e.g. {found[0][0]})")
        chosen = [(n, p) for n, p in found if n in kept]
        sharding = sharded_training(args, self.trainer, [p for _, p in found])
        if sharding is not None:  # raised on every process alike: each sees the same setup
            raise GradlensError(f"{sharding} shards gradients, so param.grad is not the full gradient and cannot be "
                                f"recorded; the recorder supports {SUPPORTED_SETUPS}")
        frozen = [n for n, p in chosen if not p.requires_grad]
        if frozen:
            raise GradlensError(f"lora_B of {frozen[0]} does not require grad; only trainable modules can be recorded")
        self.specs = [ModuleSpec.from_name(n, p.shape) for n, p in chosen]
        self._params = [p for _, p in chosen]
        ours = {id(p) for p in self._params}
        # Every other trainable parameter counts in the global norm the Trainer clipped (unrecorded LoRA modules too).
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in ours]
        self._local = [None] * len(self._params)
        self._fresh = [False] * len(self._params)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self._params)]
        error = None
        if state.is_world_process_zero:
            try:
                self._open_writer(args)
            except GradlensError as e:
                error = e
        self._raise_everywhere(error)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        recorded = step % self.every_n_steps == 0
        # Read the running loss and rewards at every step, recorded or not: the Trainer keeps summing the loss and
        # empties its reward metrics at each log, so a skipped step must not leak into the next recorded one.
        loss = self._step_loss(recorded)
        grpo_meta = self._grpo_meta(args)
        if not recorded:
            return
        post = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        pre = [loc if fresh else torch.zeros_like(p)
               for loc, fresh, p in zip(self._local, self._fresh, self._params, strict=True)]
        if _distributed():
            pre = self._all_reduce_mean(pre)
        coef, pre_norm, post_norm, b_norm = self._clip_coefficient(args, post, pre)
        if not state.is_world_process_zero:
            return
        grads = [g.detach().to("cpu", torch.float32, copy=True).numpy() for g in post]
        meta: dict[str, Any] = {
            "loss": loss,
            "learning_rate": float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
            "grad_norm": pre_norm,
            "grad_norm_clipped": post_norm,
            "clip_coef": coef,
            "b_grad_norm": b_norm,
            "epoch": state.epoch,
        }
        self._last_b_norm = meta["b_grad_norm"]
        meta.update(grpo_meta)
        self.writer.submit(step, grads, meta)
        self.steps_recorded += 1

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._fresh = [False] * len(self._params)

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
        self.close()

    def close(self) -> None:
        """Flush and close the run (also done at train end and at interpreter exit); remove the gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    # ---------------------------------------------------------------------------------------------------------------
    # Helpers

    def _open_writer(self, args) -> None:
        if self.writer is not None:
            return
        import json

        config = {"recorder": {"modules": repr(self.module_filter), "every_n_steps": self.every_n_steps,
                               "dtype": self.dtype, "save_raw": self.save_raw},
                  "trainer_class": type(self.trainer).__name__ if self.trainer is not None else None,
                  "training_args": json.loads(args.to_json_string()), **self.config}
        run = RunWriter(self.output_dir, self.specs, dtype=self.dtype, save_raw=self.save_raw,
                        steps_per_shard=self.steps_per_shard, config=config,
                        seed=self.seed if self.seed is not None else args.seed, resume=self.resume)
        self.writer = AsyncRunWriter(run, max_queue=self.max_queue)
        _close_at_exit(self)

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            # Runs after each backward's accumulation, before DDP's all-reduce: keeps the local accumulated gradient.
            if self._local[i] is None:
                self._local[i] = param.grad.detach().clone()
            else:
                self._local[i].copy_(param.grad)
            self._fresh[i] = True

        return hook

    @staticmethod
    def _raise_everywhere(error: GradlensError | None) -> None:
        """Raise ``error`` on every process if any process has one, so none waits forever in a collective."""
        if _distributed():
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_collective_device())
            torch.distributed.all_reduce(flag)
            if error is None and flag.item():
                raise GradlensError("the gradient recorder failed on the main process; see its error")
        if error is not None:
            raise error

    @staticmethod
    def _all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(_collective_device())
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        out, i = [], 0
        for t in tensors:
            out.append(flat[i : i + t.numel()].view_as(t).to(t.device))
            i += t.numel()
        return out

    def _clip_coefficient(self, args, post: list[torch.Tensor], pre: list[torch.Tensor]
                          ) -> tuple[float, float, float, float]:
        """(clip coefficient, pre-clip global norm, post-clip global norm, pre-clip B norm) of this step.

        The recorded modules are flattened into float64 blocks of about 1M entries, so the three sums cost a few dot
        products and one host sync: per-module reductions cost ~1 ms a step on a small model, and one block for a
        1.5B adapter two fresh 80 MB allocations (page faults) every step.
        """
        with torch.no_grad():
            device = post[0].device
            parts = []
            for block in _blocks([g.numel() for g in post], BLOCK_ENTRIES):
                a = torch.cat([post[i].detach().reshape(-1).to(device, torch.float64) for i in block])
                b = torch.cat([pre[i].detach().reshape(-1).to(device, torch.float64) for i in block])
                parts.append(torch.stack([a @ a, a @ b, b @ b]))
            rest = [p.grad.detach().double().pow(2).sum().to(device) for p in self._others if p.grad is not None]
            sums = torch.stack(parts).sum(0)
            if rest:
                sums[0] += torch.stack(rest).sum()
            post_sq, dot, pre_sq = sums.tolist()
        post_norm, b_norm = math.sqrt(post_sq), math.sqrt(pre_sq)
        if args.max_grad_norm is None or args.max_grad_norm <= 0 or pre_sq == 0:
            return 1.0, post_norm, post_norm, b_norm
        coef = dot / pre_sq
        pre_norm = post_norm / coef if coef > 0 else math.nan
        if pre_norm + 1e-6 <= args.max_grad_norm:  # the Trainer did not clip: undo rounding noise of the estimate
            return 1.0, post_norm, post_norm, b_norm
        return coef, pre_norm, post_norm, b_norm

    def _step_loss(self, recorded: bool = True) -> float | None:
        """This step's training loss, from the Trainer's running sum (which it resets at each log).

        Must be called at every optimizer step; only a ``recorded`` step pays for the all-reduce and the host sync.
        """
        t = self.trainer
        if t is None or not isinstance(getattr(t, "_tr_loss", None), torch.Tensor):
            return None
        total = t._tr_loss.detach().to(torch.float64, copy=True)  # this process's running sum
        last_logged = getattr(t, "_globalstep_last_logged", None)
        seen, seen_logged = self._loss_seen
        self._loss_seen = (total, last_logged)
        if not recorded:
            return None
        loss = total - (seen if seen_logged == last_logged else 0.0)  # a new tensor: total stays local
        if _distributed():  # the mean over processes of the local step losses, as the Trainer logs it
            loss = loss.to(_collective_device())
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        return float(loss)

    def _grpo_meta(self, args) -> dict[str, Any]:
        """GRPO only: reward mean/std of the generation batch this step trained on, and that batch's index."""
        t = self.trainer
        if t is None or not hasattr(args, "num_generations") or not hasattr(t, "_metrics"):
            return {}
        rewards = t._metrics.get("train", {})
        if rewards.get("reward"):  # emptied at each log; a reused generation batch keeps the last values
            self._reward = (float(rewards["reward"][-1]), float(rewards["reward_std"][-1]))
        generate_every = args.steps_per_generation * getattr(t, "num_iterations", args.num_iterations)
        return {"reward_mean": self._reward[0], "reward_std": self._reward[1],
                "generation_batch": (int(t._step) - 1) // generate_every}


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _close_at_exit(recorder: GradientRecorder) -> None:
    """Flush a recorder at interpreter exit (e.g. after an exception in ``train``), without keeping it alive."""
    ref = weakref.ref(recorder)

    def close() -> None:
        r = ref()
        if r is not None:
            r.close()

    atexit.register(close)
