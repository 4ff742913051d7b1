"""Launching several local CPU processes (gloo) for the distributed tests: torchrun or ``accelerate launch``, offline,
one thread each, the whole process group killed on a timeout (a hang must fail the test, not the suite)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.store import committed_steps

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate"
FSDP_ON_CPU = REPO / "tests" / "scripts" / "fsdp_on_cpu.py"
TIMEOUT = 300  # seconds; a launch takes 15-40 s on 2 loaded CPU cores, so hitting this means a hang


def launch_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` in a process group of its own (so that a kill reaches every rank)."""
    return subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a launch from :func:`start` and every process under it, at once: torchrun starts each rank in a
    session of its own, so a signal to the launcher's process group does not reach them."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Wait for a :func:`start`\\ ed launch; on timeout kill its whole process group and fail."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"launch did not finish in {timeout} s (deadlock?): {proc.args}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def kill_after_committed(cmd: list[str], out: Path, steps: int) -> None:
    """Start ``cmd``, a launch recording into ``out``, and SIGKILL every process of it as soon as ``out`` has
    committed ``steps`` steps; fail if the launch ended (or committed nothing) first."""
    proc = start(cmd)
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and committed_steps(out) < steps and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, finish(proc).stderr[-3000:]
    kill_all(proc)
    finish(proc)
    assert committed_steps(out) >= steps, f"no {steps} committed steps in {TIMEOUT} s: {cmd}"


def torchrun(script: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` of ``script`` on ``nproc`` local processes."""
    return finish(start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                         str(script), *args]))


def accelerate_gradlens_cmd(config: str, *args: str, nproc: int = 2, config_file: Path | None = None) -> list[str]:
    """``accelerate launch --config_file recipes/accelerate/CONFIG.yaml`` (or ``config_file``) of ``gradlens ARGS`` on
    CPU processes.

    Through :data:`FSDP_ON_CPU`, which lets accelerate's FSDP path run on CPUs (it changes nothing for DDP or
    DeepSpeed, which accelerate runs on CPU processes as it is).
    """
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(config_file or ACCELERATE_CONFIGS / f"{config}.yaml"), "--num_processes", str(nproc),
            "--main_process_port", str(free_port()), str(FSDP_ON_CPU), "-m", "gradlens.cli.main", *args]


def accelerate_gradlens(config: str, *args: str, nproc: int = 2,
                        config_file: Path | None = None) -> subprocess.CompletedProcess:
    return finish(start(accelerate_gradlens_cmd(config, *args, nproc=nproc, config_file=config_file)))
