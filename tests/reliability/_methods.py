"""One small working config per registered method, for the invariant rows (7-10, 24).

A method registered later without an entry here is tried with its config defaults;
if those do not attach to tiny Llama, the invariant tests fail and say to add one.
"""

from __future__ import annotations

from typing import Any

from deltatune.core.config import DeltaConfig
from deltatune.core.registry import config_class, get_method, known_methods

EXAMPLES: dict[str, dict[str, Any]] = {
    "lora": dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    "adalora": dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    "ia3": dict(),
    "loha": dict(r=2, target_modules=["q_proj", "v_proj"]),
    "krona": dict(target_modules=["q_proj", "v_proj"]),
    "kronab": dict(),
    "unified": dict(bottleneck_size=4),
    "houlsby": dict(bottleneck_size=4),
    "pfeiffer": dict(reduction_factor=8.0),
    "parallel_adapter": dict(bottleneck_size=4),
    "bitfit": dict(add_missing_biases=True),
    "full": dict(),
    "prefix": dict(prefix_length=3, reparam_hidden=8),
    "prompt": dict(prompt_length=3),
    "ptuning": dict(prompt_length=3, placement="prefix", encoder="mlp", encoder_hidden=8),
    "mam": dict(prefix_length=3, reparam_hidden=8, bottleneck_size=4),
    "ptuning_v2": dict(prompt_length=3),
    "mpt": dict(prompt_length=3, init="random"),
    "ipt": dict(prompt_length=3),
}
# Methods that cannot stand alone on a model: ``combination`` builds a LoRA out of deltas
# already attached (tests/methods/test_combine.py covers it, incl. merge and save/load).
DERIVED = {"combination"}


def example_config(method: str) -> DeltaConfig:
    """Return a small config of ``method`` that fits tiny Llama."""
    return config_class(method)(**EXAMPLES.get(method, {}))


def methods() -> list[str]:
    """Every registered method that attaches on its own (see ``DERIVED``)."""
    return [m for m in known_methods() if m not in DERIVED]


def mergeable_methods() -> list[str]:
    """Registered methods whose delta folds into the base weights."""
    return [m for m in methods() if get_method(m).mergeable]
