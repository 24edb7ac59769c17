"""A fake forward pass and a batch queue around it, for the batching rules' tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


class FakeCompute:
    """Forward pass ``2 x`` recording the batch sizes it saw."""

    def __init__(self):
        self.sizes = []

    def __call__(self, x, f):
        self.sizes.append(len(x))
        n = len(x)
        return x * 2, np.zeros(n, bool), np.zeros(n, np.int64)


def make_batcher(compute, traffic, **kw):
    """A :class:`service.batching.Batcher` attached to ``traffic`` (call on the loop)."""
    from service.batching import Batcher

    args = dict(max_size=8, max_delay_s=0.05, max_queue_samples=100, inline_max_values=10_000)
    b = Batcher(compute, traffic, ThreadPoolExecutor(1), **(args | kw))
    b.attach()
    return b
