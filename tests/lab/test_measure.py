"""The measurement layer against numbers computed another way."""

from __future__ import annotations

import time

import torch

from deltatune import DeltaModel, LoraConfig
from deltatune.lab import measure
from tests.conftest import tiny_bert


def test_parameter_counts_equal_lora_hand_formula():
    dm = DeltaModel(tiny_bert(num_labels=2))
    dm.add("x", LoraConfig(r=4, modules_to_save=["classifier"]))
    counts = measure.parameter_counts(dm)
    # LoRA on query and value of 2 layers, hidden 32: r * (32 + 32) each;
    # the classifier copy (32 x 2 + 2) is trained too.
    hand = 2 * 2 * 4 * (32 + 32) + (32 * 2 + 2)
    assert counts["delta_parameters"] == hand
    assert counts["trainable_parameters"] == hand
    base = sum(p.numel() for p in tiny_bert(num_labels=2).parameters())
    assert counts["base_parameters"] == base
    assert abs(counts["trainable_percent"] - 100.0 * hand / base) < 1e-12
    assert abs(counts["optimizer_state_mb"] - hand * 3 * 4 / 2**20) < 1e-12


def test_directory_size_is_the_sum_of_file_sizes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 234)
    assert measure.directory_size(tmp_path) == 1234


def test_cpu_peak_memory_sees_a_large_temporary_allocation():
    with measure.track_peak_memory("cpu", interval_s=0.001) as mem:
        big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched so it is resident
        big += 1
        time.sleep(0.05)
        del big
    assert mem.kind == "cpu_rss_peak"
    assert 200 < mem.peak_mb < 400


def test_median_latency_of_a_known_sleep():
    ms = measure.median_latency_ms(lambda: time.sleep(0.02), repeats=3, warmup=0)
    assert 19.0 <= ms < 60.0


def test_latencies_merged_copy_leaves_model_untouched():
    dm = DeltaModel(tiny_bert(num_labels=2))
    dm.add("x", LoraConfig(r=4))
    ids = torch.randint(3, 100, (2, 6))
    before = dm(input_ids=ids).logits
    out = measure.inference_latencies(dm, lambda m: m(input_ids=ids), mergeable=True,
                                      repeats=1)
    assert out["latency_merged_ms"] is not None and out["latency_base_ms"] is not None
    assert dm.active == ["x"] and not dm.get_delta("x").merged
    assert torch.equal(dm(input_ids=ids).logits, before)
