"""What every command config shares: the vocabularies (regimes, dtypes, devices, placement methods), the help
metadata of a field, and the checks of seeds, methods and budgets. A leaf: no numpy, no torch."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from gradlens.budget import SCOPES, Budget
from gradlens.errors import GradlensError

REGIMES: tuple[str, ...] = ("sft", "grpo")
STORAGE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
MODEL_DTYPES: tuple[str, ...] = ("auto", *STORAGE_DTYPES)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PROMPT_FORMATS: tuple[str, ...] = ("auto", "plain", "chat")
MATH_PREFIX = "gsm8k"  # --task gsm8k (the hub's openai/gsm8k) or gsm8k:SOURCE (hub id, local file or directory)

TOY_PREFIX = "toy:"

# What placement works over: the entries of LoRA's B (A frozen, the default), or the entries of the chosen modules'
# base weights W (no adapter; the parameterisation of arXiv 2602.01599).
SPACES: tuple[str, ...] = ("lora_b", "weight")
DEFAULT_SPACE = "lora_b"
SPACE_HELP = ("'lora_b' (the default): the entries of LoRA's B, A frozen; 'weight': the entries of the base weights W "
              "(d_out x d_in) of the --lora_target_modules, trained without an adapter")

# Selector names, kept here (light) so flags are checked without importing numpy; gradlens.placement uses the same.
PLACEMENT_METHODS: tuple[str, ...] = ("random", "random_matched", "magnitude", "fisher", "sign", "sign_magnitude",
                                      "modules")
INFORMED_METHODS: tuple[str, ...] = ("magnitude", "fisher", "sign", "sign_magnitude")

SELECT_METHODS: tuple[str, ...] = tuple(m for m in PLACEMENT_METHODS if m != "random_matched")

# The informed selectors ``gradlens diagnose`` sets random placement against by default.
DIAGNOSE_METHODS: tuple[str, ...] = ("sign", "sign_magnitude", "fisher")


def field_help(help_text: str, **extra: Any) -> dict[str, Any]:
    """A field's ``metadata``: its command-line help and any argparse extras (``choices``, ``cli=False``)."""
    return {"help": help_text, **extra}

def check_seed(name: str, seed: int) -> None:
    """Seeds in 0..2**32-1, what numpy's and torch's seeding accept (a larger one fails deep inside a run)."""
    if not 0 <= seed < 2**32:
        raise GradlensError(f"{name} must be in 0..2**32-1, got {seed}")


def budgets_field(default: list[str]) -> Any:
    """The ``budgets`` flag shared by probe, select and compare."""
    return field(default_factory=lambda: list(default), metadata=field_help(
        "budgets: a share of all B entries ('1%', '0.001') or a count ('5000')"))


def scope_field() -> Any:
    """The ``scope`` flag shared by probe, select and compare."""
    return field(default="global", metadata=field_help(
        "'global': top-k over the whole adapter; 'per_module': the same share in every matrix", choices=SCOPES))


def check_space(space: str, flag: str = "--space") -> None:
    if space not in SPACES:
        raise GradlensError(f"{flag} {space!r} is not one of {', '.join(SPACES)}")


def check_spaces(spaces: list[str]) -> None:
    """compare's ``--space``: distinct known spaces, at least one."""
    if not spaces or len(set(spaces)) != len(spaces):
        raise GradlensError(f"--space must name distinct spaces, at least one; got {spaces}")
    for space in spaces:
        check_space(space)


def check_methods(methods: list[str], allowed: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise GradlensError(f"unknown or no placement method(s) {', '.join(unknown) or '(none)'}; "
                            f"choose from: {', '.join(allowed)}")


def check_budgets(budgets: list[str], scope: str) -> None:
    if not budgets:
        raise GradlensError("no budgets given (e.g. --budgets 1% 0.1%)")
    if scope not in SCOPES:
        raise GradlensError(f"unknown budget scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    for b in budgets:
        Budget.parse(str(b), scope)


# Settings that gradlens keeps itself (a TRL extra of the same name would be silently overridden) ...
RESERVED_TRL = ("max_steps", "seed", "learning_rate", "output_dir")
# ... names that changed meaning or were renamed, so an old YAML fails loudly instead of doing something else ...
RENAMED = {"model_dtype": "the model's dtype is now --dtype, as in TRL (and the shard storage dtype, which --dtype "
                          "set before gradlens 0.2, is --storage_dtype)"}
# ... and TRL ModelConfig fields gradlens does not support, with why.
UNSUPPORTED_MODEL_FIELDS = {
    "load_in_4bit": "quantized base weights", "load_in_8bit": "quantized base weights",
    "lora_target_parameters": "adapters on parameters rather than modules",
    "lora_modules_to_save": "fully trained extra modules", "lora_task_type": "task types other than CAUSAL_LM",
}


def check_trl_extras(trl: dict[str, Any]) -> None:
    """Refuse, in one line, TRL extras that gradlens sets itself, old gradlens names, and unsupported ModelConfig
    fields (all before anything loads)."""
    reserved = sorted(set(RESERVED_TRL) & set(trl))
    if reserved:
        raise GradlensError(f"set {', '.join(reserved)} as gradlens settings, not TRL extras")
    for name, why in RENAMED.items():
        if name in trl:
            raise GradlensError(f"--{name} is gone: {why}")
    for name, what in UNSUPPORTED_MODEL_FIELDS.items():
        if name in trl:
            raise GradlensError(f"--{name}: gradlens does not support {what}; it records and trains the lora_B of "
                                "plain LoRA-FA adapters on unquantized weights")
