"""Tasks: how rows become examples, batches, a loss and evaluation metrics.

One task per file. Each subclasses :class:`deltatune.tasks.base.Task`:

* :class:`CausalLMSFT` (``causal_lm.py``): prompt/response or chat messages, loss on
  the response tokens only; ROUGE-L of generations and response perplexity.
* :class:`LanguageModeling` (``language_modeling.py``): raw text, loss on every token;
  perplexity. Also the general text of the forgetting guard.
"""

from deltatune.tasks.base import IGNORE, Encoded, EncodeStats, Task
from deltatune.tasks.causal_lm import CausalLMBase, CausalLMSFT
from deltatune.tasks.language_modeling import LanguageModeling

TASKS = {"causal-lm-sft": CausalLMSFT, "causal-lm": LanguageModeling}

__all__ = ["IGNORE", "TASKS", "CausalLMBase", "CausalLMSFT", "EncodeStats", "Encoded",
           "LanguageModeling", "Task"]
