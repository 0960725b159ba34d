"""Training-loop hooks that a method needs (AdaLoRA's budget schedule, for example).

A method returns :class:`StepCallback` objects from ``DeltaMethod.training_callbacks``;
deltatune's trainer and the Hugging Face ``Trainer`` bridge call them. Regularisers do
not need a callback: ``DeltaMethod.extra_loss`` is added to the model's loss by
``DeltaModel.forward`` in training mode, so it works under any training loop.
"""

from __future__ import annotations

from typing import Any


class StepCallback:
    """Hooks called by the training loop; every hook is optional."""

    def on_train_begin(self, model: Any, total_steps: int) -> None:
        """Called once before the first step with the planned number of optimizer steps."""

    def on_optimizer_step(self, model: Any, step: int) -> None:
        """Called after ``optimizer.step()`` and before gradients are zeroed (1-based step)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the callback's resumable state (tensors and JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
