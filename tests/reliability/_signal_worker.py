"""Row 4 worker: train, and send this process SIGINT/SIGTERM at a chosen point.

``python _signal_worker.py OUT WHERE SIGNAL COUNT``: WHERE is forward, backward,
optimizer or save; COUNT 1 sends one signal, 2 sends a second one right after the
first (which must stop the process at once). Prints a JSON line and exits with the
trainer's exit code (130/143) after a clean interruption.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deltatune.core import io
from deltatune.train import Trainer, TrainingInterrupted
from tests.reliability._train_setup import ROWS, setup


def main() -> int:
    out, where, sig_name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sig = getattr(signal, sig_name)
    dm, task, cfg = setup(out)
    trainer = Trainer(dm, task, ROWS, None, cfg)
    fired = {"n": 0, "calls": 0}

    def fire(*_args, **_kwargs):
        # During optimizer step 3 (after two complete steps and their checkpoints).
        fired["calls"] += 1
        if trainer.step == 2 and fired["n"] == 0:
            fired["n"] = 1
            for _ in range(count):
                os.kill(os.getpid(), sig)

    layer = dm.model.model.layers[0]
    if where == "forward":
        layer.register_forward_hook(lambda *a: fire())
    elif where == "backward":
        for p in dm.trainable_parameters():
            p.register_hook(lambda g: (fire(), g)[1])
    elif where == "optimizer":
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        inner.register_step_pre_hook(lambda *a: fire())
    elif where == "save":
        io.FAULT_HOOK = lambda stage: fire() if stage.startswith("written:trainable") else None
    try:
        trainer.fit()
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        print(json.dumps({"checkpoint": str(exc.checkpoint), "exit_code": exc.exit_code,
                          "immediate": exc.immediate, "step": trainer.step,
                          "micro": trainer.micro}))
        return exc.exit_code
    print(json.dumps({"checkpoint": None, "completed": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
