"""Causal-LM supervised fine-tuning (SFT): loss on the response tokens only.

Rows are either ``{"prompt": ..., "response": ...}`` (column names configurable) or
``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``.

How a row becomes tokens:

* With a chat template (the tokenizer's, used when it has one unless
  ``chat_template=False``) a prompt/response row is the conversation
  ``[user: prompt, assistant: response]``. The rendered text is cut into segments at
  every assistant turn: ``template(messages[:i], add_generation_prompt=True)`` ends
  where assistant turn ``i`` starts and ``template(messages[:i+1])`` where it ends. Only
  the assistant segments (including the template's end-of-turn marker, so the model
  learns to stop) are supervised; system/user text and template scaffolding are not.
* Without a template: ``prompt + separator`` (not supervised) then ``response + eos``
  (supervised); ``messages`` rows render as ``"role: content\\n"`` lines.

Each segment is tokenized on its own (``add_special_tokens=False``) and the ids are
concatenated, so the prompt's tokens are exactly those a user's prompt gets at
generation time. Labels are the input ids on supervised positions and -100 elsewhere;
the loss is the summed cross-entropy of ``logits[t]`` against ``labels[t+1]``.
Batches are padded on the right with a pad token distinct from eos
(:func:`deltatune.models.ensure_pad_token` is applied to the tokenizer), padding is
masked from attention and loss. Examples longer than ``max_length`` are cut at the
right end and counted; if more than ``max_truncated`` of them are cut, encoding
stops with an error (raise ``max_length`` or ``max_truncated``).

Evaluation reports the mean response-token loss, its perplexity, and, when
``generate_examples`` allows, ROUGE-L of greedy generations (left-padded prompts)
against the response (or the row's ``references`` list when present).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deltatune import metrics
from deltatune.core.errors import ConfigError, DataError
from deltatune.kernels import fast_path_enabled
from deltatune.kernels.head_loss import causal_lm_loss_sum
from deltatune.kernels.sampling import Sampling
from deltatune.tasks.base import (
    IGNORE,
    Batch,
    Example,
    Row,
    Task,
    batched,
    pad_to,
    require,
)


class CausalLMBase(Task):
    """Shared by SFT and raw-text LM: right-padded collate, token loss, perplexity."""

    def __init__(self, tokenizer: Any, *, max_length: int = 512, model: Any | None = None,
                 max_truncated: float = 0.05) -> None:
        super().__init__()
        from deltatune.models import ensure_pad_token

        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length must be an int >= 2, got {max_length!r}",
                              field="max_length")
        if not 0.0 <= max_truncated <= 1.0:
            raise ConfigError(f"max_truncated is a fraction in [0, 1], got {max_truncated!r}",
                              field="max_truncated")
        self.tokenizer = tokenizer
        self.pad_note = ensure_pad_token(tokenizer, model)
        self.max_length = max_length
        self.max_truncated = max_truncated

    @property
    def pad_id(self) -> int:
        """The pad token id (distinct from eos, see ``ensure_pad_token``)."""
        return int(self.tokenizer.pad_token_id)

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_rows(self, rows: Any, source: str = "data") -> list[Example]:
        """Encode rows (see :meth:`Task.encode_rows`) and enforce ``max_truncated``."""
        out = super().encode_rows(rows, source)
        if self.stats.rows and self.stats.truncated / self.stats.rows > self.max_truncated:
            raise DataError(
                f"{source}: {self.stats.truncated} of {self.stats.rows} examples are longer "
                f"than max_length={self.max_length} tokens and would be cut (more than "
                f"max_truncated={self.max_truncated:.0%}); raise max_length, or raise "
                f"max_truncated to accept the cut")
        return out

    def count_items(self, example: Example) -> int:
        """Number of supervised next-token targets (labels after the first position)."""
        return sum(1 for y in example["labels"][1:] if y != IGNORE)

    def collate(self, examples: Sequence[Example]) -> Batch:
        """Right-pad ``input_ids`` (pad id), ``labels`` (-100) and build ``attention_mask``.

        Packed rows (see :meth:`pack_examples`) also get ``position_ids`` restarting at every
        example and ``segment_ids`` (example number in the row, 0 on padding).
        """
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": pad_to(ids, self.pad_id),
            "attention_mask": pad_to([[1] * len(i) for i in ids], 0),
            "labels": pad_to([e["labels"] for e in examples], IGNORE),
        }
        if any("segments" in e for e in examples):
            from deltatune.tasks.packing import segment_tensors

            batch["segment_ids"], batch["position_ids"] = segment_tensors(
                examples, batch["input_ids"].shape[1])
            # the first token of an example is never a target (in a flattened batch the
            # previous row's last token would otherwise predict it)
            batch["labels"] = batch["labels"].masked_fill(batch["position_ids"] == 0, IGNORE)
        return batch

    def pack_examples(self, examples: Sequence[Example]) -> list[Example]:
        """Pack examples into rows of at most ``max_length`` tokens (``tasks.packing``)."""
        from deltatune.tasks.packing import pack_examples

        return pack_examples(examples, self.max_length)

    def loss_sum(self, model: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over supervised positions (float32), and their count.

        A packed batch (with ``segment_ids``) is run with a block-diagonal causal mask or,
        on flash/flex attention, flattened with restarting position ids
        (:func:`deltatune.tasks.packing.packed_forward_inputs`). On the fast path (CUDA by
        default, :mod:`deltatune.kernels`) the logits are never materialised
        (:func:`deltatune.kernels.head_loss.causal_lm_loss_sum`) where the head allows.
        """
        labels = batch["labels"]
        if "segment_ids" in batch:
            from deltatune.tasks.packing import packed_forward_inputs

            kwargs, flat = packed_forward_inputs(model, batch)
            if flat:
                labels = labels.reshape(1, -1)
        else:
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if fast_path_enabled(labels):
            # the head and the loss chunk by chunk, never the whole (tokens x vocab) logits
            summed = causal_lm_loss_sum(model, labels, lambda: model(**kwargs))
            if summed is not None:
                return summed
        out = model(**kwargs)
        logits = out.logits[:, :-1].float()
        labels = labels[:, 1:].to(logits.device)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())

    @torch.no_grad()
    def token_nll(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                  progress: bool = False, device: torch.device | None = None
                  ) -> tuple[float, int]:
        """Return (total negative log-likelihood, number of supervised tokens) of examples."""
        from tqdm.auto import tqdm

        device = device or _device_of(model)
        total, count = 0.0, 0
        chunks = list(batched(examples, batch_size))
        for chunk in tqdm(chunks, desc="eval loss", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            loss, n = self.loss_sum(model, batch)
            total += float(loss)
            count += n
        return total, count

    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """Return ``loss`` (mean token NLL) and ``perplexity`` of the supervised tokens."""
        total, count = self.token_nll(model, examples, batch_size=batch_size, progress=progress)
        return {"loss": total / max(count, 1), "perplexity": metrics.perplexity(total, count),
                "tokens": float(count)}


class CausalLMSFT(CausalLMBase):
    """Supervised fine-tuning of a causal LM on prompt/response or chat-message rows."""

    name = "causal-lm-sft"

    def __init__(self, tokenizer: Any, *, max_length: int = 512, model: Any | None = None,
                 chat_template: bool | None = None, prompt_column: str = "prompt",
                 response_column: str = "response", messages_column: str = "messages",
                 separator: str = "\n", system_prompt: str | None = None,
                 max_new_tokens: int = 64, generate_examples: int | None = None,
                 max_truncated: float = 0.05, fast_generate: bool = False) -> None:
        """``chat_template``: None = use the tokenizer's template when it has one.

        ``generate_examples``: how many evaluation examples to generate for (ROUGE-L);
        None = all, 0 = none. ``max_new_tokens`` bounds each generation.
        ``fast_generate``: those generations through the static-cache graph decoder
        (:meth:`generate` with ``graphs=True``; the same greedy tokens, CUDA graphs on a
        GPU).
        """
        super().__init__(tokenizer, max_length=max_length, model=model,
                         max_truncated=max_truncated)
        self.fast_generate = bool(fast_generate)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ConfigError("chat_template=True but the tokenizer has no chat template; "
                              "pass chat_template=False for plain prompt + separator + response",
                              field="chat_template")
        self.chat_template = has_template if chat_template is None else bool(chat_template)
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.messages_column = messages_column
        self.separator = separator
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.generate_examples = generate_examples
        self.default_metric = "loss"

    def describe(self) -> dict[str, Any]:
        """Settings written into the run file."""
        return {"task": self.name, "max_length": self.max_length,
                "chat_template": self.chat_template, "separator": self.separator,
                "system_prompt": self.system_prompt, "max_new_tokens": self.max_new_tokens,
                "generate_examples": self.generate_examples}

    # -- rendering --------------------------------------------------------------------
    def _messages(self, row: Row) -> list[dict[str, str]]:
        if self.messages_column in row:
            msgs = row[self.messages_column]
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"column {self.messages_column!r} must be a non-empty list of "
                                f"{{'role', 'content'}} objects")
            for j, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)):
                    raise DataError(f"message {j} must be an object with string 'role' and "
                                    f"'content', got {m!r:.80}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError("the conversation has no 'assistant' message to learn from")
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
        prompt = require(row, self.prompt_column)
        response = require(row, self.response_column)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if self.system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _render(self, msgs: list[dict[str, str]], *, add_generation_prompt: bool = False
                ) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def segments(self, row: Row) -> list[tuple[str, bool]]:
        """Return the row's text as (piece, supervised) segments, in order."""
        if not self.chat_template and self.messages_column not in row:
            prompt = require(row, self.prompt_column)
            response = require(row, self.response_column)
            eos = self.tokenizer.eos_token or ""
            head = (self.system_prompt + self.separator) if self.system_prompt else ""
            return [(head + prompt + self.separator, False), (response + eos, True)]
        msgs = self._messages(row)
        if not self.chat_template:
            eos = self.tokenizer.eos_token or ""
            return [(f"{m['role']}: {m['content']}" + (eos if m["role"] == "assistant" else "")
                     + "\n", m["role"] == "assistant") for m in msgs]
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:i], add_generation_prompt=True) if i else ""
            full = self._render(msgs[:i + 1])
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise DataError("the chat template does not render a conversation's prefixes "
                                "as prefixes of the whole; use chat_template=False")
            out.append((prefix[len(done):], False))
            out.append((full[len(prefix):], True))
            done = full
        rest = self._render(msgs)[len(done):]
        if rest:
            out.append((rest, False))
        return [(text, sup) for text, sup in out if text]

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False) \
                and not self.chat_template:
            return [int(bos)]
        return []

    def encode(self, row: Row) -> Example | None:
        """Tokens, labels (-100 off the supervised segments), prompt length and reference."""
        ids: list[int] = self._bos()
        labels: list[int] = [IGNORE] * len(ids)
        prompt_len = 0
        for text, supervised in self.segments(row):
            toks = self._tokens(text)
            if supervised:
                prompt_len = len(ids)
            ids.extend(toks)
            labels.extend(toks if supervised else [IGNORE] * len(toks))
        if len(ids) > self.max_length:
            self.stats.truncated += 1
            ids, labels = ids[:self.max_length], labels[:self.max_length]
        if not any(y != IGNORE for y in labels[1:]):
            self.stats.notes.append("no response token left within max_length")
            return None
        refs = row.get("references")
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            refs = self._reference(row)
        return {"input_ids": ids, "labels": labels, "prompt_len": prompt_len,
                "references": refs}

    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> Example:
        """The generation prompt for a user message (or a conversation ending with a user
        turn), exactly as training renders it before the response; for :meth:`generate`."""
        if isinstance(prompt, str):
            row: Row = {self.prompt_column: prompt, self.response_column: ""}
        else:
            row = {self.messages_column: [*prompt, {"role": "assistant", "content": ""}]}
        ids: list[int] = self._bos()
        for text, supervised in self.segments(row):
            if supervised:
                break
            ids.extend(self._tokens(text))
        return {"input_ids": ids, "labels": [IGNORE] * len(ids), "prompt_len": len(ids),
                "references": [""]}

    def _reference(self, row: Row) -> list[str]:
        if self.messages_column in row:
            last = [m["content"] for m in row[self.messages_column] if m["role"] == "assistant"]
            return last[-1:]
        return [row[self.response_column]]

    # -- generation and evaluation ------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 max_new_tokens: int | None = None, progress: bool = False,
                 delta_names: Sequence[str | None] | None = None,
                 sampling: Sampling | None = None, graphs: bool = False) -> list[str]:
        """Continuations of each example's prompt (left-padded batches); return texts.

        Greedy, or drawn under ``sampling`` (temperature, top-k, top-p). ``delta_names``
        (one per example, a :class:`~deltatune.DeltaModel`'s delta or None for the base
        model) runs each row through its own delta, in mixed batches. ``graphs`` decodes
        with a static cache through :func:`~deltatune.kernels.graph_generate.graph_generate`
        (each step a CUDA graph on a GPU) instead of the model's ``generate``.
        """
        from tqdm.auto import tqdm

        device = _device_of(model)
        eos = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None \
            else set()
        gen_cfg = getattr(model, "generation_config", None)
        extra = getattr(gen_cfg, "eos_token_id", None)
        eos |= set(extra if isinstance(extra, list) else [] if extra is None else [extra])
        outs: list[str] = []
        if delta_names is not None and len(delta_names) != len(examples):
            raise ValueError(f"delta_names has {len(delta_names)} entries for "
                             f"{len(examples)} examples")
        if graphs:
            from deltatune.kernels.graph_generate import graph_generate

            bar = tqdm(total=-(-len(examples) // batch_size), desc="generate",
                       disable=not progress, leave=False)
            new = graph_generate(model, [e["input_ids"][:e["prompt_len"]] for e in examples],
                                 batch_size=batch_size,
                                 max_new_tokens=max_new_tokens or self.max_new_tokens,
                                 pad_id=self.pad_id, eos_ids=sorted(eos),
                                 delta_names=delta_names, sampling=sampling,
                                 on_chunk=bar.update)
            bar.close()
            return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
        draw = {} if sampling is None else dict(
            do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p)
        chunks = list(batched(range(len(examples)), batch_size))
        for chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
            prompts = [examples[i]["input_ids"][:examples[i]["prompt_len"]] for i in chunk]
            ids = pad_to(prompts, self.pad_id, left=True).to(device)
            mask = pad_to([[1] * len(p) for p in prompts], 0, left=True).to(device)
            routing = {} if delta_names is None else {
                "delta_names": [delta_names[i] for i in chunk]}
            gen = model.generate(input_ids=ids, attention_mask=mask,
                                 max_new_tokens=max_new_tokens or self.max_new_tokens,
                                 pad_token_id=self.pad_id, eos_token_id=sorted(eos) or None,
                                 **({"do_sample": False} | draw | routing))
            for row in gen[:, ids.shape[1]:]:
                outs.append(self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
        return outs

    def evaluate(self, model: Any, examples: Sequence[Example], *, batch_size: int = 8,
                 progress: bool = False) -> dict[str, float]:
        """``loss``/``perplexity`` of response tokens, plus ``rouge_l`` of greedy generations."""
        result = super().evaluate(model, examples, batch_size=batch_size, progress=progress)
        n = len(examples) if self.generate_examples is None else self.generate_examples
        if n > 0:
            subset = list(examples[:n])
            preds = self.generate(model, subset, batch_size=batch_size, progress=progress,
                                  graphs=self.fast_generate)
            result["rouge_l"] = metrics.rouge_l(preds, [e["references"] for e in subset])
        return result


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
