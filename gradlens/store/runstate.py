"""Whether a run is complete, stopped (and why), or still being written: the manifest's ``status``, ``planned_steps``,
``stop_reason`` and ``writer``, read into one sentence that ``info``, ``analyze``, ``select``, ``report`` and the
notebooks print and store, so a truncated run never reads as a whole one.

A writer stamps ``status: writing`` with its pid and host on every commit and ``complete`` or ``stopped`` when it
closes; a run still marked ``writing`` whose writer is gone on this host was killed (nothing closed it).

The adapter as it was trained (``config["adapter"]``, written by :mod:`gradlens.record.adapter`) is said here too:
every premise of the analysis (sign stability of B, placement with A fixed) assumes a frozen A (LoRA-FA); a standard
PEFT LoRA trains A as well, and then B's gradient describes a moving A. That is said, not refused.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

from gradlens.errors import GradlensError, GradlensWarning

WRITING, COMPLETE, STOPPED, UNKNOWN = "writing", "complete", "stopped", "unknown"
INTERRUPTED = "interrupted"
MOVING_A = "A trained too (standard LoRA, not LoRA-FA): B's gradient then describes a moving A"


def writer_identity() -> dict[str, Any]:
    """Who writes a run: this process's pid and host (what a reader checks to tell "being written" from "killed")."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def resume_hint(config: Any) -> str:
    """How a stopped run is continued, in the words of what recorded it (its manifest ``config``): ``gradlens record``
    (and probe) take ``--resume``, a user's own script ``GradientRecorder(..., resume=True)``; ``gradlens train``
    does not resume."""
    config = config if isinstance(config, dict) else {}
    if config.get("tool") == "gradlens train" or isinstance(config.get("train"), dict):  # (before 0.2: "train")
        return "gradlens train does not resume: run it again"
    if isinstance(config.get("record"), dict):
        return "--resume continues it"
    return "GradientRecorder(..., resume=True) continues it"


def stop_reason(exc: BaseException | None) -> str:
    """The manifest's ``stop_reason`` for a run closed before training ended, from the exception that ended it."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    if exc is not None:
        text = str(exc).strip().splitlines()
        return f"failed: {type(exc).__name__}" + (f": {text[0][:200]}" if text else "")
    return "closed before training ended"


def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class RunState:
    """A run's state as a reader sees it now. ``status``: complete, stopped, writing (its writer is alive, or on
    another host) or unknown (a manifest from before run states); ``last_step``: the last committed step."""

    status: str
    steps: int
    last_step: int | None
    planned_steps: int | None
    reason: str | None
    writer: dict[str, Any] | None
    resume: str  # how it is continued (see :func:`resume_hint`)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    def describe(self, doing: str = "analysing") -> str:
        """One sentence: "complete: 600 of 600 steps", "stopped at 125 of 600 steps (interrupted; --resume continues
        it)", "being written by pid N; analysing the 189 steps committed so far"."""
        at = f"{self.last_step} of {self.planned_steps}" if self.planned_steps else f"step {self.last_step}"
        if self.status == COMPLETE:  # every_n_steps > 1 records fewer steps than it trains
            if not self.planned_steps:
                return f"complete: {self.steps} steps"
            recorded = f" ({self.steps} recorded)" if self.steps != self.planned_steps else ""
            return f"complete: {self.planned_steps} of {self.planned_steps} steps{recorded}"
        if self.status == WRITING:
            where = "" if self.writer.get("host") == socket.gethostname() else f" on host {self.writer.get('host')}"
            return (f"being written by pid {self.writer.get('pid')}{where}; {doing} the {self.steps} steps committed "
                    "so far")
        if self.status == STOPPED:
            return f"stopped at {at} steps ({self.reason}; {self.resume})"
        return f"run state unknown (written by an older gradlens, which kept no planned steps): {self.steps} steps"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def run_state(meta: dict[str, Any]) -> RunState:
    """The state of a run from its manifest JSON (``Run.meta``); a run marked ``writing`` whose writer on this host
    is no longer alive is stopped (killed before it could close the run)."""
    steps = [r["step"] for r in meta.get("steps") or []]
    status, reason, writer = meta.get("status"), meta.get("stop_reason"), meta.get("writer") or {}
    if status == WRITING and writer.get("host") == socket.gethostname() and not _pid_alive(writer.get("pid")):
        status, reason = STOPPED, f"its writer, pid {writer.get('pid')}, ended without closing it (killed?)"
    if status not in (WRITING, COMPLETE, STOPPED):
        status = UNKNOWN
    return RunState(status=status, steps=len(steps), last_step=steps[-1] if steps else None,
                    planned_steps=meta.get("planned_steps"), reason=reason, writer=writer or None,
                    resume=resume_hint(meta.get("config")))


def announce(meta: dict[str, Any], label: str, doing: str = "analysing") -> dict[str, Any]:
    """Say on the console (one :class:`GradlensWarning` each) that a run is not complete, or that its A trained, and
    return what a result's provenance keeps of it: ``run_state``, ``adapter`` and those ``notes``."""
    import warnings

    state = run_state(meta)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    adapter = config.get("adapter")
    notes = []
    if state.status not in (COMPLETE, UNKNOWN):
        notes.append(f"{label}: {state.describe(doing)}")
    if (note := adapter_note(adapter)) is not None:
        notes.append(f"{label}: {note}")
    for note in notes:
        warnings.warn(note, GradlensWarning, stacklevel=2)
    return {"run_state": state.to_json(), "adapter": adapter, "notes": notes}


def adapter_line(adapter: dict[str, Any]) -> str:
    """The adapter in a few words: ``LoRA-FA r=8 alpha=16 scaling 2.0, dropout 0.0, targets q_proj,v_proj`` (DoRA,
    rsLoRA and a trained A named); for a weight-space run, that there is none."""
    if adapter.get("space") == "weight":
        return f"none: the base weights W train (space weight), targets {','.join(adapter.get('target_modules', []))}"
    kind = "LoRA-FA (A frozen)" if adapter.get("lora_fa") else "LoRA with A trainable"
    if adapter.get("use_dora"):
        magnitude = "trainable" if adapter.get("dora_magnitude_trainable") else "frozen"
        kind += f", DoRA (magnitude vector {magnitude})"
    if adapter.get("use_rslora"):
        kind += ", rsLoRA"
    targets = adapter.get("target_modules") or []
    return (f"{kind}, r={adapter.get('r')} alpha={adapter.get('lora_alpha')} scaling {adapter.get('scaling')}, "
            f"dropout {adapter.get('dropout')}, targets {','.join(map(str, targets))}")


def adapter_note(adapter: Any) -> str | None:
    """The caveat for an adapter whose A trained (None for LoRA-FA, or a manifest without an adapter record)."""
    if isinstance(adapter, dict) and adapter.get("a_trainable"):
        return MOVING_A
    return None


def run_space(meta: dict[str, Any]) -> str:
    """The space a run was recorded in (``lora_b`` or ``weight``), from its manifest JSON; a run recorded before
    gradlens stored it is ``lora_b``, the only space there was."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    recorder = config.get("recorder") if isinstance(config.get("recorder"), dict) else {}
    return str(recorder.get("space") or "lora_b")


def require_space(found: str, wanted: str | None, where: str, flag: str = "--space") -> str:
    """``found`` when ``wanted`` is None or the same; else the one-line error naming the file and both spaces (mixing
    them would place entries of one parameterisation in the other, silently)."""
    if wanted is not None and wanted != found:
        raise GradlensError(f"{where}: it is in space {found!r}, but {flag} is {wanted!r}; placements of one space do "
                            "not transfer to the other")
    return found
