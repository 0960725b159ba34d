"""Decoding with a static KV cache, each step replayed from one captured CUDA graph.

Decoding one token with a 1B model is ~100 small kernels whose launch and Python dispatch
cost more than their arithmetic (docs/performance.md); LoRA adds a few per layer. Replaying
a captured graph removes that overhead for the base model, the merged model and unmerged
(or mixed-batch) deltas alike, so they are compared like with like.

Switching adapters does not recapture: the graph reads the delta tensors where they live,
so copying another adapter's weights into them (``DeltaModel.load_delta_state_dict``, an
in-place ``copy_`` of same-shaped tensors) changes what the next replay computes. Mixed
batches read the adapters through cached side-by-side layouts
(:class:`~deltatune.kernels.multi_lora.AdapterBank`); :meth:`GraphDecoder.generate`
rewrites those in place first when the adapters changed. Changing the *set or shape* of
tensors (another rank, attaching a delta, merging) needs a new :class:`GraphDecoder`.
Row routing given in ``forward_kwargs`` (``delta_names``) is fixed at capture time. A
decoder built with ``adapters=[...]`` instead lays every layer's adapters out over that
fixed set (:func:`~deltatune.core.layers.row_pool`) and takes ``delta_names`` per
:meth:`GraphDecoder.generate` call: another assignment rewrites the rows' index tensors
in place (:meth:`~deltatune.kernels.multi_lora.AdapterBank.reroute`), so the same graphs
serve any mix of those adapters, as a server batching requests for different adapters
needs.

The prompt's forward pass (prefill) is captured too, one graph per prompt length
(``graph_prefill``): run eagerly it costs as much Python dispatch as a decode step and,
for an unmerged adapter, two more launches per adapted linear, which showed in the time
per token of short generations (docs/performance.md).

Prompts of different lengths come left-padded with their ``attention_mask``, as for
Hugging Face ``generate``: the decoder then passes a 4D additive mask (padding and causal
order, built on the device from static buffers, so the graphs replay it) and per-row
positions. That needs an attention implementation that takes such a mask (``sdpa``,
the default, or ``eager``). Padded and unpadded calls use separate graphs.

Without CUDA (or with ``use_graph=False``) the same static-cache steps run eagerly: the
CPU tests check them against Hugging Face ``generate``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from deltatune.core.errors import ConfigError
from deltatune.core.layers import row_pool
from deltatune.kernels import multi_lora, triton_lora
from deltatune.kernels.sampling import Sampling, pick


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` in recent transformers
    (``past_key_values`` is deprecated there, to be removed in 5.40), else the old name."""
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is not None and "cache" in inspect.signature(hf.forward).parameters:
        return "cache"
    return "past_key_values"


class GraphDecoder:
    """Decoding of ``batch`` rows up to ``max_len`` tokens, one CUDA graph per step.

    ``forward_kwargs`` go to every forward call (e.g. ``delta_names`` for a mixed batch).
    ``sampling`` (:class:`~deltatune.kernels.sampling.Sampling`: temperature, top-k,
    top-p) draws each token inside the graphs instead of taking the argmax.
    ``graph_prefill`` (default True) replays the prompt's forward pass from a graph as
    well, one per prompt length seen. With ``eos_token_id`` (one id or several) a row that
    produced one gets ``pad_token_id`` afterwards and decoding stops once every row has
    finished (checked every :attr:`CHECK_EVERY` steps, to keep host synchronisations
    rare), as Hugging Face ``generate`` does. :attr:`captures` counts graph captures: one
    for the decode step plus one per prompt length, however many sequences are decoded
    and however many times the adapter weights are swapped in place.
    """

    CHECK_EVERY = 8

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, *,
                 use_graph: bool | None = None, graph_prefill: bool = True,
                 forward_kwargs: dict[str, Any] | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int = 0, adapters: Sequence[str] | None = None,
                 sampling: Sampling | None = None) -> None:
        from transformers import StaticCache

        self.model = model
        self.batch, self.max_len = batch, max_len
        param = next(model.parameters())
        self.device = param.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ConfigError("CUDA graphs need the model on a CUDA device", field="use_graph")
        self.kwargs = dict(forward_kwargs or {})
        self.sampling = sampling  # None: greedy
        # adapters=[...]: rows are routed per generate() call over this fixed set
        self.pool = tuple(adapters) if adapters is not None else None
        if self.pool is not None:
            if "delta_names" in self.kwargs:
                raise ConfigError("with adapters=[...] pass delta_names to generate(), not in "
                                  "forward_kwargs", field="forward_kwargs")
            if not callable(getattr(model, "get_delta", None)):
                raise ConfigError("adapters=[...] needs a DeltaModel (its deltas are routed "
                                  "per row)", field="adapters")
            for name in self.pool:
                model.get_delta(name)  # an unknown name fails here, with the known ones
        self._cache_arg = _cache_argument(model)
        config = getattr(model, "config", None) or model.model.config
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.next = torch.zeros(batch, dtype=torch.long, device=self.device)
        # one EOS id or several (Llama 3 ends turns with either of two), as HF generate
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos = torch.tensor(ids, dtype=torch.long, device=self.device) if ids else None
        self.pad = pad_token_id
        self.finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        # left padding (generate's attention_mask): the slots each row may attend to and
        # its number of pad tokens; the graphs read these buffers, rewritten per call
        self.keep = torch.ones(batch, max_len, dtype=torch.bool, device=self.device)
        self.pads = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.slots = torch.arange(max_len, device=self.device)
        self.mask_dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.padded = False  # this call's prompts are left-padded
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # padded -> decode-step graph
        self.graph_prefill = graph_prefill
        # (prompt length, padded) -> (graph, prompt buffer, first-token buffer, positions);
        # the graph reads these tensors where they are, so they must live as long as it does
        self._prefills: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                                     torch.Tensor, torch.Tensor]] = {}
        self.captures = 0
        self._banks: list | None = None  # the model's mixed-batch layout caches
        self._warmed: set[bool] = set()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The decode-step graph of the current call's kind (padded or not), once captured."""
        return self._graphs.get(self.padded)

    def _padding_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Return the additive (batch, 1, queries, max_len) mask for query slots
        ``positions``: each sees the slots up to itself outside its row's left padding.

        A pad query sees itself too (a row with nothing to attend to would give NaN); its
        output is never used, and no real token attends to it.
        """
        see = (self.slots[None, :] <= positions[:, None])[None] & self.keep[:, None, :]
        see = see | (self.slots[None, :] == positions[:, None])[None]
        mask = torch.zeros(see.shape, dtype=self.mask_dtype, device=self.device)
        return mask.masked_fill_(~see, torch.finfo(self.mask_dtype).min)[:, None]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if self.padded:
            # positions count real tokens only, as generate's cumsum of the mask does
            position_ids = (positions[None, :] - self.pads).clamp_min(0)
            extra["attention_mask"] = self._padding_mask(positions)
        else:
            position_ids = positions.view(1, -1).expand(ids.shape[0], -1)
        extra[self._cache_arg] = self.cache
        pooled = row_pool(self.pool) if self.pool is not None else contextlib.nullcontext()
        with pooled:
            out = self.model(input_ids=ids, cache_position=positions,
                             position_ids=position_ids, use_cache=True, logits_to_keep=1,
                             **extra, **self.kwargs)
        return out.logits[:, -1]

    def _is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        # a broadcast comparison: no data-dependent sizes, so it can be captured in a graph
        return (tokens[..., None] == self.eos).any(-1)

    def _finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` with finished rows padded; marks rows that just produced EOS."""
        if self.eos is None:
            return tokens
        tokens = torch.where(self.finished, self.pad, tokens)
        self.finished |= self._is_eos(tokens)
        return tokens

    def _step(self) -> None:
        # argmax on the device into a fixed buffer: nothing leaves the graph
        self.next.copy_(self._finish(pick(self._forward(self.ids, self.pos), self.sampling)))

    def _counters(self) -> list[torch.Tensor]:
        # recent transformers keep each static layer's fill level in a device tensor that
        # every update advances (it, not ``cache_position``, says where K/V are written)
        return [c for layer in getattr(self.cache, "layers", [])
                if isinstance(c := getattr(layer, "cumulative_length", None), torch.Tensor)]

    def restore_point(self):
        """Return a function that puts the cache's fill counters and the finished-row
        flags back to their values now (a step repeated after it decodes the same
        position again: the warm-up here, the bench's timing of one step)."""
        state = [*self._counters(), self.finished]
        saved = [t.clone() for t in state]

        def restore() -> None:
            for t, v in zip(state, saved):
                t.copy_(v)
        return restore

    def _warm_up(self, step=None) -> None:
        """Run ``step`` (default: one decode step) twice and undo its effect on the cache.

        Before a capture this settles allocator pools, library handles and Triton's
        compilation (on a side stream); it runs in eager mode too (once per decoder), so
        the CPU tests exercise it. The steps write K/V at positions the next real step
        rewrites; the fill counters they advanced are put back in place (the graphs read
        these tensors).
        """
        restore = self.restore_point()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for _ in range(2):
                (step or self._step)()
                restore()
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)
        if step is None:
            self._warmed.add(self.padded)

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the first new token of every row (batch,), the prompt's K/V cached.

        On the graph path the prompt's forward pass is replayed from a graph captured for
        this prompt length (warmed up and captured on first sight of the length).
        """
        length = input_ids.shape[1]
        if not (self.use_graph and self.graph_prefill):
            prompt = torch.arange(length, device=self.device)
            return pick(self._forward(input_ids.to(self.device), prompt), self.sampling)
        entry = self._prefills.get((length, self.padded))
        if entry is None:
            prompt = torch.arange(length, device=self.device)
            ids = input_ids.to(self.device).clone()
            first = torch.zeros(self.batch, dtype=torch.long, device=self.device)

            def run(ids=ids, prompt=prompt, first=first) -> None:
                first.copy_(pick(self._forward(ids, prompt), self.sampling))

            self._warm_up(run)
            self.cache.reset()
            graph = torch.cuda.CUDAGraph()
            with multi_lora.graph_owner(self), torch.cuda.graph(graph):
                run()
            self.captures += 1
            entry = self._prefills[length, self.padded] = (graph, ids, first, prompt)
        graph, ids, first, _ = entry
        ids.copy_(input_ids)
        graph.replay()
        return first.clone()

    def _capture(self) -> None:
        graph = self._graphs[self.padded] = torch.cuda.CUDAGraph()
        # the layouts of mixed batches this graph reads stay while the decoder lives
        with multi_lora.graph_owner(self), torch.cuda.graph(graph):
            self._step()
        self.captures += 1

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int,
                 attention_mask: torch.Tensor | None = None,
                 delta_names: Sequence[str | None] | None = None) -> torch.Tensor:
        """Return the ``new_tokens`` tokens after ``input_ids`` (batch, new_tokens): greedy,
        or drawn under the decoder's ``sampling``.

        Prompts of different lengths are left-padded, with ``attention_mask`` (1 for real
        tokens, 0 for the padding on the left, as a tokenizer with ``padding_side="left"``
        gives); without one every token is real. With an ``eos_token_id`` the result is
        shorter when every row finished earlier: it ends at the step where the last row
        produced EOS (rows that finished before are padded). The first call captures the
        graphs. Adapted linears take the fused Triton kernels here (on CUDA, with triton),
        in the eager warm-up that compiles them and in the captured steps alike.
        ``delta_names`` (a decoder built with ``adapters=[...]``): each row's adapter among
        them, or None for the base model; another assignment next call reuses the graphs.
        """
        self._route(delta_names)
        with triton_lora.for_graphs():
            return self._generate(input_ids, new_tokens, attention_mask)

    def _route(self, delta_names: Sequence[str | None] | None) -> None:
        """Check this call's row assignment and set it (pooled decoders only)."""
        if self.pool is None:
            if delta_names is not None:
                raise ConfigError("this decoder's rows are fixed when it is built "
                                  "(forward_kwargs); build it with adapters=[...] to choose "
                                  "each row's adapter per generate() call",
                                  field="delta_names")
            return
        names = list(delta_names) if delta_names is not None else [None] * self.batch
        if len(names) != self.batch:
            raise ConfigError(f"delta_names has {len(names)} entries for a batch of "
                              f"{self.batch}", field="delta_names")
        unknown = sorted({n for n in names if n is not None and n not in self.pool})
        if unknown:
            raise ConfigError(f"delta_names uses {', '.join(map(repr, unknown))}, not among "
                              f"this decoder's adapters ({', '.join(self.pool)}); build a "
                              f"decoder with them", field="delta_names")
        self.kwargs["delta_names"] = names

    def _set_padding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                     ) -> None:
        """Check a left-padding ``attention_mask`` and load it into the static buffers."""
        self.padded = False
        if attention_mask is None:
            return
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, the "
                              f"prompt {tuple(input_ids.shape)}: they must match",
                              field="attention_mask")
        mask = attention_mask.to("cpu", torch.bool)
        real = mask.sum(1)
        # left padding: every row's real tokens are its last ones
        tail = torch.arange(mask.shape[1]) >= (mask.shape[1] - real)[:, None]
        if not torch.equal(mask, tail) or bool((real == 0).any()):
            raise ConfigError("attention_mask must pad on the left and leave every row at "
                              "least one token (0s, then 1s); tokenize with "
                              "padding_side='left'", field="attention_mask")
        if bool(mask.all()):
            return  # nothing padded: the plain graphs
        self.padded = True
        self.keep.fill_(True)
        self.keep[:, :mask.shape[1]].copy_(mask)
        self.pads.copy_((mask.shape[1] - real).view(-1, 1))

    def _generate(self, input_ids: torch.Tensor, new_tokens: int,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
        rows, length = input_ids.shape
        if rows != self.batch or length + new_tokens > self.max_len:
            raise ConfigError(f"prompt of shape {tuple(input_ids.shape)} + {new_tokens} new "
                              f"tokens does not fit this decoder (batch {self.batch}, "
                              f"max_len {self.max_len}): build one with those sizes",
                              field="input_ids")
        self._set_padding(input_ids, attention_mask)
        self.cache.reset()
        self.finished.zero_()
        # mixed batches: adapters switched in place since the last call reach the graphs.
        # Once the step graph exists every layer has its cache: keep the list.
        banks = self._banks
        if banks is None:
            banks = multi_lora.banks_of(self.model)
            if self.graph is not None:
                self._banks = banks
        if self.pool is not None:  # graphs read the rows' index tensors: rewrite them
            for bank in banks:
                bank.reroute(self.kwargs["delta_names"])
        # Adapters changed in place since the last call must reach the graphs, but checking
        # costs ~2 ms of Python for 112 layers of 32 adapters, with the GPU idle. So the
        # prompt runs first and the check overlaps it; when something changed, the layouts
        # are rewritten behind that run (stream order) and the prompt runs again on them.
        first = self._prefill(input_ids)
        if multi_lora.refresh_layouts(banks, owner=self):
            self.cache.reset()
            first = self._prefill(input_ids)
        first = self._finish(first)
        out = [first]
        self.ids.copy_(first.view(-1, 1))
        for i in range(new_tokens - 1):
            if self.eos is not None and i % self.CHECK_EVERY == 0 and bool(
                    self.finished.all()):
                break
            self.pos.fill_(length + i)
            if self.padded not in self._warmed:
                self._warm_up()
            if self.use_graph:
                if self.graph is None:
                    self._capture()
                self.graph.replay()
            else:
                self._step()
            out.append(self.next.clone())
            self.ids.copy_(self.next.view(-1, 1))
        tokens = torch.stack(out, 1)
        if self.eos is not None and bool(self.finished.all()):
            # up to the step where the last row finished (later steps are all padding)
            end = int(self._is_eos(tokens).int().argmax(1).max()) + 1
            tokens = tokens[:, :end]
        return tokens


__all__ = ["GraphDecoder"]
