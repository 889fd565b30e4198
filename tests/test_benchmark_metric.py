"""The downstream metric on hand-computed examples, and the training recipe's model selection."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmark.config import DownstreamConfig
from benchmark.downstream import (
    SpecialIds,
    build_downstream,
    build_model,
    collate,
    encode_texts,
    evaluate,
    next_token_counts,
    target_mask,
    train,
    trainable_parameters,
)
from tests.tiny_models import byte_tokenizer, tiny_causal_lm


def test_next_token_counts_hand_computed() -> None:
    # Prepare: 3 targets over a 4-token vocabulary.
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([0, 1, 3])

    # Execute
    correct, nll, total = next_token_counts(logits, targets)

    # Assert: argmax = 0 (right), 2 (wrong), 0 on a tie (wrong). NLL = logsumexp(row) - logit(target).
    assert (correct, total) == (1, 3)
    expected = (math.log(math.e**2 + math.e + 2) - 2) + math.log(3 + math.e**3) + (math.log(4 * math.e) - 1)
    assert nll == pytest.approx(expected, rel=1e-6)


class _BigramModel(torch.nn.Module):
    """A stub with GPT-2's two attributes: hidden state = one-hot of the token, lm_head = a bigram table."""

    def __init__(self, table: dict[int, int], vocab: int, scale: float = 5.0) -> None:
        super().__init__()
        self.vocab = vocab
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for current, nxt in table.items():
                self.lm_head.weight[nxt, current] = scale

    def transformer(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=F.one_hot(input_ids, self.vocab).float())


def test_evaluate_counts_eos_and_skips_padding() -> None:
    # Prepare: bos = eos = pad = 0 (as in GPT-2). The bigram stub predicts 0->1, 1->2, 2->3, 3->0, 4->0.
    model = _BigramModel({0: 1, 1: 2, 2: 3, 3: 0, 4: 0}, vocab=5)
    seq_a = [0, 1, 2, 0]  # targets 1 (right), 2 (right), eos (wrong: predicts 3)
    seq_b = [0, 3, 0]  # targets 3 (wrong: predicts 1), eos (right); padded by one 0 that is no target

    # Execute
    result = evaluate(model, [seq_a, seq_b], pad=0, batch_size=2)

    # Assert: 3 right of 5 targets; the pad (which would add a 6th target) is not counted.
    assert result.tokens == 5
    assert result.accuracy == pytest.approx(3 / 5)
    right, wrong = math.log(math.exp(5) + 4) - 5, math.log(math.exp(5) + 4)
    assert result.cross_entropy == pytest.approx((3 * right + 2 * wrong) / 5, rel=1e-5)


def test_collate_and_target_mask() -> None:
    ids, mask = collate([[5, 6, 7], [5, 8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [5, 8, 0]]
    assert target_mask(mask).tolist() == [[True, True], [True, False]]


def test_encode_texts_wraps_and_truncates() -> None:
    class _Tok:
        def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
            assert add_special_tokens is False
            return {"input_ids": [[10 + len(t)] * len(t) for t in texts]}

    special = SpecialIds(bos=1, eos=2, pad=2, vocab_size=100)
    out = encode_texts(["abc", "abcdef"], _Tok(), token_budget=4, special=special)
    assert out == [[1, 13, 13, 13, 2], [1, 16, 16, 16, 16, 2]]


def test_train_keeps_the_best_validation_checkpoint() -> None:
    # Prepare: a tiny GPT-2 on a 6-token language where 1 is always followed by 2, then 3.
    special = SpecialIds(bos=0, eos=5, pad=5, vocab_size=6)
    config = DownstreamConfig(
        n_embd=16, n_layer=1, n_head=2, dropout=0.0, learning_rate=1e-2, batch_size=4, eval_every=5
    )
    model = build_model(config, special, max_positions=8, seed=0)
    data = [[0, 1, 2, 3, 5]] * 8
    seen: list[float] = []

    # Execute
    result = train(
        model,
        data,
        data,
        config=config,
        epochs=10,
        pad=special.pad,
        generator=torch.Generator().manual_seed(0),
        on_eval=lambda step, r: seen.append(r.accuracy),
    )

    # Assert: 20 steps, validated every 5; the kept weights score the best validation accuracy seen.
    assert result.steps == 20 and len(seen) == 4
    assert result.selected_validation.accuracy == max(seen)
    assert evaluate(model, data, pad=special.pad).accuracy == pytest.approx(max(seen))
    assert result.selected_validation.accuracy == 1.0


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    special = SpecialIds(bos=0, eos=1, pad=1, vocab_size=50)
    config = DownstreamConfig(n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(config, special, max_positions=8, seed=7)
    after = torch.rand(1)
    b = build_model(config, special, max_positions=8, seed=7)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_training_depends_only_on_its_generator() -> None:
    # Prepare: dropout on, so training draws random numbers beyond the batch order.
    special = SpecialIds(bos=0, eos=5, pad=5, vocab_size=6)
    config = DownstreamConfig(n_embd=8, n_layer=1, n_head=2, dropout=0.3, batch_size=2, eval_every=3)
    data = [[0, 1, 2, 3, 5], [0, 2, 4, 5], [0, 3, 1, 5]]

    def run() -> list[torch.Tensor]:
        model = build_model(config, special, max_positions=8, seed=0)
        train(model, data, data, config=config, epochs=2, pad=5, generator=torch.Generator().manual_seed(4))
        return [p.detach().clone() for p in model.parameters()]

    # Execute: two runs with different global RNG states in between.
    torch.manual_seed(1)
    first = run()
    torch.manual_seed(2)
    global_before = torch.get_rng_state()
    second = run()

    # Assert: identical weights; the global generator was left as it was.
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(torch.get_rng_state(), global_before)


def test_evaluate_returns_per_group_counts_that_sum_to_the_totals() -> None:
    # Prepare: the bigram stub; sequences of test users 1, 0, 1 (batch of 2 splits user 1's texts).
    model = _BigramModel({0: 1, 1: 2, 2: 3, 3: 0, 4: 0}, vocab=5)
    seqs = [[0, 1, 2, 0], [0, 3, 0], [0, 1, 0]]  # targets: 2 of 3 right; 1 of 2 right; 1 of 2 right

    # Execute
    result = evaluate(model, seqs, pad=0, batch_size=2, groups=[1, 0, 1])

    # Assert: per-user counts (user 0: seq 2; user 1: seqs 1 and 3) and totals unchanged.
    assert result.group_tokens == (2, 5) and result.group_correct == (1, 3)
    assert result.tokens == 7 and result.accuracy == pytest.approx(4 / 7)
    with pytest.raises(ValueError, match="groups has 2 entries for 3 sequences"):
        evaluate(model, seqs, pad=0, groups=[0, 1])


def test_pretrained_lora_downstream_trains_only_the_adapter() -> None:
    # Prepare: a tiny random Llama stands in for the public pretrained SmolLM2.
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    special = SpecialIds(bos=eos, eos=eos, pad=eos, vocab_size=len(tok))
    config = DownstreamConfig(
        kind="pretrained-lora", lora_r=4, lora_alpha=8, dropout=0.0, learning_rate=5e-2, batch_size=4, eval_every=5
    )
    pretrained = tiny_causal_lm(tok)
    frozen_before = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    model = build_downstream(config, special, max_positions=32, seed=0, pretrained=lambda: pretrained)
    data = [[eos, 10, 11, 12, 13, eos]] * 8
    start = evaluate(model, data, pad=eos).cross_entropy

    # Execute
    train(model, data, data, config=config, epochs=5, pad=eos, generator=torch.Generator().manual_seed(0))

    # Assert: only LoRA weights train; the base weights are untouched; the model learned the sequence.
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all("lora_" in n for n in names)
    base = dict(model.get_base_model().named_parameters())
    for name, before in frozen_before.items():
        key = next(k for k in base if k.replace(".base_layer", "") == name)
        assert torch.equal(base[key], before), name
    assert evaluate(model, data, pad=eos).cross_entropy < start


def test_pretrained_lora_adapter_init_is_seeded() -> None:
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    special = SpecialIds(bos=eos, eos=eos, pad=eos, vocab_size=len(tok))
    config = DownstreamConfig(kind="pretrained-lora", lora_r=2)
    a = build_downstream(config, special, max_positions=8, seed=3, pretrained=lambda: tiny_causal_lm(tok))
    b = build_downstream(config, special, max_positions=8, seed=3, pretrained=lambda: tiny_causal_lm(tok))
    c = build_downstream(config, special, max_positions=8, seed=4, pretrained=lambda: tiny_causal_lm(tok))
    pa, pb, pc = (dict(trainable_parameters(m)) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)
    with pytest.raises(ValueError, match="needs the public pretrained model"):
        build_downstream(config, special, max_positions=8, seed=0)
