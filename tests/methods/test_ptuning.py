"""P-tuning: template placement, prompt encoders, verbaliser, peft parity, save/load."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import DataError, HyperparameterError
from deltatune.methods.ptuning import render_template, verbalizer_logits
from tests.conftest import VOCAB, randomize_deltas, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from tests.helpers import adam_losses

PSEUDO = 3
MASK = 4


class WordTokenizer:
    """A whitespace tokenizer over a fixed word list (no hub), BERT-style specials."""

    mask_token_id = MASK

    def __init__(self):
        self.vocab = {w: i + 10 for i, w in enumerate(
            ["the", "movie", "was", "great", "bad", "awful", "fine", "?", "it", ".", "really"])}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[w] for w in text.split()]

    def build_inputs_with_special_tokens(self, ids):
        return [1, *ids, 2]


def _part(dm, name="default"):
    return dm.get_delta(name).method.part(dm.get_delta(name))


def test_render_template_places_slots_anchors_and_mask():
    tok = WordTokenizer()
    ids = render_template("[P0..P2] {x} [P3..P5] ? [MASK]", "the movie was great", tok,
                          pseudo_token_id=PSEUDO)
    v = tok.vocab
    assert ids == [1, PSEUDO, PSEUDO, PSEUDO, v["the"], v["movie"], v["was"], v["great"],
                   PSEUDO, PSEUDO, PSEUDO, v["?"], MASK, 2]
    with pytest.raises(DataError, match="backwards"):
        render_template("[P3..P1] {x}", "it", tok, pseudo_token_id=PSEUDO)


@pytest.mark.parametrize("encoder", ["lstm", "mlp", "none"])
def test_template_slots_take_the_encoder_outputs_in_order(encoder):
    dm = dt.attach(tiny_bert(task="masked-lm"),
                   dt.PTuningConfig(prompt_length=4, encoder=encoder, pseudo_token_id=PSEUDO,
                                    encoder_hidden=8))
    part = _part(dm)
    h = part.prompts().detach()
    # Hand reference for the encoder: the paper's bi-LSTM + MLP / 3-layer MLP / identity.
    p = part.embedding.weight.detach()
    if encoder == "lstm":
        ref = part.mlp_head(part.lstm_head(p[None])[0])[0]
    elif encoder == "mlp":
        ref = part.mlp_head(p)
    else:
        ref = p
    torch.testing.assert_close(h, ref.detach())
    ids = torch.tensor([[1, PSEUDO, PSEUDO, 20, 21, PSEUDO, 22, PSEUDO, MASK, 2],
                        [1, PSEUDO, 30, PSEUDO, PSEUDO, 31, PSEUDO, MASK, 2, 0]])
    mask = torch.tensor([[1] * 10, [1] * 9 + [0]])
    ours = dm(input_ids=ids, attention_mask=mask).logits
    embeds = dm.model.get_input_embeddings()(ids).detach()
    for row in range(2):
        slots = (ids[row] == PSEUDO).nonzero().flatten()
        embeds[row, slots] = h
    with dm.disabled():
        ref_logits = dm.model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(ours, ref_logits, atol=1e-6, rtol=1e-6)
    assert ours.shape[1] == 10      # a template keeps the input's length


def test_verbaliser_reads_label_words_at_mask():
    logits = torch.randn(2, 5, VOCAB)
    ids = torch.tensor([[1, 9, MASK, 7, 2], [1, MASK, 8, 2, 0]])
    out = verbalizer_logits(logits, ids, MASK, [50, 60])
    torch.testing.assert_close(out, torch.stack([logits[0, 2, [50, 60]], logits[1, 1, [50, 60]]]))
    prefixed = torch.randn(2, 8, VOCAB)            # 3 prompt positions in front
    torch.testing.assert_close(verbalizer_logits(prefixed, ids, MASK, [50])[:, 0],
                               torch.stack([prefixed[0, 5, 50], prefixed[1, 4, 50]]))
    with pytest.raises(DataError, match="MASK"):
        verbalizer_logits(logits, torch.ones(2, 5, dtype=torch.long), MASK, [50])


def test_mlm_classification_through_verbaliser_trains():
    # Weights of std 0.02 give [MASK] almost no gradient to the prompts; a larger init
    # makes the tiny model sensitive to its inputs, as a pretrained one is.
    dm = dt.attach(tiny_bert(task="masked-lm", initializer_range=0.3, hidden_dropout_prob=0.0),
                   dt.PTuningConfig(prompt_length=4, pseudo_token_id=PSEUDO, encoder_hidden=16))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(10, VOCAB, (8, 4), generator=gen)
    ids = torch.cat([torch.full((8, 1), 1), torch.full((8, 2), PSEUDO), x,
                     torch.full((8, 2), PSEUDO), torch.full((8, 1), MASK)], 1)
    labels = torch.ones(8, dtype=torch.long)   # prompts alone must move [MASK] to word 41
    words = [40, 41]
    def loss_of_step():
        scores = verbalizer_logits(dm(input_ids=ids).logits, ids, MASK, words)
        return torch.nn.functional.cross_entropy(scores, labels)

    losses = adam_losses(dm, loss_of_step, steps=30, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_peft_parity_prefix_placement(factory, encoder):
    peft = pytest.importorskip("peft")
    dm = dt.attach(factory(), dt.PTuningConfig(prompt_length=4, encoder=encoder,
                                               placement="prefix", encoder_hidden=16))
    randomize_deltas(dm, std=0.3)
    cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                   encoder_hidden_size=16,
                                   encoder_reparameterization_type=encoder.upper())
    pm = peft.get_peft_model(factory(), cfg)
    pm.prompt_encoder["default"].load_state_dict(_part(dm).state_dict())
    ids = torch.randint(5, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dm(input_ids=ids).logits, pm(input_ids=ids).logits[:, 4:],
                               atol=1e-5, rtol=1e-5)


def test_generate_with_template_left_padding_equals_unbatched():
    dm = dt.attach(tiny_llama(), dt.PTuningConfig(prompt_length=3, pseudo_token_id=PSEUDO))
    randomize_deltas(dm, std=0.3)
    rows = [[PSEUDO, 20, 21, PSEUDO, 22, PSEUDO, 23], [PSEUDO, 30, PSEUDO, PSEUDO, 31]]
    ids = torch.tensor([rows[0], [0, 0] + rows[1]])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    out = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                      pad_token_id=0)
    assert out[:, :7].tolist() == ids.tolist()
    for i, row in enumerate(rows):
        single = dm.generate(input_ids=torch.tensor([row]), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        assert out[i, -4:].tolist() == single[0, -4:].tolist()


def test_t5_template_in_encoder():
    dm = dt.attach(tiny_t5(), dt.PTuningConfig(prompt_length=2, pseudo_token_id=PSEUDO))
    ids = torch.tensor([[PSEUDO, 20, PSEUDO, 21]])
    out = dm.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1
    with pytest.raises(DataError, match="prompt slots"):
        dm(input_ids=torch.tensor([[PSEUDO, 20, 21]]), decoder_input_ids=ids[:, :1])


def test_save_drops_encoder_and_reloads_identically(tmp_path):
    dm = dt.attach(tiny_bert(task="masked-lm"),
                   dt.PTuningConfig(prompt_length=3, pseudo_token_id=PSEUDO, encoder_hidden=8))
    randomize_deltas(dm, std=0.3)
    ids = torch.tensor([[1, PSEUDO, 20, PSEUDO, 21, PSEUDO, MASK, 2]])
    before = dm(input_ids=ids).logits
    dm.save_delta(tmp_path / "pt")
    saved = dt.read_delta_directory(tmp_path / "pt")
    assert set(saved.tensors) == {"prompt"} and saved.config.encoder == "none"
    loaded = dt.load(tiny_bert(task="masked-lm"), tmp_path / "pt")
    torch.testing.assert_close(loaded(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)


def test_tune_model_option_trains_copies_of_the_model(tmp_path):
    dm = dt.attach(tiny_gpt2(), dt.PTuningConfig(prompt_length=2, placement="prefix",
                                                 tune_model=True))
    trainable = [n for n, p in dm.named_parameters() if p.requires_grad]
    assert any(".copies.default." in n and ".h.0." in n for n in trainable)
    ids = torch.randint(5, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    dm.train()
    dm(input_ids=ids, labels=ids).loss.backward()
    dm.eval()
    dm.save_delta(tmp_path / "ft")
    saved = dt.read_delta_directory(tmp_path / "ft").tensors
    assert any(k.startswith("transformer.") for k in saved)


def test_bad_configs():
    with pytest.raises(HyperparameterError, match="pseudo_token_id"):
        dt.PTuningConfig()
    with pytest.raises(HyperparameterError, match="vocabulary"):
        dt.attach(tiny_bert(), dt.PTuningConfig(pseudo_token_id=VOCAB + 1))
