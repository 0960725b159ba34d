"""Hugging Face ``Trainer`` with deltatune: step callbacks, and a loss without the logits.

    dm = dt.attach(model, dt.AdaLoraConfig(...))
    trainer = Trainer(model=dm, args=args, train_dataset=ds,
                      callbacks=[DeltaTuneTrainerCallback(dm)])
    # or, the same plus the causal-LM loss through the fused head + cross-entropy:
    trainer = DeltaTuneTrainer(model=dm, args=args, train_dataset=ds)

``Trainer`` calls ``on_optimizer_step`` after ``optimizer.step()`` and before the
gradients are zeroed, which is where :class:`~deltatune.core.callbacks.StepCallback`
expects it (AdaLoRA reads the gradients there). Regularisers (``extra_loss``) need no
bridge: ``DeltaModel.forward`` adds them to the loss in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from deltatune.core.errors import DeltaStateError


class DeltaTuneTrainerCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs ``DeltaModel.training_callbacks()``."""

    def __init__(self, delta_model: Any | None = None) -> None:
        self.delta_model = delta_model
        self.callbacks: list[Any] = []

    def _model(self, kwargs: dict[str, Any]) -> Any:
        from deltatune.core.model import DeltaModel

        model = self.delta_model if self.delta_model is not None else kwargs.get("model")
        # Unwrap what accelerate/DDP may have put around the DeltaModel.
        while model is not None and not isinstance(model, DeltaModel):
            model = getattr(model, "module", None)
        if model is None:
            raise DeltaStateError("DeltaTuneTrainerCallback found no DeltaModel; pass it: "
                                  "DeltaTuneTrainerCallback(delta_model)")
        return model

    def on_train_begin(self, args, state, control, **kwargs):
        """Collect the active deltas' callbacks and tell them the planned step count."""
        model = self._model(kwargs)
        self.delta_model = model
        self.callbacks = model.training_callbacks()
        for cb in self.callbacks:
            cb.on_train_begin(model, int(state.max_steps))
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Run every step callback; ``Trainer`` increments global_step after this event."""
        for cb in self.callbacks:
            cb.on_optimizer_step(self.delta_model, int(state.global_step) + 1)
        return control


class DeltaTuneTrainer(Trainer):
    """``transformers.Trainer`` that adds :class:`DeltaTuneTrainerCallback` and computes a
    causal LM's loss without forming the logits on the fast path (CUDA by default).

    The loss is :func:`deltatune.kernels.head_loss.causal_lm_loss_sum` over the batch's
    ``labels`` (shifted inside, ``-100`` ignored), normalised as ``Trainer`` normalises the
    model's own loss: by ``num_items_in_batch`` (the tokens of the whole accumulated
    batch) where ``Trainer`` passes it to the model, else by this batch's tokens. Label
    smoothing, a ``compute_loss_func``, ``return_outputs`` (evaluation with predictions)
    and heads the fused path does not take keep ``Trainer``'s own computation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, DeltaTuneTrainerCallback)
                   for cb in self.callback_handler.callbacks):
            self.add_callback(DeltaTuneTrainerCallback())

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Return the batch's loss (see the class); ``Trainer.compute_loss`` where the fused
        path does not apply."""
        from deltatune.kernels import fast_path_enabled
        from deltatune.kernels.head_loss import causal_lm_loss_sum, with_regularisers

        labels = inputs.get("labels")
        if (return_outputs or not isinstance(labels, torch.Tensor)
                or self.label_smoother is not None or self.compute_loss_func is not None
                or not fast_path_enabled(labels)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        summed = causal_lm_loss_sum(model, labels, lambda: model(**rest))
        if summed is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        total, count = summed
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # as Trainer.compute_loss: the global count is divided back per process
                per_process = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (per_process if self.args.n_gpu <= 1 else self.args.n_gpu)
        else:
            loss = total / max(count, 1)
        return with_regularisers(self.accelerator.unwrap_model(model), loss)

