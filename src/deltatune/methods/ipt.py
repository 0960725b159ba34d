"""Instruction prompt tuning, IPT (Sun et al., 2023, "How Does In-Context Learning Help
Prompt Tuning?", arXiv:2302.11521; the name from Singhal et al.'s Med-PaLM).

The model reads a soft prompt, then in-context demonstrations retrieved for this very
input, then the input:

    model([P; embed(demonstrations(x)); embed(x)])

P is trained exactly as in prompt tuning (the model stays frozen); the demonstrations
are text, chosen per input by embedding similarity: exact nearest neighbours of x in
the training pool by cosine of ``minilm-l6`` sentence embeddings (``selection="random"``
for the random-demonstration control). A training example never demonstrates itself.

    pool = DemonstrationPool(train_inputs, train_outputs)
    texts = ipt_inputs(config, pool, inputs)        # demonstrations + input, as text
    dm = dt.attach(model, config)                    # the soft prompt goes in front

Saved: ``prompt`` as prompt tuning; the pool is data, not part of the delta. The ICL
baseline is the same texts with no soft prompt and no training
(:func:`deltatune.demonstrations.icl_predict_choices`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from deltatune.core.config import param
from deltatune.demonstrations import DemonstrationPool
from deltatune.methods.prompt import PromptTuning, PromptTuningConfig


@dataclasses.dataclass(kw_only=True)
class IPTConfig(PromptTuningConfig):
    """IPT: prompt tuning's fields plus how demonstrations are chosen."""

    method = "ipt"

    num_demonstrations: int = param(1, min=0, help="demonstrations put before each input")
    selection: Literal["retrieved", "random"] = param(
        "retrieved", help="nearest neighbours by MiniLM cosine, or random")


def ipt_inputs(config: IPTConfig, pool: DemonstrationPool, inputs: Sequence[str]) -> list[str]:
    """Return each input preceded by its demonstrations, as the text the model reads."""
    return pool.prompts(inputs, config.num_demonstrations, config.selection)


class IPT(PromptTuning):
    """A soft prompt in front of retrieved demonstrations and the input."""

    name = "ipt"
    config_cls = IPTConfig
    summary = "soft prompt + retrieved in-context demonstrations + input (Sun et al. 2023)"
