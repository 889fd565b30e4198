"""DPO: the loss against hand-computed values, the training step against TRL's DPOTrainer, adapter semantics."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from popri.config import TrainConfig
from popri.dpo import (
    LoraDPO,
    TokenizedPair,
    collate,
    completion_end,
    dpo_sigmoid_loss,
    full_row_logps,
    sequence_logps,
    tokenize_pair,
)
from popri.generation import build_prompt
from popri.preferences import PreferencePair
from tests.tiny_models import byte_tokenizer, randomize_lora, tiny_causal_lm

PAIRS = [PreferencePair(f"Prompt {i}: say something\n", f"good answer {i}", f"bad {i} answer here") for i in range(4)]


def test_sigmoid_loss_matches_hand_computed_values():
    # Prepare: margins of logratios 2 - 0.5 = 1.5 and -1 - 1 = -2 with beta 0.1
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0])
    rc, rr = torch.tensor([-12.0, -19.0]), torch.tensor([-12.5, -19.0])

    # Execute
    losses, chosen, rejected = dpo_sigmoid_loss(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1
    )

    # Assert: -log sigmoid(0.1 * ((pc - rc) - (pr - rr)))
    expected = [-math.log(1 / (1 + math.exp(-0.1 * 1.5))), -math.log(1 / (1 + math.exp(-0.1 * -2.0)))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.2, -0.1])
    assert rejected.tolist() == pytest.approx([0.05, 0.1])


def test_length_penalty_adds_alpha_times_the_length_difference_to_the_margin():
    # Prepare: the pairs above; chosen 10 and 4 tokens long, rejected 6 and 8; alpha 0.05 (R-DPO, eq. 9)
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0])
    rc, rr = torch.tensor([-12.0, -19.0]), torch.tensor([-12.5, -19.0])

    # Execute
    losses, chosen, _ = dpo_sigmoid_loss(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        beta=0.1,
        length_penalty=0.05,
        chosen_lengths=torch.tensor([10, 4]),
        rejected_lengths=torch.tensor([6, 8]),
    )

    # Assert: -log sigmoid(0.1 * margin + 0.05 * (|y_w| - |y_l|)); the rewards stay the plain log-ratios
    expected = [-math.log(1 / (1 + math.exp(-(0.15 + 0.2)))), -math.log(1 / (1 + math.exp(-(-0.2 - 0.2))))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.2, -0.1])


def test_a_step_with_a_length_penalty_uses_the_completions_token_counts():
    # Prepare: a fresh adapter (B = 0), so policy = reference and the plain DPO margin is 0 for every pair
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig(batch_size=4, length_penalty=0.1))
    pairs = [tokenize_pair(tok, p) for p in PAIRS]

    # Execute
    loss = dpo.step(pairs)["loss"]

    # Assert: the loss is the mean of -log sigmoid(0.1 (|y_w| - |y_l|)) over the pairs' token counts
    diffs = [len(p.chosen_ids) - len(p.rejected_ids) for p in pairs]
    assert any(diffs)
    expected = float(np.mean([math.log(1 + math.exp(-0.1 * d)) for d in diffs]))
    assert loss == pytest.approx(expected, abs=1e-5)


def test_length_penalty_without_lengths_is_an_error():
    logps = torch.tensor([-3.0])
    with pytest.raises(ValueError, match="completion lengths"):
        dpo_sigmoid_loss(
            policy_chosen_logps=logps,
            policy_rejected_logps=logps,
            ref_chosen_logps=logps,
            ref_rejected_logps=logps,
            beta=0.1,
            length_penalty=0.01,
        )


def test_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.0])
    losses, _, _ = dpo_sigmoid_loss(
        policy_chosen_logps=logps,
        policy_rejected_logps=logps,
        ref_chosen_logps=logps,
        ref_rejected_logps=logps,
        beta=0.01,
    )
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_sequence_logps_sums_only_completion_tokens():
    # Prepare: uniform logits over 4 tokens -> each token has log-prob -log 4
    logits = torch.zeros(1, 5, 4)
    ids = torch.tensor([[0, 1, 2, 3, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 0]])

    # Execute / Assert: positions 2 and 3 are scored
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(-2 * math.log(4))


def test_collate_puts_chosen_rows_first_and_masks_only_completions():
    tok = byte_tokenizer()
    tokenized = [tokenize_pair(tok, p) for p in PAIRS[:2]]
    batch = collate(tokenized, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    first = tokenized[0]
    assert batch["completion_mask"][0].sum().item() == len(first.chosen_ids)
    assert batch["completion_mask"][2].sum().item() == len(first.rejected_ids)
    assert first.chosen_ids[-1] == tok.eos_token_id  # EOS appended, as TRL does


def test_header_end_appends_the_next_sample_header_to_both_completions():
    # Prepare
    tok = byte_tokenizer()
    pair = PreferencePair(build_prompt(["a", "b", "c"]), "a good line", "a bad line")

    # Execute
    end = completion_end(tok, pair.prompt, kind="header")
    tokenized = tokenize_pair(tok, pair, end=end)

    # Assert: both completions end with the header the sampler stops at, not with EOS
    assert end == "\nOriginal Text Sample 5"
    assert tok.decode(tokenized.chosen_ids) == "a good line\nOriginal Text Sample 5"
    assert tok.decode(tokenized.rejected_ids) == "a bad line\nOriginal Text Sample 5"
    assert completion_end(tok, pair.prompt, kind="eos") == tok.eos_token


@pytest.mark.parametrize(("kind", "suffix"), [("eos", "<|endoftext|>"), ("header", "\nOriginal Text Sample 5")])
def test_a_round_trains_on_completions_ended_as_configured(kind: str, suffix: str) -> None:
    # Prepare: record the rows the round scores
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig(batch_size=2, completion_end=kind))
    pairs = [PreferencePair(build_prompt(["x", "y", "z"]), f"good {i}", f"bad {i}") for i in range(2)]
    seen: list[TokenizedPair] = []
    reference = dpo.reference_logps

    def recording(batch: list[TokenizedPair]) -> torch.Tensor:
        seen.extend(batch)
        return reference(batch)

    dpo.reference_logps = recording  # type: ignore[method-assign]

    # Execute
    dpo.train_round(pairs, rng=np.random.default_rng(0))

    # Assert
    assert sorted(tok.decode(p.chosen_ids) for p in seen) == [f"good {i}{suffix}" for i in range(2)]
    assert sorted(tok.decode(p.rejected_ids) for p in seen) == [f"bad {i}{suffix}" for i in range(2)]


def test_first_step_loss_matches_trl_dpotrainer(tmp_path: Path) -> None:
    # Prepare: the same tiny model, the same nonzero adapter (so the loss is not trivially ln 2), the same pairs
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from trl import DPOConfig, DPOTrainer

    tok = byte_tokenizer()
    base = tiny_causal_lm(tok)
    config = TrainConfig(batch_size=4, learning_rate=1e-3, beta=0.1)
    ours = LoraDPO(copy.deepcopy(base), tok, config=config)
    randomize_lora(ours.policy, seed=1)
    adapter = {k: v.clone() for k, v in ours.state_dict()["adapter"].items()}
    lora = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules="all-linear", task_type="CAUSAL_LM"
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        beta=0.1,
        max_steps=1,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        lr_scheduler_type="constant",
        max_length=None,
        seed=0,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(base),
        args=args,
        train_dataset=Dataset.from_list([p.to_dict() for p in PAIRS]),
        processing_class=tok,
        peft_config=lora,
    )
    set_peft_model_state_dict(trainer.model, adapter)

    # Execute
    ours_metrics = ours.step([tokenize_pair(tok, p) for p in PAIRS])
    trainer.train()

    # Assert
    trl_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert ours_metrics["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert ours_metrics["loss"] == pytest.approx(trl_loss, abs=1e-5)


def test_training_changes_lora_weights_but_never_base_weights():
    # Prepare
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig(batch_size=2, learning_rate=1e-2))
    base_before = {k: v.clone() for k, v in dpo.policy.named_parameters() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in dpo.policy.named_parameters() if "lora_" in k}

    # Execute
    metrics = dpo.train_round(PAIRS, rng=np.random.default_rng(0))

    # Assert
    assert all(torch.equal(v, dict(dpo.policy.named_parameters())[k]) for k, v in base_before.items())
    assert any(not torch.equal(v, dict(dpo.policy.named_parameters())[k]) for k, v in lora_before.items())
    assert set(metrics) >= {"loss", "rewards_margin", "rewards_accuracy"}


def test_reference_is_the_base_model_with_adapter_disabled():
    # Prepare
    tok = byte_tokenizer()
    base = tiny_causal_lm(tok)
    plain = copy.deepcopy(base)
    dpo = LoraDPO(base, tok, config=TrainConfig())
    randomize_lora(dpo.policy, seed=3)
    pair = tokenize_pair(tok, PAIRS[0])
    batch = collate([pair], tok.pad_token_id)

    # Execute
    ref = dpo.reference_logps([pair])
    with torch.no_grad():
        expected = sequence_logps(
            plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"],
            batch["completion_mask"],
        )

    # Assert
    assert torch.allclose(ref, expected, atol=1e-5)


def test_restored_state_continues_training_exactly():
    # Prepare: two identical trainers; one is saved after a round and restored into a fresh model
    tok = byte_tokenizer()
    config = TrainConfig(batch_size=2, learning_rate=1e-2)
    a = LoraDPO(tiny_causal_lm(tok), tok, config=config)
    a.train_round(PAIRS, rng=np.random.default_rng(0))
    b = LoraDPO(tiny_causal_lm(tok), tok, config=config)
    b.load_state_dict(copy.deepcopy(a.state_dict()))

    # Execute
    ma = a.train_round(PAIRS, rng=np.random.default_rng(1))
    mb = b.train_round(PAIRS, rng=np.random.default_rng(1))

    # Assert: same losses, which needs the same adapter and the same AdamW moments
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert b.steps_done == a.steps_done == 4


def test_generation_model_has_the_adapter_merged_in():
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig())
    randomize_lora(dpo.policy, seed=5)
    ids = torch.tensor([[5, 6, 7, 8]])
    merged = dpo.generation_model()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, dpo.policy(input_ids=ids).logits, atol=1e-5)


def test_shared_prompt_forward_gives_the_full_row_logps_and_gradients():
    # Prepare: a tiny LoRA policy with a nonzero adapter, pairs whose prompts differ in length
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig(precision="fp32"))
    randomize_lora(dpo.policy, seed=3)
    pairs = [
        tokenize_pair(tok, PreferencePair("Prompt one\n", "a good answer", "bad")),
        tokenize_pair(tok, PreferencePair("A much longer second prompt here\n", "ok", "a rather long reply")),
    ]

    # Execute: TRL's layout (every row prompt + completion) and the shared-prompt forward LoraDPO uses
    full = full_row_logps(dpo.policy, collate(pairs, tok.pad_token_id))
    full.sum().backward()
    grads_full = [p.grad.clone() for p in dpo.policy.parameters() if p.requires_grad]
    dpo.optimizer.zero_grad(set_to_none=True)
    shared = dpo._logps(pairs)
    shared.sum().backward()
    grads_shared = [p.grad.clone() for p in dpo.policy.parameters() if p.requires_grad]

    # Assert: same log-probs and same LoRA gradients (the prompt's LoRA still trains through the shared cache)
    assert torch.allclose(full, shared, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_full, grads_shared, strict=True))
    assert any(float(g.abs().sum()) > 0 for g in grads_shared)


def test_bfloat16_base_trains_a_float32_adapter_that_matches_the_float32_policy():
    # Prepare: the same nonzero adapter on a float32 and on a bfloat16 copy of one tiny base
    tok = byte_tokenizer()
    base = tiny_causal_lm(tok)
    fp32 = LoraDPO(copy.deepcopy(base), tok, config=TrainConfig(precision="fp32"))
    bf16 = LoraDPO(copy.deepcopy(base).to(torch.bfloat16), tok, config=TrainConfig())
    randomize_lora(fp32.policy, seed=4)
    randomize_lora(bf16.policy, seed=4)
    pairs = [tokenize_pair(tok, p) for p in PAIRS]
    lora_before = {k: v.detach().clone() for k, v in bf16.policy.named_parameters() if v.requires_grad}

    # Execute
    with torch.no_grad():
        logps_fp32, logps_bf16 = fp32._logps(pairs), bf16._logps(pairs)
    bf16.step(pairs)

    # Assert: bf16 matmuls give the float32 log-probs to bf16 precision; the adapter stays float32 and trains
    assert logps_bf16.dtype == torch.float32
    assert torch.allclose(logps_bf16, logps_fp32, rtol=2e-2)
    lora_after = dict(bf16.policy.named_parameters())
    assert all(lora_after[k].dtype == torch.float32 for k in lora_before)
    assert any(not torch.equal(v, lora_after[k]) for k, v in lora_before.items())


def test_a_training_step_leaves_the_attention_implementation_as_it_found_it():
    # Prepare: a model on SDPA (CPU steps switch to eager attention for their backward)
    tok = byte_tokenizer()
    dpo = LoraDPO(tiny_causal_lm(tok), tok, config=TrainConfig())
    before = dpo.policy.get_base_model().config._attn_implementation

    # Execute
    dpo.step([tokenize_pair(tok, p) for p in PAIRS[:2]])

    # Assert
    assert before == "sdpa"
    assert dpo.policy.get_base_model().config._attn_implementation == before
