"""gradlens: record, analyze and act on the LoRA-B gradients of TRL SFT and GRPO runs."""

from gradlens.errors import GradlensError
from gradlens.store import ModuleSpec, Run, RunWriter, open_run

__version__ = "0.1.0"

__all__ = ["GradlensError", "ModuleSpec", "Run", "RunWriter", "open_run", "__version__"]
