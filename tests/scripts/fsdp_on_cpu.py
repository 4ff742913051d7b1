"""Run a Python module or script with accelerate's FSDP path enabled on CPU processes (gloo), for the FSDP2 tests.

accelerate enables FSDP only for accelerator devices (``AcceleratorState`` keeps ``MULTI_CPU`` when ``use_cpu``),
so ``accelerate launch`` with an FSDP config on CPUs trains plain DDP. This launcher lets accelerate take the FSDP
plugin it was given on CPU processes too; everything else (``fully_shard``, its DTensors, the Trainer) is the real
code that runs on GPUs.

Usage: ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml tests/scripts/fsdp_on_cpu.py -m MODULE ARGS``
or ``... fsdp_on_cpu.py SCRIPT ARGS``.
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """Take the plugin on CPU processes; and again on every later ``AcceleratorState()`` (e.g. TRL's ``set_seed``),
    which copies ``PartialState``'s ``MULTI_CPU`` back over the shared state."""
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        if fsdp_plugin is not None and self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
