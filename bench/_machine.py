"""The `machine:` line every benchmark prints: CPU model, threads, bf16 instructions, torch."""

import platform
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
