"""What the device-agent benchmarks print about the machine, and the thread settings they run under.

Speed figures depend on the CPU (docs/benchmarks.md: int8 kernels differ between AVX2 and
AVX-512 VNNI machines of the same kind), so every benchmark prints the CPU model and flags
beside its numbers. ``single_thread_env`` sets what ``make test`` sets, for this process and
every child it starts (agents, validation children, load generators).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "sha_ni")
THREAD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def cpu() -> tuple[str, list[str]]:
    """The CPU model name and which of ``FLAGS`` it has (from /proc/cpuinfo)."""
    model, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model or platform.processor() or "unknown", [f for f in FLAGS if f in flags]


def describe() -> str:
    """One line: CPU model, cores, flags, Python."""
    model, flags = cpu()
    return (
        f"{model}, {os.cpu_count()} CPUs, flags {' '.join(flags) or '(none of ' + ' '.join(FLAGS) + ')'}; "
        f"Python {sys.version.split()[0]}"
    )


def single_thread_env() -> dict[str, str]:
    """Set ``make test``'s thread and offline variables where unset (children inherit them); return them."""
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in THREAD_ENV}
