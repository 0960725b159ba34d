"""bench/gpu_lora.py --check on the CPU: every fast path against float64 and the plain path.

On the GPU the same checks gate the bench's timings (docs/performance.md); here they run
the paths the CPU has (the Triton-only ones skip themselves), so the script cannot rot.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_correctness_checks_pass_on_the_cpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("gpu_lora", None)
    import gpu_lora

    monkeypatch.setattr(gpu_lora, "RESULTS", {"rows": []})
    gpu_lora.check()
    rows = [r for r in gpu_lora.RESULTS["rows"] if r["section"] == "check"]
    assert gpu_lora.RESULTS["check_failures"] == []
    names = {r["name"] for r in rows}
    assert {"folded lora_linear float32 out vs float64", "model fp32 loss fused vs HF",
            "model fp32 logits fast vs peft"} <= names
    assert all(r["value"] < r["limit"] for r in rows)
