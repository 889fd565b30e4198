"""perf.json and perf.md: the harness's results, dated by the time and the source commit they were measured at.

``popri perf --output docs/results/perf`` refreshes the published pages; any other folder keeps a private copy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from popri.checkpoint import atomic_write_json, atomic_write_text

_REPO = Path(__file__).resolve().parents[2]


def source_commit(repo: Path = _REPO) -> str:
    """The commit the harness ran from (short hash, ``+dirty`` when tracked files differ), or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_report(output: Path, result: dict[str, Any]) -> None:
    """``output/perf.json`` (everything measured), ``output/perf.md`` (:func:`render_markdown`) and, when perf.json
    has a ``growth`` section, its plots beside them (:func:`benchmark.perf.growth.write_growth_plots`)."""
    atomic_write_json(output / "perf.json", result)
    if result.get("growth"):
        from benchmark.perf.growth import write_growth_plots

        write_growth_plots(output, result["growth"])
    atomic_write_text(output / "perf.md", render_markdown(result))


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def render_markdown(result: dict[str, Any]) -> str:
    """perf.md: the comparisons, the round's stages, the cache check, communication, corpus sampling, how cost
    grows, the machine."""
    m = result["machine"]
    lines = [
        "# popri performance" + (" (--quick)" if result["quick"] else ""),
        "",
        f"Measured {result['date']} at commit {result.get('commit', 'unknown')} on {m['processor']} "
        f"({m['cpu_count']} CPUs, flags {' '.join(m.get('cpu_flags', [])) or '?'}, torch threads "
        f"{m['torch_threads']}, device {m['device']}; load average at start {m.get('load_average_at_start', '?')}). "
        f"Models: {result['models']}.",
        "Each comparison runs popri and its peer in this one process, interleaved (A B B A ...); times are medians.",
        "ratio = peer_s / popri_s (above 1: popri faster).",
        "",
        "| comparison | popri s | peer | peer s | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for row in result["comparisons"]:
        if row.get("measured") is False:
            lines.append(f"| {row['name']} | - | not measured: {row['why']} | - | - | - | - |")
            continue
        target = row.get("target")
        met = "-" if target is None or row.get("ratio") is None else ("yes" if row["ratio"] >= target else "NO")
        lines.append(
            f"| {row['name']} | {_fmt(row['popri_s'])} | {row['peer']} | {_fmt(row['peer_s'])} | "
            f"{_fmt(row['ratio'])} | {_fmt(target)} | {met} |"
        )
        if row["name"].startswith("generation") and "popri_detail" in row:
            p, q = row["popri_detail"], row["peer_detail"]
            notes.append(
                f"- {row['name']}: {row['samples']} samples ({row['prompts']} prompts of "
                f"{row.get('prompt_tokens_mean', '?')} tokens x {row['samples_per_prompt']}), "
                f"<= {row['max_new_tokens']} new tokens. popri {p['tokens_per_s']} tokens/s "
                f"({p['tokens_per_sample']} tokens/sample kept; {100 * p['fraction_of_fp32_peak']:.1f} % of the fp32 "
                f"matmul peak, {100 * p.get('fraction_of_bf16_peak', 0):.1f} % of the bf16 one); peer "
                f"{q['tokens_per_s']} tokens/s ({q['tokens_per_sample']} tokens/sample, "
                f"{100 * q['fraction_of_fp32_peak']:.1f} % of peak). {row['parameters']:,} parameters."
            )
        if row["name"] == "scoring" and "users" in row:
            notes.append(
                f"- scoring: {row['users']} users, {row['private_texts']:,} private embeddings, {row['samples']} "
                f"samples; largest difference between the two score sums {row['max_abs_difference']:.2e}; "
                f"popri's one-off per-user sums {row['user_sums_once_s']} s."
            )
        if row["name"].startswith("dpo") and "steps" in row:
            notes.append(
                f"- {row['name']}: {row['pairs']} pairs, batch {row['batch']}, {row['steps']} steps; popri base in "
                f"{row['popri_precision']}; TRL bf16={row['trl_bf16']}, gradient checkpointing="
                f"{row['trl_gradient_checkpointing']}, TRL setup outside the timing {row['trl_setup_s']} s."
            )
    fs = result.get("dpo_first_step_fp32")
    if fs:
        notes.append(
            f"- Step-1 DPO loss on a float32 config ({fs['pairs']} pairs, the same nonzero adapter): popri "
            f"{fs['popri_loss']:.7f}, TRL {fs['trl_loss']:.7f}, |diff| {fs['abs_difference']:.1e} "
            f"({'within' if fs['match_1e-5'] else 'NOT within'} 1e-5)."
        )
    lines += ["", *notes]
    peers = result.get("peers") or {}
    if peers:
        lines += ["", "## Peers", "", "| peer | available | version | why not / interpreter |", "|---|---|---|---|"]
        for name, p in sorted(peers.items()):
            where = p.get("python", "") if p.get("available") else p.get("why", "")
            lines.append(f"| {name} | {'yes' if p.get('available') else 'no'} | {p.get('version', '-')} | {where} |")
    peak = result["matmul_peak_gflops"]
    lines += [
        "",
        f"Matmul peak measured in this run (1024 x 1024, best of ~0.5 s): float32 {peak['float32']} GFLOP/s "
        f"(again at the end: {peak.get('float32_after', '-')}), bfloat16 {peak['bfloat16']} GFLOP/s.",
    ]
    ab = (result.get("ablations") or {}).get("shared_prompt_dpo")
    if ab:
        lines += [
            "",
            f"Ablation, shared-prompt DPO forward ({ab['what']}; {ab['pairs']} pairs, {ab['row_tokens_full']} -> "
            f"{ab['row_tokens_shared']} tokens): {ab['full_s']} s -> {ab['shared_s']} s, x{ab['speedup']}"
            + (
                f"; with LoraDPO's kernels {ab['kernels_s']} s, x{ab['speedup_with_kernels']}; "
                if "kernels_s" in ab
                else "; "
            )
            + f"largest log-prob difference in float32 {ab['max_abs_logp_difference_fp32']:.1e}.",
        ]
    tc = result.get("threads_check")
    if tc:
        by = ", ".join(f"{n} thread(s) {t} s" for n, t in tc["median_s_by_threads"].items())
        lines += ["", f"Threads check ({tc['what']}, medians, load average {tc.get('load_average', '?')}): {by}."]
    stages = result.get("stages") or {}
    if stages:
        lines += [
            "",
            f"## One round (K={stages['prompts']}, J={stages['samples_per_prompt']}, "
            f"{stages['max_new_tokens']} new tokens, {stages['users']} users, {stages['pairs']} pairs, "
            f"DPO base in {stages['precision']})",
            "",
            "| stage | seconds |",
            "|---|---|",
            f"| setup (load models, initial set) | {stages['setup_s']} |",
            f"| node setup (private embedding sums, cached on disk) | {stages['node_setup_s']} |",
            *[f"| {k} | {v} |" for k, v in stages["seconds"].items()],
            f"| round total | {stages['round_s']} |",
            "",
            f"Peak resident memory {stages['peak_rss_mib']} MiB"
            + (f", peak CUDA memory {stages['peak_cuda_mib']} MiB" if "peak_cuda_mib" in stages else "")
            + " (the whole harness process up to the end of the round).",
        ]
    lines += embedding_cache_markdown(result.get("embedding_cache") or {})
    comm = result.get("communication")
    if comm:
        p, pp, f = comm["popri"], comm["popri_paper_size"], comm["dpfedavg"]
        lines += [
            "",
            "## Communication per client per round",
            "",
            "| method | down | up |",
            "|---|---|---|",
            f"| POPri K={p['prompts']}, J={p['samples_per_prompt']} | {_mib(p['down_bytes'])} ({p['down']}) | "
            f"{_mib(p['up_bytes'])} ({p['up']}) |",
            f"| POPri paper size K=1800, J=10 | {_mib(pp['down_bytes'])} | {_mib(pp['up_bytes'])} |",
            f"| DP-FedAvg, {f['model']}, {f['parameters']:,} parameters | {_mib(f['down_bytes'])} | "
            f"{_mib(f['up_bytes'])} |",
            "",
            f"DP-FedAvg / POPri: down x{comm['ratio_down_dpfedavg_over_popri']}, "
            f"up x{comm['ratio_up_dpfedavg_over_popri']}, total x{comm['ratio_total_dpfedavg_over_popri']}.",
        ]
    corpus = result.get("corpus")
    if corpus:
        from benchmark.perf.corpus import corpus_markdown

        lines += corpus_markdown(corpus)
    growth = result.get("growth")
    if growth:
        from benchmark.perf.growth import growth_markdown

        lines += growth_markdown(growth)
    return "\n".join(lines) + "\n"


def embedding_cache_markdown(cache: dict[str, Any]) -> list[str]:
    """perf.md's "Private embedding" section: the first and second ``cached_user_sums`` in fp32 and bf16, and how
    far bf16 moves a node's clipped sum against the DP noise."""
    if not cache.get("precisions"):
        return []
    lines = [
        "",
        "## Private embedding",
        "",
        f"`cached_user_sums` on {cache['users']} users' {cache['private_texts']} texts, a fresh cache per precision: "
        "the first call embeds (once per run and node), the second reads the disk (every later round).",
        "",
        "| embedder weights | first call s | texts/s | texts embedded | second call s | texts embedded |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in cache["precisions"].items():
        lines.append(
            f"| {name} | {row['first_call_s']} | {row['embedded_per_s']} | {row['first_call_embedded_texts']} | "
            f"{row['second_call_s']} | {row['second_call_embedded_texts']} |"
        )
    agree = cache["agreement"]
    lines += [
        "",
        f"bf16 / fp32: ×{cache['bf16_speedup']} on the first call. bf16 moves the node's clipped score sum by "
        f"{agree['score_shift_sd']} (standard deviation over the samples), {agree['shift_over_noise']}× the DP "
        f"noise of a default run (σ = {agree['default_noise_sd']}); chosen and rejected samples unchanged in "
        f"{agree['same_pairs']} J-groups without noise. The shift grows with the users a node holds (about as "
        "their square root), the noise does not.",
    ]
    return lines
