"""How the harness measures: interleaved side-by-side timing, medians, ratios, the machine it ran on.

Every comparison runs popri and its peer in one process on the same inputs, interleaved A, B, B, A, ... so that load
from other processes hits both alike; tables report medians and ``ratio = peer_s / popri_s`` (above 1: popri faster).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The CPU features that decide which kernels torch, llama.cpp, CTranslate2 and OpenVINO pick (from /proc/cpuinfo).
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "neon",
    "asimd",
    "sve",
)


def sig(seconds: float, digits: int = 6) -> float:
    """Round to significant digits, not decimals: sub-millisecond stages keep their precision (and their ratio)."""
    return float(f"{seconds:.{digits}g}")


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall seconds of each run, ``repeats`` times, in the order A B .. B A .. (ABBA), and each run's last result."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
            logger.info("%s: %.3fs", name, times[name][-1])
    return times, results


def comparison(
    name: str, popri_times: list[float], peer: str, peer_times: list[float], *, target: float | None, **extra: Any
) -> dict[str, Any]:
    """One row: medians of both sides, ``ratio = peer_s / popri_s``, every run's seconds and ``extra`` details."""
    popri_s, peer_s = median(popri_times), median(peer_times)
    return {
        "name": name,
        "popri_s": sig(popri_s),
        "peer": peer,
        "peer_s": sig(peer_s),
        "ratio": round(peer_s / popri_s, 2) if popri_s > 0 else None,
        "target": target,
        "popri_runs_s": [round(t, 6) for t in popri_times],
        "peer_runs_s": [round(t, 6) for t in peer_times],
        **extra,
    }


def not_measured(name: str, why: str, **extra: Any) -> dict[str, Any]:
    """A row for a comparison that did not run, saying why (a peer not installed, no GGUF for a tiny model, ...)."""
    return {"name": name, "measured": False, "why": why, **extra}


def device() -> torch.device:
    from popri.assets import best_device

    return best_device()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_gflops(dtype: torch.dtype = torch.float32, *, n: int = 1024, seconds: float = 0.5) -> float:
    """Best sustained GFLOP/s of an n x n matmul in ``dtype`` over ~``seconds`` (2n^3 FLOPs per product)."""
    where = device()
    a = torch.randn(n, n, device=where).to(dtype)
    b = torch.randn(n, n, device=where).to(dtype)
    best = float("inf")
    end = time.perf_counter() + seconds
    while True:
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / 4)
        if time.perf_counter() > end:
            break
    return 2 * n**3 / best / 1e9


def peak_memory_mib() -> dict[str, float]:
    """Peak resident memory of this process so far (and peak CUDA memory where CUDA is used), in MiB."""
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def num_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_tokens(tokenizer: Any, texts: list[str]) -> int:
    return int(sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else 0


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has (x86 ``flags`` or ARM ``Features`` line of /proc/cpuinfo)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith(("flags", "Features")):
            have = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FLAGS if f in have]
    return []


def machine_info() -> dict[str, Any]:
    """The machine a run measured: CPU model and flags, cores, torch threads, device, load average at the start."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device()),
    }
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def when(now: str) -> dict[str, Any]:
    """When and under which conditions a row was measured."""
    out: dict[str, Any] = {"measured_at": now, "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError):
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS at ``n`` threads too (threadpoolctl when available), so popri's numpy scoring runs like torch."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


@contextlib.contextmanager
def timed(into: dict[str, Any], name: str) -> Iterator[None]:
    """``into[name]`` = wall seconds of the block."""
    start = time.perf_counter()
    yield
    into[name] = round(time.perf_counter() - start, 3)
