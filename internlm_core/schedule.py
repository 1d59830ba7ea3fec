"""What a fine-tuning run does at each step, as pure functions of the step number: the learning
rate (linear warmup, then cosine), the data order (one seeded permutation per epoch, laid end to
end) and the evaluation hold-out. Being pure is what makes a resumed run replay exactly."""
from __future__ import annotations

import functools
import math

import numpy as np


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to peak*min_ratio."""
    warmup = int(round(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(micro: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Row indices of global micro-batch ``micro``: the data stream is one seeded permutation
    per epoch laid end to end, so the position is the micro-batch number alone."""
    out = np.empty(batch, np.int64)
    for j in range(batch):
        g = micro * batch + j
        out[j] = epoch_order(n, g // n, seed)[g % n]
    return out


def split_eval(n: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): a seeded hold-out of ``ratio`` of the rows (at least one row each)."""
    order = np.random.default_rng([seed, 7919]).permutation(n)
    k = min(n - 1, max(1, int(round(n * ratio)))) if ratio > 0 and n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])
