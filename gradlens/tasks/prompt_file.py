"""A user's own task from one local file of ``prompt`` and ``answer`` columns, scored by exact match.

The last tenth of the rows (at least one) is the held-out split and never trains, so ``--n_eval`` and
``gradlens compare`` measure accuracy on prompts the model did not see. SFT trains on ``completion`` where the file
has that column, else on the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradlens.errors import GradlensError, cause, check_not_empty
from gradlens.tasks.base import RewardFunction, Task, exact_match, exact_match_reward

DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
HELDOUT_SHARE = 0.1


@dataclass(frozen=True)
class PromptFileTask(Task):
    """Prompt/answer pairs from ``path`` (.json, .jsonl, .csv or .parquet)."""

    path: str
    train_split = "train"
    eval_split = "heldout"
    eval_max_new_tokens = 32

    @property
    def name(self) -> str:
        return self.path

    def __post_init__(self) -> None:
        path = Path(self.path)
        if path.suffix not in DATA_FILE_TYPES:
            raise GradlensError(f"unknown task {self.path!r}: use 'addition', a .json/.jsonl/.csv/.parquet file, "
                                "'gsm8k' or 'gsm8k:SOURCE'")
        if not path.is_file():
            raise GradlensError(f"task file {self.path} does not exist")

    def _rows(self):
        from datasets import load_dataset

        check_not_empty(self.path, "task file")
        try:
            data = load_dataset(DATA_FILE_TYPES[Path(self.path).suffix], data_files=self.path, split="train")
        except Exception as e:  # datasets raises many types; the message names the cause
            raise GradlensError(f"cannot read task file {self.path}: {cause(e)}") from e
        missing = {"prompt", "answer"} - set(data.column_names)
        if missing:
            raise GradlensError(f"task file {self.path} lacks column(s) {', '.join(sorted(missing))}")
        if len(data) < 2:
            raise GradlensError(f"task file {self.path} has {len(data)} row(s); it needs at least 2 (train and "
                                "held-out)")
        if "completion" not in data.column_names:
            data = data.add_column("completion", [str(a) for a in data["answer"]])
        return data.select_columns(["prompt", "completion", "answer"])

    def dataset(self, split: str = "train", n: int | None = None):
        self.check_split(split, ("train", "heldout"))
        data = self._rows()
        n_heldout = max(1, int(len(data) * HELDOUT_SHARE))
        rows = range(len(data) - n_heldout) if split == "train" else range(len(data) - n_heldout, len(data))
        rows = rows[:n] if n is not None else rows
        return data.select(rows)

    def is_correct(self, completion: str, answer: str) -> bool:
        return exact_match(completion, answer)

    def reward_functions(self) -> list[RewardFunction]:
        return [exact_match_reward]
