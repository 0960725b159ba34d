"""Drive deltatune's step callbacks (AdaLoRA's budget schedule...) from Hugging Face ``Trainer``.

    dm = dt.attach(model, dt.AdaLoraConfig(...))
    trainer = Trainer(model=dm, args=args, train_dataset=ds,
                      callbacks=[DeltaTuneTrainerCallback(dm)])

``Trainer`` calls ``on_optimizer_step`` after ``optimizer.step()`` and before the
gradients are zeroed, which is where :class:`~deltatune.core.callbacks.StepCallback`
expects it (AdaLoRA reads the gradients there). Regularisers (``extra_loss``) need no
bridge: ``DeltaModel.forward`` adds them to the loss in training mode.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

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
