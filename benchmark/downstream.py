"""The downstream model: a small GPT-2-style causal LM, its training recipe, and the next-token metric.

Format (as in POPri's ``downstream_eval.py``): each text becomes ``[bos] + tokens[:budget] + [eos]``; batches are
right-padded and pads are never targets. For a sequence ``x_0 .. x_n`` (``x_0`` = bos, ``x_n`` = eos) the model
predicts ``x_{i+1}`` from ``x_0..x_i`` for i = 0..n−1, so the n targets include the EOS.

Metric, over all non-pad targets of all texts (micro-average, each token counts once):

    accuracy      = (1/N) Σ_t 1[argmax_v p(v | x_<t) = x_t]
    cross_entropy = −(1/N) Σ_t log p(x_t | x_<t)          (nats per token)

Training recipe (the same for every method): AdamW with a constant learning rate (the paper's downstream uses no
scheduler), shuffled batches from a seeded generator, validation every ``eval_every`` steps and at the end, and the
checkpoint with the best validation accuracy is kept. Test is evaluated once, on that checkpoint only.

Logits are computed only at target positions: with a 49k-token vocabulary the output layer dominates the cost, and
padding positions would waste it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmark.config import DownstreamConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the sequence markers. GPT-2 uses one token for both; SmolLM2 has distinct BOS and EOS."""

    bos: int
    eos: int
    pad: int
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialIds:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the downstream tokenizer needs an EOS token")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(bos=int(bos), eos=int(eos), pad=int(pad), vocab_size=len(tokenizer))


def encode_texts(texts: list[str], tokenizer: Any, *, token_budget: int, special: SpecialIds) -> list[list[int]]:
    """``[bos] + tokens[:token_budget] + [eos]`` for every text."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[special.bos, *row[:token_budget], special.eos] for row in ids]


def collate(sequences: list[list[int]], *, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``, both (B, L) with L the longest sequence in the batch."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L−1) bool: position i predicts token i+1, a target iff token i+1 is not padding (EOS is a target)."""
    return attention_mask[:, 1:].bool()


def next_token_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, float, int]:
    """(correct top-1, summed negative log-likelihood in nats, number of targets) for (N, V) logits, (N,) targets."""
    if logits.shape[0] == 0:
        return 0, 0.0, 0
    correct = int((logits.argmax(dim=-1) == targets).sum())
    nll = float(F.cross_entropy(logits.float(), targets, reduction="sum"))
    return correct, nll, int(targets.numel())


def build_model(config: DownstreamConfig, special: SpecialIds, *, max_positions: int, seed: int) -> Any:
    """A GPT-2 built from a :class:`transformers.GPT2Config` in code (tied input/output embedding), seeded init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(
        vocab_size=special.vocab_size,
        n_positions=max_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=special.bos,
        eos_token_id=special.eos,
        pad_token_id=special.pad,
    )
    with seeded_torch(torch.Generator().manual_seed(seed)):  # the caller's global generator is restored afterwards
        return GPT2LMHeadModel(gpt2)


def with_lora(pretrained: Any, config: DownstreamConfig, *, seed: int) -> Any:
    """The ``pretrained`` causal LM (a copy is the caller's job) with a fresh, seeded LoRA adapter on every linear
    projection of its blocks (PEFT ``all-linear``: attention and MLP, not the output layer); only the adapter trains.

    This is the downstream of the POPri paper's evaluation in spirit (it fine-tunes a *pretrained* small LM) and how
    DP federated learning of pretrained models is done today (only the adapter is trained, clipped and sent).
    """
    from peft import get_peft_model

    from popri.dpo import lora_config

    lora = lora_config(r=config.lora_r, alpha=config.lora_alpha, dropout=config.dropout)
    pretrained.train()
    with seeded_torch(torch.Generator().manual_seed(seed)):  # the adapter's random init
        return get_peft_model(pretrained, lora)


def build_downstream(
    config: DownstreamConfig,
    special: SpecialIds,
    *,
    max_positions: int,
    seed: int,
    pretrained: Callable[[], Any] | None = None,
) -> Any:
    """The downstream model of ``config.kind``: ``gpt2`` (from scratch, :func:`build_model`) or ``pretrained-lora``
    (``pretrained()`` returns a fresh copy of the public pretrained LM; it gets a LoRA adapter, :func:`with_lora`)."""
    if config.kind == "gpt2":
        return build_model(config, special, max_positions=max_positions, seed=seed)
    if pretrained is None:
        raise ValueError("downstream.kind 'pretrained-lora' needs the public pretrained model (pretrained=...)")
    return with_lora(pretrained(), config, seed=seed)


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that trains (all of them for GPT-2, the adapter for LoRA)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def seeded_torch(generator: torch.Generator) -> Iterator[None]:
    """Run a block (dropout, init) on torch's global RNG seeded from ``generator``, and restore the global state after:
    results depend only on the explicit generator, and nothing else's randomness is disturbed."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        torch.manual_seed(seed)
        yield


def num_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _body_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body (no LM head) and the output layer of any HF causal LM, PEFT-wrapped or not."""
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(backbone, "base_model_prefix", "transformer")  # HF models name their body; GPT-2: transformer
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else backbone.lm_head
    return getattr(backbone, prefix), head


def _target_logits(
    model: Any, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N target positions of the batch, the (N,) targets, and the (N,) batch row of each."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    body, head = _body_and_head(model)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, d)
    keep = target_mask(mask)  # (B, L-1)
    rows = keep.nonzero()[:, 0]
    return head(hidden[:, :-1][keep]), ids[:, 1:][keep], rows


def sequence_loss(model: Any, sequences: list[list[int]], *, pad: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets of ``sequences`` (the training loss)."""
    ids, mask = collate(sequences, pad=pad)
    logits, targets, _ = _target_logits(model, ids, mask)
    return F.cross_entropy(logits.float(), targets)


@dataclass(frozen=True)
class EvalResult:
    """Micro-averaged top-1 next-token accuracy and cross-entropy (nats/token) over ``tokens`` targets.

    With ``groups`` given to :func:`evaluate`, ``group_correct[g]`` / ``group_tokens[g]`` are the counts of group g
    (a test user): what the paired bootstrap over test users resamples (:mod:`benchmark.stats`).
    """

    accuracy: float
    cross_entropy: float
    tokens: int
    group_correct: tuple[int, ...] | None = None
    group_tokens: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "cross_entropy": self.cross_entropy, "tokens": self.tokens}


@torch.no_grad()
def evaluate(
    model: Any,
    sequences: list[list[int]],
    *,
    pad: int,
    batch_size: int = 64,
    groups: Sequence[int] | None = None,
) -> EvalResult:
    """Next-token accuracy and cross-entropy of ``model`` on encoded ``sequences`` (eval mode, no dropout).

    ``groups[i]`` (optional, ints 0..G−1) is the group of sequence i, e.g. its test user: the result then also holds
    per-group correct and target counts (``group_correct``, ``group_tokens``, G entries each).
    """
    if groups is not None and len(groups) != len(sequences):
        raise ValueError(f"groups has {len(groups)} entries for {len(sequences)} sequences")
    num_groups = (max(groups) + 1) if groups is not None and len(groups) else 0
    g_correct, g_tokens = [0] * num_groups, [0] * num_groups
    was_training = model.training
    model.eval()
    correct, nll, total = 0, 0.0, 0
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        ids, mask = collate([sequences[i] for i in index], pad=pad)
        logits, targets, rows = _target_logits(model, ids, mask)
        c, n, t = next_token_counts(logits, targets)
        correct, nll, total = correct + c, nll + n, total + t
        if groups is not None and t:
            hit = (logits.argmax(dim=-1) == targets).long()
            per_row_correct = torch.zeros(len(index), dtype=torch.long, device=hit.device).index_add_(0, rows, hit)
            per_row_tokens = torch.bincount(rows, minlength=len(index))
            for j, i in enumerate(index):
                g_correct[groups[i]] += int(per_row_correct[j])
                g_tokens[groups[i]] += int(per_row_tokens[j])
    model.train(was_training)
    if total == 0:
        raise ValueError("no target tokens to evaluate")
    if groups is None:
        return EvalResult(accuracy=correct / total, cross_entropy=nll / total, tokens=total)
    return EvalResult(
        accuracy=correct / total,
        cross_entropy=nll / total,
        tokens=total,
        group_correct=tuple(g_correct),
        group_tokens=tuple(g_tokens),
    )


@dataclass
class TrainResult:
    """The selected checkpoint (already loaded into the model) and the validation history that selected it."""

    selected_step: int
    selected_validation: EvalResult
    steps: int
    history: list[dict[str, float | int]] = field(default_factory=list)


def _better(new: EvalResult, best: EvalResult | None) -> bool:
    if best is None:
        return True
    return (new.accuracy, -new.cross_entropy) > (best.accuracy, -best.cross_entropy)


def train(
    model: Any,
    train_sequences: list[list[int]],
    validation_sequences: list[list[int]],
    *,
    config: DownstreamConfig,
    epochs: int,
    pad: int,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "train",
    on_eval: Callable[[int, EvalResult], None] | None = None,
) -> TrainResult:
    """Train with the shared recipe and keep the checkpoint with the best validation accuracy (never test).

    Steps = min(epochs · ⌈n / batch⌉, max_steps). Validation runs every ``eval_every`` steps and after the last step;
    the initial weights are not a candidate, so a method that only hurts shows up as worse than where it started.
    """
    if not train_sequences:
        raise ValueError(f"{desc}: nothing to train on")
    steps_per_epoch = math.ceil(len(train_sequences) / config.batch_size)
    total = epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=config.learning_rate, weight_decay=config.weight_decay)
    model.train()
    best: EvalResult | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_step = 0
    history: list[dict[str, float | int]] = []
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step", leave=False)
    with seeded_torch(generator):  # dropout draws only from ``generator``
        while step < total:
            order = torch.randperm(len(train_sequences), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                batch = [train_sequences[i] for i in order[start : start + config.batch_size]]
                loss = sequence_loss(model, batch, pad=pad)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
                if step % config.eval_every == 0 or step == total:
                    result = evaluate(model, validation_sequences, pad=pad, batch_size=config.eval_batch_size)
                    history.append({"step": step, "train_loss": loss.item(), **result.to_dict()})
                    bar.set_postfix(val_acc=f"{result.accuracy:.4f}")
                    if on_eval:
                        on_eval(step, result)
                    if _better(result, best):
                        best, best_step = result, step
                        # only what trains can differ from the start (LoRA: the adapter, not 135 M weights)
                        best_state = {n: p.detach().clone() for n, p in trainable}
                if step == total:
                    break
    bar.close()
    assert best is not None  # total >= 1 and the last step always validates
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(best_state[name])
    logger.info("%s: selected step %d of %d (validation accuracy %.4f)", desc, best_step, total, best.accuracy)
    return TrainResult(selected_step=best_step, selected_validation=best, steps=total, history=history)
