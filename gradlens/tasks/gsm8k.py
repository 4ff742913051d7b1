"""A GSM8K-style math task: loading, prompts (plain or chat) and a verifiable correctness reward.

Data follows GSM8K: a ``question`` column and an ``answer`` column holding the worked solution with the final answer
after ``####`` (column names configurable). The reward compares the final answer of a completion with the gold one:
numerically, with a parser that reads commas, units, ``\\boxed{}``, negatives, decimals and fractions; where Hugging
Face's ``math-verify`` is installed (``pip install 'gradlens[math]'``) it also accepts what that verifier proves equal
(LaTeX expressions), so it never scores lower than the numeric parser alone.

A completion is read only up to where it starts a new question or turn (:func:`own_turn`): a base model that does
not stop runs on into a made-up "Question: ..." of its own, and the last number of that text (or its ``####``) is
not an answer to the prompt. So ``" He has 20 apples. Question: Tom has 18"`` scores as 20, not 18.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from gradlens.config import MATH_PREFIX
from gradlens.errors import GradlensError, cause, check_not_empty
from gradlens.hub import hub_cause
from gradlens.tasks.base import RewardFunction, Task, completion_text

GSM8K_HUB_ID = "openai/gsm8k"
ANSWER_MARK = "####"
PLAIN_PROMPT = "Question: {question}\nAnswer:"
CHAT_INSTRUCTION = "Solve the problem step by step. Give the final answer as a number after '####'."
DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE)
# Where a run-on completion starts a new question or turn: a plain-prompt header at a line or sentence start
# ("Question:", "Q:", "Problem:", "User:", "Human:"), or a chat turn marker left in the text.
_NEW_TURN = re.compile(r"(?:^|(?<=[\s.!?]))(?:Question|Q|Problem|User|Human)\s*:"
                       r"|<\|(?:im_start|im_end|user|eot_id|start_header_id|endoftext)\|>|<(?:start|end)_of_turn>"
                       r"|\[INST\]")


# --------------------------------------------------------------------------------------------------------------------
# Answers


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def own_turn(text: str) -> str:
    """The completion up to where it starts a new question or turn (``Question:``, ``Q:``, a chat turn marker)."""
    match = _NEW_TURN.search(text)
    return text[: match.start()] if match else text


def extract_answer(text: str) -> str | None:
    """The final-answer part of a solution or completion, or None if it states none.

    Read in :func:`own_turn` only, in order: the line after the *first* ``####`` (a run-on can state another one
    later), the last ``\\boxed{}``, the rest of the line after "answer is", else the last number.
    """
    text = own_turn(text)
    if ANSWER_MARK in text:
        return text.split(ANSWER_MARK, 1)[1].strip().split("\n", 1)[0].strip()
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    said = _ANSWER_IS.findall(text)
    if said and parse_number(said[-1]) is not None:
        return said[-1].strip()
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    return numbers[-1] if numbers else None


def parse_number(text: str | None) -> Fraction | None:
    """The first number in an answer string, exactly: ``"$1,234.50"``, ``"-3 apples"``, ``"\\frac{3}{4}"``, ``"75%"``.

    Thousands separators, currency, units and LaTeX wrappers are ignored; ``a/b`` and ``\\frac{a}{b}`` are fractions.
    A percent sign is dropped, not divided out (GSM8K answers "25%" as 25).
    """
    if text is None:
        return None
    text = text.replace("\\!", "").replace("{,}", "").replace("\\$", "").replace("$", "").replace("\u2212", "-")
    text = _FRAC.sub(r"\1/\2", text)
    match = _NUMBER.search(_THOUSANDS.sub("", text))
    if match is None:
        return None
    try:
        num, _, den = match.group().partition("/")
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def gold_answer(solution: str) -> str:
    """The final answer of a GSM8K solution (after ``####``; else as :func:`extract_answer` finds it), or ''."""
    return extract_answer(str(solution)) or ""


@functools.cache
def _math_verify() -> tuple[Callable, Callable] | None:
    """``(parse, verify)`` of Hugging Face's math-verify if installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def is_correct(completion: str, gold: str, *, use_math_verify: bool = True) -> bool:
    """Whether the final answer of ``completion`` equals ``gold``: numerically (exact fractions), else by
    math-verify when installed and allowed, else as normalised strings."""
    predicted = extract_answer(completion)
    if predicted is None or not str(gold).strip():
        return False
    want, got = parse_number(str(gold)), parse_number(predicted)
    if want is not None and got is not None and want == got:
        return True
    verifier = _math_verify() if use_math_verify else None
    if verifier is not None:
        parse, verify = verifier
        try:
            return bool(verify(parse(f"${gold}$"), parse(f"${predicted}$")))
        except Exception:  # math-verify raises on some malformed LaTeX; an unparsable answer is a wrong one
            return False
    return want is None and predicted.strip().rstrip(".").lower() == str(gold).strip().lower()


def correctness_reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion's final answer equals the gold final answer, else 0.0.

    ``answer`` is the dataset column of final answers (:meth:`MathTask.dataset` writes it); TRL passes every dataset
    column as a keyword argument, so the other keyword arguments are ignored.
    """
    return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion, in its own turn, states a final number after ``####`` or in
    ``\\boxed{}``."""
    out = []
    for c in completions:
        text = own_turn(completion_text(c))
        stated = text.split(ANSWER_MARK, 1)[1] if ANSWER_MARK in text else _boxed(text)
        out.append(float(stated is not None and parse_number(stated.split("\n", 1)[0]) is not None))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Data


def _load_split(source: str, split: str, dataset_config: str | None):
    """One split of a hub id, a local data file, or a local directory (``save_to_disk`` output or data files)."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
            data = load_from_disk(str(path))
        elif path.is_file():
            if path.suffix not in DATA_FILE_TYPES:
                raise GradlensError(f"math task file {source}: unknown type {path.suffix!r}; use "
                                    f"{'/'.join(DATA_FILE_TYPES)}")
            check_not_empty(path, "math task file")
            data = load_dataset(DATA_FILE_TYPES[path.suffix], data_files=str(path))
        elif path.is_dir():  # data files named by split: train.jsonl, test.parquet, ...
            data = load_dataset(str(path), dataset_config)
        elif path.suffix in DATA_FILE_TYPES or source.startswith((".", "/")):
            raise GradlensError(f"math task file {source} does not exist")
        else:
            data = load_dataset(source, dataset_config)  # a hub id
    except GradlensError:
        raise
    except Exception as e:  # datasets raises many types; the message names the cause
        hub = None if path.exists() else hub_cause(e, source, repo_type="dataset")
        raise GradlensError(f"cannot load math task {source}: {hub or cause(e)}") from e
    if isinstance(data, Dataset):  # save_to_disk of a single split
        data = DatasetDict({"train": data})
    if split not in data:
        raise GradlensError(f"math task {source} has no split {split!r} (splits: {', '.join(data)})")
    return data[split]


@dataclass(frozen=True)
class MathTask(Task):
    """A GSM8K-style task: where its data is, which columns hold question and worked answer, the splits, the prompt
    format and whether GRPO adds a format reward."""

    source: str = GSM8K_HUB_ID
    dataset_config: str | None = None
    question_column: str = "question"
    answer_column: str = "answer"
    chat: bool = False
    train_split: str = "train"
    eval_split: str = "test"
    eval_max_new_tokens: int = 256
    with_format_reward: bool = False
    format_reason: str = "set by the caller"
    regime_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{MATH_PREFIX}:{self.source}"

    @property
    def prompt_format(self) -> str:
        return "chat" if self.chat else "plain"

    def is_correct(self, completion: str, answer: str) -> bool:
        return is_correct(completion_text(completion), answer)

    def trl_defaults(self, regime: str) -> dict[str, Any]:
        """The TRL settings of ``regime_defaults`` (those of the model it runs on, e.g. toy:math's), else none."""
        return dict(self.regime_defaults.get(regime, {}))

    def reward_functions(self) -> list[RewardFunction]:
        """Correctness, plus the format reward if asked for."""
        return [correctness_reward, format_reward] if self.with_format_reward else [correctness_reward]

    @classmethod
    def from_spec(cls, task: str, **kwargs: Any) -> MathTask:
        """``gsm8k`` (the hub's ``openai/gsm8k``, config ``main``) or ``gsm8k:SOURCE``."""
        if task == MATH_PREFIX:
            kwargs["dataset_config"] = kwargs.get("dataset_config") or "main"
            return cls(source=GSM8K_HUB_ID, **kwargs)
        return cls(source=task.removeprefix(f"{MATH_PREFIX}:"), **kwargs)

    def prompt(self, question: str) -> str | list[dict[str, str]]:
        """A plain-text prompt, or a one-turn conversation that TRL renders with the chat template."""
        if self.chat:
            return [{"role": "user", "content": f"{question}\n{CHAT_INSTRUCTION}"}]
        return PLAIN_PROMPT.format(question=question)

    def completion(self, solution: str) -> str | list[dict[str, str]]:
        """The SFT target: the worked solution without calculator annotations, ending in ``#### <answer>``."""
        text = _CALCULATOR.sub("", str(solution)).strip()
        return [{"role": "assistant", "content": text}] if self.chat else f" {text}"

    def dataset(self, split: str = "train", n: int | None = None):
        """A TRL-ready dataset: ``prompt``, ``completion`` (SFT target) and ``answer`` (final answer, for the reward).

        Raises a one-line error naming the expected columns if the data lacks them.
        """
        data = _load_split(self.source, split, self.dataset_config)
        missing = [c for c in (self.question_column, self.answer_column) if c not in data.column_names]
        if missing:
            raise GradlensError(
                f"math task {self.source} ({split}) lacks column(s) {', '.join(missing)}: expected a question column "
                f"{self.question_column!r} and an answer column {self.answer_column!r} ('... #### <number>'); "
                f"it has {', '.join(data.column_names)} (set --question_column / --answer_column)")
        if n is not None:
            data = data.select(range(min(n, len(data))))
        q, a = self.question_column, self.answer_column
        return data.map(lambda row: {"prompt": self.prompt(row[q]), "completion": self.completion(row[a]),
                                     "answer": gold_answer(row[a])},
                        remove_columns=data.column_names, desc="math task prompts")


