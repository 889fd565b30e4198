"""LoRA DPO on the server (step 6): sigmoid loss, reference = the base model with the adapter disabled.

One LoRA adapter lives on the frozen base model for the whole run; its weights and the AdamW state carry over
between rounds (and through checkpoints), so the reference stays the original base model, as in the paper.
Tokenisation follows TRL's ``DPOTrainer`` for plain-text pairs (EOS appended to each completion, the prompt split at
the common prefix of the tokenised prompt and prompt+completion), so a step here and a step there agree; the
``completion-end`` key can end completions with the next sample header instead (:func:`completion_end`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from popri.config import COMPLETION_ENDS, TrainConfig
from popri.generation import next_sample_header
from popri.preferences import PreferencePair

logger = logging.getLogger(__name__)

REFERENCE_CHUNK = 8  # pairs per reference forward (no gradients, so larger batches fit; measured in docs/perf.md)


def dpo_sigmoid_loss(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    length_penalty: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and implicit rewards (Rafailov et al. 2023, eq. 7; TRL ``loss_type="sigmoid"``).

    loss = −log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))] + α(|y_w| − |y_l|))
    rewards: r_w = β(log π(y_w|x) − log π_ref(y_w|x)), r_l likewise. Returns (losses, chosen_rewards, rejected_rewards).

    α = ``length_penalty`` (0: plain DPO) with |y| the completion lengths in tokens is R-DPO (Park, Rafailov, Ermon,
    Finn 2024, "Disentangling Length from Quality in Direct Preference Optimization", eq. 9): the reward the policy
    learns is penalised by α per token, so a preference that length alone explains is not learned.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    if length_penalty:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("a length penalty needs the chosen and rejected completion lengths")
        logits = logits + length_penalty * (chosen_lengths - rejected_lengths).to(logits.dtype)
    losses = -F.logsigmoid(logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(x_t | x_<t) over completion tokens. logits (B, T, V); input_ids, completion_mask (B, T) -> (B,)."""
    logps = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * completion_mask[:, 1:]).sum(-1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def completion_end(tokenizer: Any, prompt: str, *, kind: str) -> str:
    """The text that ends a completion of ``prompt`` in DPO (:attr:`popri.config.TrainConfig.completion_end`).

    ``eos``: the tokenizer's EOS, as TRL (and the paper's code) append it. ``header``: a newline and the next sample's
    header, which is where the sampler stops; then DPO trains the very decision that sets a sample's length, whereas
    an EOS the sampler never emits at that point leaves it untrained.
    """
    if kind == "eos":
        return str(tokenizer.eos_token)
    if kind == "header":
        return "\n" + next_sample_header(prompt)
    raise ValueError(f"unknown completion end {kind!r}; use {', '.join(COMPLETION_ENDS)}")


def tokenize_pair(tokenizer: Any, pair: PreferencePair, *, end: str | None = None) -> TokenizedPair:
    """Token ids as TRL's DPOTrainer builds them for a non-conversational pair; ``end`` (EOS when None) is appended to
    each completion that does not already end with it."""
    end = tokenizer.eos_token if end is None else end
    chosen = pair.chosen if pair.chosen.endswith(end) else pair.chosen + end
    rejected = pair.rejected if pair.rejected.endswith(end) else pair.rejected + end
    prompt_ids = tokenizer(pair.prompt)["input_ids"]
    prompt_chosen = tokenizer(pair.prompt + chosen)["input_ids"]
    prompt_rejected = tokenizer(pair.prompt + rejected)["input_ids"]
    n = min(_common_prefix(prompt_ids, prompt_chosen), _common_prefix(prompt_ids, prompt_rejected))
    return TokenizedPair(prompt_ids[:n], prompt_chosen[n:], prompt_rejected[n:])


def collate(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B], each prompt+completion flush left, padded right."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, plen) in enumerate(zip(rows, prompt_lens, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, plen : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def full_row_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ log p(completion | prompt) per row of :func:`collate`'s batch: TRL's layout, each row prompt + completion."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"])


def head_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask_t · log softmax(head(hidden_t))[targets_t] per row; hidden (B, T, H), targets and mask (B, T) -> (B,).

    The output layer and the float32 log-softmax run only at the scored positions: over a ~49k vocabulary they cost
    as much as a fifth of the network per token, and padding is a good share of a batch's positions.
    """
    rows, cols = mask.nonzero(as_tuple=True)
    logits = head(hidden[rows, cols]).float()
    token_logps = -F.cross_entropy(logits, targets[rows, cols], reduction="none")
    return torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=hidden.device).index_add(0, rows, token_logps)


def shared_prompt_logps(model: Any, pairs: list[TokenizedPair], pad_id: int) -> torch.Tensor:
    """Σ log p(completion | prompt) of rows [chosen_1..B, rejected_1..B], as :func:`full_row_logps` on :func:`collate`.

    Chosen and rejected share their prompt, which is most of each row (~150 of ~185 tokens in a default round), so
    each prompt runs once: left-padded, with gradients flowing through its KV cache into the LoRA weights. The cache
    is repeated for the two completions, which then run on it, right-padded. The first completion token is scored
    from the prompt pass's last hidden state; no other prompt position reaches the output layer (:func:`head_logps`).
    """
    device = next(model.parameters()).device
    if any(not p.prompt_ids for p in pairs):  # nothing to share
        return full_row_logps(model, {k: v.to(device) for k, v in collate(pairs, pad_id).items()})
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    b = len(pairs)
    width = max(len(p.prompt_ids) for p in pairs)
    prompt = torch.full((b, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(pairs):
        prompt[i, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
        prompt_mask[i, width - len(p.prompt_ids) :] = 1
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    out = decoder(
        input_ids=prompt,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # rows: chosen_1, rejected_1, chosen_2, ... (differentiable)
    completions = [c for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    width_c = max(len(c) for c in completions)
    ids = torch.full((2 * b, width_c), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((2 * b, width_c), dtype=torch.long)
    for j, c in enumerate(completions):
        ids[j, : len(c)] = torch.tensor(c)
        completion_mask[j, : len(c)] = 1
    ids, completion_mask = ids.to(device), completion_mask.to(device)
    prompt_lens = prompt_mask.sum(-1).repeat_interleave(2)
    out_c = decoder(
        input_ids=ids,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(2, dim=0), completion_mask], dim=1),
        position_ids=prompt_lens[:, None] + torch.arange(width_c, device=device)[None],
        cache=cache,
        use_cache=True,
    )
    # The hidden state before each completion token: the prompt's last, then the completion's own but the last.
    hidden = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(2, dim=0), out_c.last_hidden_state[:, :-1]], 1)
    rows = head_logps(head, hidden, ids, completion_mask)
    return torch.cat([rows[0::2], rows[1::2]])


@contextlib.contextmanager
def _attention(model: Any, implementation: str) -> Iterator[None]:
    """Run ``model`` with another attention implementation for the duration (transformers' dynamic switch)."""
    before = model.config._attn_implementation
    if before == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def lora_config(*, r: int, alpha: int, dropout: float = 0.0, target_modules: str | list[str] = "all-linear") -> Any:
    """The peft ``LoraConfig`` every LoRA in the project uses: rank ``r``, scale ``alpha / r``, no bias, causal LM.

    ``target_modules="all-linear"`` puts an adapter on every attention and MLP projection (the output layer
    excluded), as the paper does (r=16, alpha=16). The policy here, TRL's peer in the perf harness and the benchmark's
    pretrained-LoRA downstream all build theirs with this function, so they cannot drift apart.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


class LoraDPO:
    """A LoRA adapter on a frozen base model, trained round after round with DPO.

    ``policy`` is a peft model; the base weights never change. ``state_dict`` holds the adapter and the optimizer,
    which is everything a checkpoint needs to continue training exactly.
    """

    def __init__(self, base_model: Any, tokenizer: Any, *, config: TrainConfig) -> None:
        from peft import get_peft_model

        self.config = config
        self.tokenizer = tokenizer
        self.policy = get_peft_model(base_model, lora_config(r=config.lora_r, alpha=config.lora_alpha))
        self.policy.eval()  # no dropout: policy and reference see the same deterministic network
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad], lr=config.learning_rate
        )
        self.steps_done = 0
        self._base_dtype = next(p.dtype for p in self.policy.parameters() if not p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _logps(self, pairs: list[TokenizedPair]) -> torch.Tensor:
        """log π of rows [chosen_1..B, rejected_1..B] (:func:`shared_prompt_logps`)."""
        with self._kernels():
            return shared_prompt_logps(self.policy, pairs, self.tokenizer.pad_token_id)

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        """The fastest numerics that keep the base's precision, measured on a default DPO step (docs/perf.md).

        A half-precision base runs under autocast and the LoRA branch takes the activations as they are: peft would
        otherwise cast every activation to float32 and back in all 210 LoRA layers (the float32 adapter weights and
        their gradients stay float32; the matmuls run in the base's precision, as TRL's ``bf16=True`` does). With a
        backward on the CPU, attention runs eagerly: torch's CPU flash-attention backward took ~9 ms a layer where
        eager matmuls take a fraction, so a step is 10-15 % faster; without gradients, SDPA is the faster one.
        """
        dtype = self._base_dtype
        with contextlib.ExitStack() as stack:
            if dtype in (torch.bfloat16, torch.float16):
                from peft.helpers import disable_input_dtype_casting

                stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
                stack.enter_context(disable_input_dtype_casting(self.policy))
            if torch.is_grad_enabled() and self.device.type == "cpu":
                stack.enter_context(_attention(self.policy.get_base_model(), "eager"))
            yield

    @torch.no_grad()
    def reference_logps(self, pairs: list[TokenizedPair]) -> torch.Tensor:
        """log π_ref of every row: the same network with the adapter disabled, i.e. the original base model."""
        with self.policy.disable_adapter():
            return self._logps(pairs)

    def step(self, pairs: list[TokenizedPair], ref_logps: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on a batch of pairs; returns the loss and reward metrics of that batch."""
        if ref_logps is None:
            ref_logps = self.reference_logps(pairs)
        n = len(pairs)
        logps = self._logps(pairs)
        losses, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(
            policy_chosen_logps=logps[:n],
            policy_rejected_logps=logps[n:],
            ref_chosen_logps=ref_logps[:n],
            ref_rejected_logps=ref_logps[n:],
            beta=self.config.beta,
            length_penalty=self.config.length_penalty,
            chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs], device=logps.device),
            rejected_lengths=torch.tensor([len(p.rejected_ids) for p in pairs], device=logps.device),
        )
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        margins = chosen_rewards - rejected_rewards
        return {
            "loss": float(loss.detach()),
            "rewards_chosen": float(chosen_rewards.mean()),
            "rewards_rejected": float(rejected_rewards.mean()),
            "rewards_margin": float(margins.mean()),
            "rewards_accuracy": float((margins > 0).float().mean()),
        }

    def train_round(
        self, pairs: list[PreferencePair], *, rng: np.random.Generator, progress: bool = False
    ) -> dict[str, float]:
        """``config.epochs`` passes over the round's pairs in shuffled batches; metrics averaged over steps.

        Reference log-probs are computed once per pair up front (the reference never changes), which saves a
        forward pass per step.
        """
        kind = self.config.completion_end
        tokenized = [
            tokenize_pair(self.tokenizer, p, end=completion_end(self.tokenizer, p.prompt, kind=kind)) for p in pairs
        ]
        bs = self.config.batch_size
        ref: dict[int, tuple[float, float]] = {}
        # Any grouping gives the same values; pairs of similar prompt length waste the least padding.
        by_length = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].prompt_ids))
        for start in range(0, len(by_length), REFERENCE_CHUNK):
            idx = by_length[start : start + REFERENCE_CHUNK]
            logps = self.reference_logps([tokenized[i] for i in idx]).cpu()
            for k, i in enumerate(idx):
                ref[i] = (float(logps[k]), float(logps[len(idx) + k]))
        history: list[dict[str, float]] = []
        total = self.config.epochs * ((len(tokenized) + bs - 1) // bs)
        with tqdm(total=total, desc="dpo", disable=not progress or total <= 1, unit="step", leave=False) as bar:
            for _ in range(self.config.epochs):
                order = rng.permutation(len(tokenized))
                for start in range(0, len(order), bs):
                    idx = [int(i) for i in order[start : start + bs]]
                    ref_logps = torch.tensor([ref[i][0] for i in idx] + [ref[i][1] for i in idx], device=self.device)
                    history.append(self.step([tokenized[i] for i in idx], ref_logps))
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        return {k: float(np.mean([h[k] for h in history])) for k in history[0]} if history else {}

    def generation_model(self, dtype: torch.dtype | None = None) -> Any:
        """A standalone copy of base + adapter with the LoRA merged in, for fast sampling (optionally cast)."""
        merged = copy.deepcopy(self.policy).merge_and_unload()
        merged.eval()
        return merged.to(dtype) if dtype is not None else merged

    def save_adapter(self, directory: Path) -> Path:
        """The adapter alone in peft's format (adapter_config.json, safetensors), e.g. for a vLLM engine.

        Written into a temporary folder that replaces ``directory`` whole: a crash leaves the old adapter or none.
        """
        from popri.checkpoint import atomic_dir

        with atomic_dir(Path(directory)) as tmp:
            self.policy.save_pretrained(str(tmp))
        return directory

    def state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {
            "adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.policy).items()},
            "optimizer": self.optimizer.state_dict(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.policy, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
