"""The `machine:` line every benchmark prints (CPU model, threads, bf16 instructions, torch), and
the matrix-product rate that benchmarks divide a work count by to get a floor."""

import platform
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_instructions() -> str:
    """Which bf16 instruction sets the CPU has: bf16 matmuls on CPU are fast only with these."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ",".join(found) if found else "none"


def machine_line(threads: int) -> str:
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu_model()} ({platform.machine()}), {threads} threads, bf16 instructions: "
            f"{bf16_instructions()}{gpu}, torch {torch.__version__}")


def gemm_rate(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matrix product on CPU, best of repeats after one warm-up.

    The floor of a model's pass is its operation count over this rate: what the pass would
    take if every operation ran at the speed of the machine's best matrix product."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        torch.matmul(a, b)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
