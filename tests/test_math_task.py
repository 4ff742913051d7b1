"""The GSM8K-style math task: loading from local files in every supported form, answers, rewards and their errors."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from gradlens.errors import GradlensError
from gradlens.tasks.gsm8k import (
    MathTask,
    correctness_reward,
    extract_answer,
    format_reward,
    gold_answer,
    is_correct,
    own_turn,
    parse_number,
)

ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A shop earns 1250 dollars a day. How much in 4 days?",
     "answer": "It earns 1250*4 = <<1250*4=5000>>5000 dollars.\n#### 5,000"},
    {"question": "The temperature was 5 and fell by 8. What is it now?",
     "answer": "It is 5-8 = -3.\n#### -3"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Hand-written completions against the gold answers 72, 5000 and -3: (completion, gold, correct).
CASES = [
    (" She sold 24 in May, so 72 in all.\n#### 72", "72", True),  # GSM8K style
    (" 48 + 24 = 71\n#### 71", "72", False),  # wrong
    (" The shop earns $5,000 in total.\n#### $5,000", "5000", True),  # commas and currency in the answer
    (" 4 days give 5,000 dollars.", "5000", True),  # no marker: last number, thousands separator
    ("So the answer is \\boxed{72}.", "72", True),  # \boxed{}
    ("So the answer is \\boxed{\\frac{144}{2}}.", "72", True),  # a LaTeX fraction
    ("It is now \\boxed{-3} degrees", "-3", True),  # negative
    ("It is now 3 degrees.\n#### 3", "-3", False),  # sign matters
    (" 72.00 clips\n#### 72.0", "72", True),  # decimals
    (" The answer is 72 clips. Question: 5 more?", "72", True),  # "answer is" beats a later number
    (" 72\n#### 72\nQuestion: What is 1+1?\nAnswer: 2\n#### 2", "72", True),  # first #### wins: made-up next turn
    (" He has 20 apples. Question: Tom has 18", "18", False),  # the last number is in a made-up next question
    (" He has 20 apples. Question: Tom has 18", "20", True),
    (" 3 + 4 = 7\n\nQ: Ann has 5 pens and 9 more?\nA: 14\n#### 14", "14", False),  # run-on "Q:" with its own ####
    (" 3 + 4 = 7\n\nQ: Ann has 5 pens and 9 more?\nA: 14\n#### 14", "7", True),
    (" so 7.<|im_start|>user\nWhat is 9+9?", "9", False),  # a chat turn marker left in the text
    (" so 7.\nUser: what is 9+9? Problem: 18", "7", True),
    (" Her IQ: 140, so 9", "9", True),  # "Q:" inside a word starts nothing
    (" I do not know.", "72", False),  # no answer at all
    ("", "72", False),
]


@pytest.mark.parametrize(("completion", "gold", "correct"), CASES)
def test_fallback_parser_scores_hand_written_completions(completion: str, gold: str, correct: bool) -> None:
    assert is_correct(completion, gold, use_math_verify=False) is correct


def test_parse_number_and_extract_answer() -> None:
    assert parse_number("$1,234.50") == Fraction(246900, 200)
    assert parse_number("-3 apples") == -3
    assert parse_number("\\frac{3}{4}") == Fraction(3, 4)
    assert parse_number("3/4") == Fraction(3, 4)
    assert parse_number("75%") == 75
    assert parse_number("-$5") == -5
    assert parse_number("\u22127") == -7  # unicode minus
    assert parse_number("no number") is None and parse_number(None) is None
    assert parse_number("1,2345") == 1  # not a thousands separator: the first number only
    assert extract_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_answer("nothing here") is None
    assert gold_answer(ROWS[1]["answer"]) == "5,000"
    assert own_turn(" 20 apples.\nQuestion: 18?") == " 20 apples.\n" and own_turn("Question: 1") == ""
    assert all(own_turn(r["answer"]) == r["answer"] for r in ROWS)  # gold solutions hold no new turn


def test_rewards_have_trl_signature_and_read_conversations() -> None:
    completions = [c for c, _, _ in CASES]
    answers = [g for _, g, _ in CASES]
    rewards = correctness_reward(["p"] * len(CASES), completions, answer=answers, trainer_state=None, question=None)
    assert rewards == [float(ok) for _, _, ok in CASES]
    chat = [[{"role": "assistant", "content": "so #### 72"}], [{"role": "assistant", "content": "#### 7"}]]
    assert correctness_reward(["p", "p"], chat, answer=["72", "72"]) == [1.0, 0.0]
    assert format_reward(["p"] * 4, ["x #### 72", "\\boxed{1,000}", "72", "#### none"]) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(["p"] * 2, ["7 Question: 1+1?\n#### 2", "#### 7 Question: 1+1?\n#### 2"]) == [0.0, 1.0]
    with pytest.raises(ValueError):  # TRL passes one answer per completion; a mismatch is a bug, not a zero
        correctness_reward(["p"], ["#### 1", "#### 2"], answer=["1"])


def test_math_verify_path_accepts_latex_equivalents() -> None:
    pytest.importorskip("math_verify")
    assert is_correct("\\boxed{\\dfrac{3}{4}}", "0.75")
    assert is_correct("\\boxed{\\sqrt{4}}", "2")  # beyond the numeric parser
    assert not is_correct("\\boxed{\\sqrt{5}}", "2")
    assert not is_correct("I do not know.", "72")


def test_jsonl_parquet_and_saved_directory_load_alike(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    jsonl = write_jsonl(tmp_path / "gsm.jsonl", ROWS)
    parquet = tmp_path / "gsm.parquet"
    Dataset.from_list(ROWS).to_parquet(str(parquet))
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(str(saved))
    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", ROWS)
    write_jsonl(files / "test.jsonl", ROWS[1:])

    for source in (jsonl, parquet, saved, files):
        data = MathTask.from_spec(f"gsm8k:{source}").dataset("train")
        assert sorted(data.column_names) == ["answer", "completion", "prompt"]
        assert data["answer"] == ["72", "5,000", "-3"]
        assert data["prompt"][0] == f"Question: {ROWS[0]['question']}\nAnswer:"
        assert data["completion"][0].endswith("#### 72") and "<<" not in data["completion"][0]
        # each gold solution earns the full reward from its own final answer
        assert correctness_reward(data["prompt"], data["completion"], answer=data["answer"]) == [1.0] * 3
    assert MathTask.from_spec(f"gsm8k:{saved}").dataset("test", n=5)["answer"] == ["72"]
    assert MathTask.from_spec(f"gsm8k:{files}").dataset("test")["answer"] == ["5,000", "-3"]
    chat = MathTask.from_spec(f"gsm8k:{jsonl}", chat=True).dataset("train", n=1)
    assert chat["prompt"][0][0]["role"] == "user" and chat["completion"][0][0]["role"] == "assistant"


def test_custom_columns_and_one_line_errors(tmp_path: Path) -> None:
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"problem": r["question"], "solution": r["answer"]}
                                                        for r in ROWS])
    data = MathTask.from_spec(f"gsm8k:{renamed}", question_column="problem", answer_column="solution").dataset()
    assert data["answer"] == ["72", "5,000", "-3"]

    with pytest.raises(GradlensError) as e:
        MathTask.from_spec(f"gsm8k:{renamed}").dataset()
    msg = str(e.value)
    assert "\n" not in msg and "question" in msg and "answer" in msg and "problem, solution" in msg
    with pytest.raises(GradlensError, match="no split 'test'.*splits: train"):
        MathTask.from_spec(f"gsm8k:{renamed}").dataset("test")
    with pytest.raises(GradlensError, match="does not exist"):
        MathTask.from_spec(f"gsm8k:{tmp_path / 'missing.jsonl'}").dataset()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(GradlensError, match="unknown type"):
        MathTask.from_spec(f"gsm8k:{tmp_path / 'notes.txt'}").dataset()
