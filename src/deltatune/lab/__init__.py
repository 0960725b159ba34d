"""The lab: train several methods on one task and measure the trade-offs the papers report.

    from deltatune.lab import compare
    res = compare("sentiment", "full,bitfit,lora", seeds=[0, 1], out="runs/cmp")
    print(res.table)      # trainable params, memory, speed, latency, size, metric ± std

``deltatune compare`` and ``deltatune sweep`` are the command-line faces of
:func:`compare` and :func:`deltatune.lab.sweeps.run_sweep`. See docs/lab.md.
"""

from deltatune.lab.methods import LAB_METHODS, RunSpec, parse_methods
from deltatune.lab.runner import CompareResult, compare
from deltatune.lab.tasks import LabTask, TaskSize, get_task, list_tasks, register_task

__all__ = ["LAB_METHODS", "CompareResult", "LabTask", "RunSpec", "TaskSize", "compare",
           "get_task", "list_tasks", "parse_methods", "register_task"]
