"""Tasks: how rows become examples, batches, a loss and evaluation metrics.

One task per file. Each subclasses :class:`deltatune.tasks.base.Task`:

* :class:`CausalLMSFT` (``causal_lm.py``): prompt/response or chat messages, loss on
  the response tokens only; ROUGE-L of generations and response perplexity.
"""

from deltatune.tasks.base import IGNORE, Encoded, EncodeStats, Task
from deltatune.tasks.causal_lm import CausalLMBase, CausalLMSFT

TASKS = {"causal-lm-sft": CausalLMSFT}

__all__ = ["IGNORE", "TASKS", "CausalLMBase", "CausalLMSFT", "EncodeStats", "Encoded", "Task"]
