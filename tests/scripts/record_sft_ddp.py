"""A toy SFT run with the GradientRecorder, meant to be launched on several CPU processes (gloo) by the DDP test.

Every rank trains the shipped ``tiny`` base model with a LoRA-FA adapter on the first rows of the addition task, in
sequential order, and records into ``OUT/run`` (only rank 0 may write there). For the test's independent reference
each rank also saves, through observation only, the micro-batches it trained on and the ``lora_B`` weights before
every optimizer step (``OUT/rank{R}.pt``), and a few facts about its recorder (``OUT/rank{R}.json``).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 record_sft_ddp.py OUT [--steps N] ...``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from gradlens.lora import attach_lora, lora_b_parameters
from gradlens.models import load_model
from gradlens.record.recorder import GradientRecorder
from gradlens.tasks.addition import AdditionTask
from gradlens.training.settings import build_trl_config


class ObservingSFTTrainer(SFTTrainer):
    """``SFTTrainer`` that keeps a copy of every micro-batch it trains on; it changes nothing else."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_batches: list[dict[str, torch.Tensor]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen_batches.append({k: v.detach().cpu().clone() for k, v in inputs.items()
                                  if isinstance(v, torch.Tensor)})
        return super().training_step(model, inputs, num_items_in_batch)


class SnapshotLoraB(TrainerCallback):
    """Copies every ``lora_B`` weight at the beginning of each optimizer step."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.snapshots.append({n: p.detach().cpu().clone() for n, p in lora_b_parameters(model)})


class BreakRunDirectory(TrainerCallback):
    """On the main process only, after optimizer step ``step``: puts a file where the run's shard folder is, so the
    writer's next commit fails with an OSError there alone (a full disk or lost permissions, mid-run)."""

    def __init__(self, run: Path, step: int) -> None:
        self.run, self.step = run, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step == self.step:
            shutil.rmtree(self.run / "shards", ignore_errors=True)
            (self.run / "shards").write_text("not a folder\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="per-device batch size")
    parser.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max_grad_norm", type=float, default=4.0)
    parser.add_argument("--n_train", type=int, default=64)
    parser.add_argument("--break_run_at", type=int, help="make the main process's writer fail after this step")
    args = parser.parse_args()

    model, tokenizer = load_model("toy:tiny")
    model = attach_lora(model)
    data = AdditionTask().dataset("train", args.n_train)
    config = build_trl_config("sft", str(args.out / "trainer"), {
        "max_steps": args.steps, "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": args.ga, "learning_rate": args.lr, "max_grad_norm": args.max_grad_norm,
        "train_sampling_strategy": "sequential", "logging_steps": 1, "disable_tqdm": True, "seed": 0, "use_cpu": True,
    })
    trainer = ObservingSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    snapshots = SnapshotLoraB()
    trainer.add_callback(snapshots)
    if args.break_run_at is not None:
        trainer.add_callback(BreakRunDirectory(args.out / "run", args.break_run_at))
    recorder = GradientRecorder.attach(trainer, args.out / "run", steps_per_shard=1 if args.break_run_at else None)
    trainer.train()

    rank = trainer.args.process_index
    torch.save({"batches": trainer.seen_batches, "snapshots": snapshots.snapshots}, args.out / f"rank{rank}.pt")
    facts = {"rank": rank, "world_size": trainer.args.world_size, "pid": os.getpid(),
             "steps_recorded": recorder.steps_recorded, "global_step": trainer.state.global_step,
             "log_history": trainer.state.log_history}
    (args.out / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
