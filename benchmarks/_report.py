"""Shared by the benchmark scripts: machine description and per-section updates of docs/benchmarks.md.

Each script owns one section, delimited by ``<!-- BEGIN name -->`` / ``<!-- END name -->``; rerunning a script
replaces its section only. Speed targets are ratios against a baseline measured in the same process.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Callable

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nEach section is written by one script in `benchmarks/` (`make bench` runs them all). Targets are"
    " ratios against a baseline run in the same process, so they transfer across machines; absolute times are for"
    " the machine named in the section.\n"
)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def write_section(name: str, markdown: str) -> Path:
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n{markdown.rstrip()}\n\n_Machine: {machine()}; {time.strftime('%Y-%m-%d')}._\n<!-- END {name} -->"
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return DOC
