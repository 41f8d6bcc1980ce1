"""What the processor offers for speed choices: its cores and native bf16 instruction sets.

This module owns reading them (Linux's /proc/cpuinfo flags; elsewhere nothing is known), so a
benchmark can say what it ran on and training can tell whether bf16 autocast on the CPU will
be fast (AVX-512 bf16 or AMX: about twice fp32 here) or much slower than fp32 (emulated).
"""
import os

__all__ = ["cpu_flags", "native_bf16", "usable_cores"]


def cpu_flags(path="/proc/cpuinfo"):
    """The set of flags the first processor lists; empty where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags=None):
    """{"avx512_bf16": bool, "amx_bf16": bool} for this processor (or the given flags)."""
    flags = cpu_flags() if flags is None else flags
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def usable_cores():
    """The cores this process may run on (its affinity on Linux, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
