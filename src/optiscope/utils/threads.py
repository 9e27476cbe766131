"""Temporarily limit the number of compute threads (torch intra-op, optionally BLAS via threadpoolctl).

Small models and matrices gain nothing from extra threads, and on a shared or oversubscribed machine spinning
worker threads made such work 4-50x slower (docs/benchmarks.md, sections "init" and "sgd_theory").
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def limit_threads(n: int = 1, blas: bool = False) -> Iterator[None]:
    """Run the block with ``n`` torch threads (and ``n`` BLAS threads if ``blas``), then restore the previous count.
    ``n < 1`` leaves the thread counts unchanged."""
    import torch

    prev = torch.get_num_threads()
    if n >= 1 and n != prev:
        torch.set_num_threads(n)
    try:
        if blas and n >= 1:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=n):
                yield
        else:
            yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)
