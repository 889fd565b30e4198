"""Profile one DPO step of a default round: where the seconds go, and what `torch.compile` would change.

    .venv/bin/python scripts/profile_dpo_step.py [--precision bf16] [--steps 3] [--profile] [--compile-mlp]

The pairs are those of `popri perf` (popri's own samples of its default prompts; `--perf-output DIR` reuses a
harness run's samples, otherwise they are generated first, ~20 s). It prints the reference pass and the median of
`--steps` rounds of optimizer steps on two 4-pair batches. `--profile` adds torch.profiler's table of one step
(self CPU time).
`--compile-mlp` then compiles each layer's MLP and norms (`dynamic=True`) and times the compile and the same steps on
the same two batches (their shapes differ, as in a round). docs/perf.md reports what it measured.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.perf.inputs import load_default_assets, perf_prompts, popri_samples, preference_pairs, saved_samples
from benchmark.perf.schema import PerfSizes
from popri.config import TrainConfig
from popri.dpo import LoraDPO, tokenize_pair


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="the frozen base's precision")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median printed)")
    parser.add_argument("--perf-output", type=Path, help="a `popri perf --output` folder whose samples to reuse")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step")
    parser.add_argument("--compile-mlp", action="store_true", help="also time steps with compiled MLPs and norms")
    args = parser.parse_args()

    sizes = PerfSizes()
    assets = load_default_assets(cache_dir=None, cache_users=20, seed=0)
    prompts = perf_prompts(assets, sizes, seed=0)
    samples = saved_samples(args.perf_output, prompts, sizes, seed=0) if args.perf_output else None
    samples = samples or popri_samples(assets, prompts, sizes, seed=0)
    pairs = [tokenize_pair(assets.tokenizer, p) for p in preference_pairs(prompts, samples, sizes, seed=0)]
    b = sizes.dpo_batch
    batches = [pairs[0:b], pairs[b : 2 * b]]

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    dpo = LoraDPO(copy.deepcopy(assets.model).to(dtype), assets.tokenizer, config=TrainConfig(precision=args.precision))
    refs = [dpo.reference_logps(b) for b in batches]
    dpo.step(batches[0], refs[0])  # warm-up
    print(f"reference pass, 4 pairs: {_timed(lambda: dpo.reference_logps(batches[0])):.3f} s")
    work = list(zip(batches, refs, strict=True))

    def run_steps(rounds: int) -> list[float]:
        return [_timed(lambda b=b, r=r: dpo.step(b, r)) for _ in range(rounds) for b, r in work]

    steps = run_steps(args.steps)
    print(f"steps, 4 pairs ({args.precision} base): median {statistics.median(steps):.3f} s of {np.round(steps, 3)}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dpo.step(batches[0], refs[0])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    if args.compile_mlp:
        for layer in dpo.policy.get_base_model().model.layers:
            for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                module.compile(dynamic=True)
        first = run_steps(1)
        print(f"compiled: first step {first[0]:.1f} s, first step of a new shape {first[1]:.1f} s")
        compiled = run_steps(args.steps)
        print(f"compiled steps: median {statistics.median(compiled):.3f} s of {np.round(compiled, 3)}")


if __name__ == "__main__":
    main()
