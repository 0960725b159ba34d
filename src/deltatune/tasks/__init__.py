"""Tasks: how rows become examples, batches, a loss and evaluation metrics.

One task per file. Each subclasses :class:`deltatune.tasks.base.Task`:

* :class:`CausalLMSFT` (``causal_lm.py``): prompt/response or chat messages, loss on
  the response tokens only; ROUGE-L of generations and response perplexity.
* :class:`LanguageModeling` (``language_modeling.py``): raw text, loss on every token;
  perplexity. Also the general text of the forgetting guard.
* :class:`SequenceClassification` (``classification.py``): a classification head, or
  label words (a verbaliser) through a causal LM; accuracy, macro-F1.
* :class:`TokenClassification` (``token_classification.py``): BIO tagging with a
  per-token head; word accuracy, span F1.
* :class:`Seq2Seq` (``seq2seq.py``): encoder-decoder; perplexity, ROUGE-L, BLEU, EM.
* :class:`MultipleChoice` (``multiple_choice.py``): rank classification by
  length-normalised log-probability, T-Few losses; accuracy.
"""

from deltatune.tasks.base import IGNORE, Encoded, EncodeStats, Task
from deltatune.tasks.causal_lm import CausalLMBase, CausalLMSFT
from deltatune.tasks.classification import SequenceClassification
from deltatune.tasks.language_modeling import LanguageModeling
from deltatune.tasks.multiple_choice import MultipleChoice
from deltatune.tasks.seq2seq import Seq2Seq
from deltatune.tasks.token_classification import TokenClassification

# tasks the CLI builds from a tokenizer and options alone
TASKS = {"causal-lm-sft": CausalLMSFT, "causal-lm": LanguageModeling}
ALL_TASKS = {**TASKS, "sequence-classification": SequenceClassification,
             "token-classification": TokenClassification, "seq2seq": Seq2Seq,
             "multiple-choice": MultipleChoice}

__all__ = ["ALL_TASKS", "IGNORE", "TASKS", "CausalLMBase", "CausalLMSFT", "EncodeStats",
           "Encoded", "LanguageModeling", "MultipleChoice", "Seq2Seq", "SequenceClassification",
           "Task", "TokenClassification"]
