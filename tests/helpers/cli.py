"""The CLI as a test drives it: in this process, with its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradlens.cli.main import main
from gradlens.errors import GradlensError

QUIET = ["--logging_steps", "100", "--disable_tqdm", "true", "--n_train", "64"]


def gradlens(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a fresh process (slow to start: use for what needs a process of its own)."""
    return subprocess.run([sys.executable, "-m", "gradlens.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def gradlens_inproc(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process: exit code, stdout and stderr as a CompletedProcess."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one ``gradlens ...`` line on stderr holding every needle; returns that line."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gradlens ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    """Call ``fn`` expecting a GradlensError whose message is one line holding ``match``; returns the message."""
    with pytest.raises(GradlensError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert match in message and len(message.splitlines()) == 1, message
    return message
