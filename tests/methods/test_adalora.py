"""AdaLoRA: SVD-form update, orthogonality loss, importance EMAs, cubic budget, masking,
our loop and HF Trainer, info/heatmap, save/load and peft parity."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError, DeltaStateError, HyperparameterError
from deltatune.methods.adalora import AdaLoraCallback, budget_at
from deltatune.plotting.rank_heatmap import format_rank_table, plot_rank_heatmap, rank_grid
from tests.conftest import FACTORIES, model_inputs, randomize_deltas, tiny_llama, tiny_t5
from tests.helpers import logits


def test_identity_at_init(arch):
    inputs = model_inputs(arch)
    expected = logits(FACTORIES[arch](), inputs)
    dm = dt.attach(FACTORIES[arch](), dt.AdaLoraConfig(init_r=4, target_r=2))
    assert torch.equal(logits(dm, inputs), expected)
    d = dm.get_delta("default").parameters()
    assert sum(p.numel() for p in d) > 0


def test_formula_by_hand_and_merge():
    dm = dt.attach(tiny_llama(), dt.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8.0,
                                                  target_modules=["q_proj"], layers=[0]))
    randomize_deltas(dm, std=0.3)
    layer = dm.model.model.layers[0].self_attn.q_proj
    d = layer.deltas["default"]
    P, lam, Q = d.lora_P.double(), d.lora_Lambda.double(), d.lora_Q.double()
    delta = 2.0 * P @ torch.diag(lam) @ Q        # s = alpha / init_r = 8 / 4
    w0 = layer.base.weight.double().clone()
    x = torch.randn(3, 32, dtype=torch.float64)
    assert torch.allclose(layer(x.float()).double(), x @ (w0 + delta).T, atol=1e-5)
    dm.merge()
    assert torch.allclose(layer.base.weight.double(), w0 + delta, atol=1e-5)
    dm.unmerge()
    assert torch.equal(layer.base.weight.double(), w0)


def test_default_targets_and_parameter_count():
    dm = dt.attach(tiny_llama(), dt.AdaLoraConfig(init_r=4, target_r=2))
    layers = [m for m in dm.model.modules() if hasattr(m, "deltas")]
    assert len(layers) == 2 * 7  # q k v o gate up down
    expected = sum(4 * (m.base.in_features + m.base.out_features + 1) for m in layers)
    assert dm.parameter_report()[0].parameters == expected


def test_orthogonality_regulariser_by_hand():
    cfg = dt.AdaLoraConfig(init_r=3, target_r=2, orth_reg_weight=0.25,
                           target_modules=["q_proj", "v_proj"])
    dm = dt.attach(tiny_llama(), cfg)
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs("llama")
    dm.eval()
    with torch.no_grad():
        plain = dm(**inputs, labels=inputs["input_ids"]).loss
    reg = torch.zeros((), dtype=torch.float64)
    for m in dm.model.modules():
        if hasattr(m, "deltas"):
            P, Q = m.deltas["default"].lora_P.double(), m.deltas["default"].lora_Q.double()
            reg += torch.linalg.matrix_norm(P.T @ P - torch.eye(3)) ** 2
            reg += torch.linalg.matrix_norm(Q @ Q.T - torch.eye(3)) ** 2
    dm.train()
    with torch.no_grad():
        total = dm(**inputs, labels=inputs["input_ids"]).loss
    assert total.item() == pytest.approx(plain.item() + 0.25 * reg.item(), rel=1e-5)


def test_cubic_budget_schedule_by_hand():
    kw = dict(init_budget=120, target_budget=80, total=100, tinit=10, tfinal=20, deltaT=5)
    assert budget_at(1, **kw) == (120, False)
    assert budget_at(10, **kw) == (120, False)
    # t = 45: 80 + 40 * (1 - 35/70)^3 = 85
    assert budget_at(45, **kw) == (85, True)
    assert budget_at(46, **kw)[1] is False
    assert budget_at(80, **kw) == (80, True)
    assert budget_at(81, **kw) == (80, True)
    assert budget_at(11, **kw)[0] == int(80 + 40 * (1 - 1 / 70) ** 3)


def _one_backward(dm, seed=0):
    inputs = model_inputs("llama", seed=seed + 1)
    dm.train()
    dm(**inputs, labels=inputs["input_ids"]).loss.backward()


def test_importance_emas_and_scores_by_hand():
    cfg = dt.AdaLoraConfig(init_r=3, target_r=1, beta1=0.6, beta2=0.7, orth_reg_weight=0.0,
                           target_modules=["q_proj"], layers=[0], total_step=10)
    dm = dt.attach(tiny_llama(), cfg)
    randomize_deltas(dm, std=0.3)
    (cb,) = dm.training_callbacks()
    assert dm.training_callbacks()[0] is cb   # one callback for the delta's life
    d = dm.model.model.layers[0].self_attn.q_proj.deltas["default"]
    hist = {}
    for step in range(2):
        _one_backward(dm, seed=step)
        for name in ("lora_P", "lora_Lambda", "lora_Q"):
            p = getattr(d, name)
            sens = (p * p.grad).abs().double()
            ipt, unc = hist.get(name, (torch.zeros_like(sens), torch.zeros_like(sens)))
            ipt = 0.6 * ipt + 0.4 * sens
            unc = 0.7 * unc + 0.3 * (sens - ipt).abs()
            hist[name] = (ipt, unc)
        cb.update_importance()
        dm.zero_grad()
    loc = "model.layers.0.self_attn.q_proj"
    for name in hist:
        assert torch.allclose(cb.ipt[f"{loc}.{name}"].double(), hist[name][0], rtol=1e-5)
        assert torch.allclose(cb.unc[f"{loc}.{name}"].double(), hist[name][1], rtol=1e-5)
    s = {n: hist[n][0] * hist[n][1] for n in hist}
    expected = s["lora_Lambda"] + s["lora_P"].mean(0) + s["lora_Q"].mean(1)
    assert torch.allclose(cb.scores()[loc].double(), expected, rtol=1e-5)


def test_masking_keeps_the_top_budget_triplets():
    cfg = dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"],
                           layers=[0], total_step=10)
    dm = dt.attach(tiny_llama(), cfg)
    randomize_deltas(dm, std=0.3)
    cb = dm.training_callbacks()[0]
    _one_backward(dm)
    cb.update_importance()
    scores = cb.scores()
    flat = torch.cat(list(scores.values()))
    keep = set(torch.topk(flat, 3).indices.tolist())
    cb.mask_to_budget(3)
    lams = torch.cat([cb.deltas[loc].lora_Lambda.detach() for loc in scores])
    assert {i for i in range(8) if lams[i] != 0} == keep
    assert sum(cb.ranks().values()) == 3


def _train_ours(dm, steps, lr=0.02):
    inputs = model_inputs("llama", batch=4)
    opt = torch.optim.Adam(dm.trainable_parameters(), lr=lr)
    callbacks = dm.training_callbacks()
    for cb in callbacks:
        cb.on_train_begin(dm, steps)
    dm.train()
    losses = []
    for step in range(1, steps + 1):
        loss = dm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        for cb in callbacks:
            cb.on_optimizer_step(dm, step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_prunes_to_the_target_budget_and_lowers_loss(tmp_path, capsys):
    cfg = dt.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1,
                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    dm = dt.attach(tiny_llama(), cfg)
    base_before = {k: v.clone() for k, v in dm.model.state_dict().items() if "lora_" not in k}
    assert all(".lora_" in n for n, p in dm.named_parameters() if p.requires_grad)
    losses = _train_ours(dm, 9)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, base_before[k]) for k, v in dm.model.state_dict().items()
               if "lora_" not in k)
    cb = dm.training_callbacks()[0]
    n = len(cb.deltas)
    assert sum(cb.ranks().values()) == 2 * n
    assert cb.final_mask is not None
    budgets = [b for _, b in cb.budgets]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 2 * n
    # Saved ranks show up in `deltatune info`, as a layer x matrix table.
    dm.save_delta(tmp_path / "d")
    from deltatune.cli import main

    png = tmp_path / "ranks.png"
    assert main(["info", str(tmp_path / "d"), "--rank-heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    assert "rank kept per layer and matrix" in out and "self_attn.q_proj" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from deltatune.cli.info import describe

    assert describe(str(tmp_path / "d"))["method_summary"]["ranks"] == {
        loc: r for loc, r in cb.ranks().items()}


def test_hf_trainer_drives_the_schedule(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from deltatune.integrations.hf_trainer import DeltaTuneTrainerCallback

    class Rows(Dataset):
        def __init__(self):
            self.ids = model_inputs("llama", batch=8)["input_ids"]

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    cfg = dt.AdaLoraConfig(init_r=4, target_r=1, tinit=1, tfinal=2,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    dm = dt.attach(tiny_llama(), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=0.02, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True)
    bridge = DeltaTuneTrainerCallback(dm)
    trainer = Trainer(model=dm, args=args, train_dataset=Rows(), callbacks=[bridge])
    trainer.train()
    cb = bridge.callbacks[0]
    assert cb.total == 8
    assert sum(cb.ranks().values()) == 1 * 6  # target_r * number of matrices
    # Masks at steps 2..6 (cubic phase after tinit=1) and 7 (the final mask, then kept).
    assert [s for s, _ in cb.budgets] == [2, 3, 4, 5, 6, 7]
    assert cb.last_step == 8


def test_save_load_roundtrip(tmp_path):
    dm = dt.attach(tiny_t5(), dt.AdaLoraConfig(init_r=4, target_r=2))
    randomize_deltas(dm, std=0.3)
    inputs = model_inputs("t5")
    expected = logits(dm, inputs)
    dm.save_delta(tmp_path / "d")
    assert torch.allclose(logits(dt.load(tiny_t5(), tmp_path / "d"), inputs), expected,
                          rtol=0, atol=1e-6)


@pytest.mark.parametrize(("arch", "tmods"), [("llama", ["q_proj", "v_proj", "up_proj"]),
                                              ("t5", ["q", "v", "wo"])])
def test_same_weights_in_peft_give_the_same_outputs(arch, tmods):
    from peft import AdaLoraConfig, get_peft_model

    factory = FACTORIES[arch]
    dm = dt.attach(factory(), dt.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6.0,
                                               target_modules=tmods))
    randomize_deltas(dm, std=0.3)
    peft_model = get_peft_model(factory(), AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=6, target_modules=tmods, total_step=10)).eval()
    sd = peft_model.state_dict()
    theirs = {"lora_P": "lora_B", "lora_Q": "lora_A", "lora_Lambda": "lora_E"}
    with torch.no_grad():
        for key, tensor in dm.delta_state_dict().items():
            location, _, which = key.rpartition(".")
            target = sd[f"base_model.model.{location}.{theirs[which]}.default"]
            target.copy_(tensor.view_as(target))
    inputs = model_inputs(arch)
    assert (logits(dm, inputs) - logits(peft_model, inputs)).abs().max() < 1e-5


def test_rank_grid_and_table():
    ranks = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.up_proj": 5,
             "model.layers.1.self_attn.q_proj": 1}
    rows, cols, grid = rank_grid(ranks)
    assert rows == ["layers.0", "layers.1"]
    assert cols == ["self_attn.q_proj", "mlp.up_proj"]
    assert grid == [[3, 5], [1, None]]
    assert format_rank_table(ranks).splitlines()[2].split() == ["layers.1", "1", "-"]
    t5 = rank_grid({"encoder.block.0.layer.0.SelfAttention.q": 2,
                    "decoder.block.0.layer.0.SelfAttention.q": 4})
    assert t5[0] == ["decoder.block.0", "encoder.block.0"]


def test_plot_rank_heatmap_writes_png(tmp_path):
    path = plot_rank_heatmap({"model.layers.0.self_attn.q_proj": 3}, tmp_path / "h.png")
    assert path.stat().st_size > 1000


def test_bad_inputs(capsys, tmp_path):
    with pytest.raises(ConfigError, match="target_r"):
        dt.AdaLoraConfig(init_r=4, target_r=8)
    with pytest.raises(ConfigError, match="total_step"):
        dt.AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(HyperparameterError, match="init_r"):
        dt.attach(tiny_llama(), dt.AdaLoraConfig(init_r=40, target_r=8))
    dm = dt.attach(tiny_llama(), dt.AdaLoraConfig(init_r=2, target_r=1, tinit=5, tfinal=5))
    cb = dm.training_callbacks()[0]
    with pytest.raises(DeltaStateError, match="on_train_begin"):
        cb.on_optimizer_step(dm, 1)
    with pytest.raises(ConfigError, match="more training steps"):
        cb.on_train_begin(dm, 8)
    assert isinstance(cb, AdaLoraCallback)
    lora = dt.attach(tiny_llama(), dt.LoraConfig())
    lora.save_delta(tmp_path / "l")
    from deltatune.cli import main

    assert main(["info", str(tmp_path / "l"), "--rank-heatmap", str(tmp_path / "x.png")]) == 2
    assert "reports no ranks" in capsys.readouterr().err


def test_callback_state_resumes_the_schedule():
    cfg = dt.AdaLoraConfig(init_r=3, target_r=1, target_modules=["q_proj"], total_step=6)
    dm = dt.attach(tiny_llama(), cfg)
    randomize_deltas(dm, std=0.3)
    cb = dm.training_callbacks()[0]
    cb.on_train_begin(dm, 6)
    _one_backward(dm)
    cb.on_optimizer_step(dm, 1)
    state = cb.state_dict()
    fresh = AdaLoraCallback(cb.deltas, cfg)
    fresh.load_state_dict(state)
    assert fresh.total == 6 and fresh.budgets == cb.budgets
    assert set(fresh.ipt) == set(cb.ipt)
    assert all(torch.equal(fresh.scores()[k], v) for k, v in cb.scores().items())
