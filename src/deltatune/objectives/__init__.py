"""Training objectives usable with any delta method (T-Few's L_LM + L_UL + L_LN...)."""

from deltatune.objectives.tfew import (
    ChoiceBatch,
    TFewLosses,
    TFewObjective,
    choice_token_logprobs,
    rank_classify,
    tfew_losses,
)

__all__ = ["ChoiceBatch", "TFewLosses", "TFewObjective", "choice_token_logprobs",
           "rank_classify", "tfew_losses"]
