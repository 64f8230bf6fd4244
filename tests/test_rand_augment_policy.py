"""RandAugment draws its ops as timm's ``rand-m7-n4-mstd0.5-inc1`` and the official EVL code
do: N ops uniformly *with* replacement, each applied with probability 0.5.

The plans the loader draws are counted (no pixels touched), so thousands of clips cost
milliseconds; the observed op-count distribution is compared with the exact one.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np

from evl_platform.data.rand_augment import OP_NAMES, OPS, SKIP, draw_plan

CLIPS = 6000
NUM_OPS = 4


def _applied_ops() -> list[list[str]]:
    """The ops each of CLIPS clips gets, in order: the plans the loader draws (drawing is
    all of the policy; the kernels only apply what was drawn)."""
    rng = np.random.default_rng(0)
    plans = [draw_plan((7, NUM_OPS), flip=False, rng=rng) for _ in range(CLIPS)]
    return [[OP_NAMES[int(op)] for op in plan[:, 0] if op != SKIP] for plan in plans]


def _exact_repeat_probability(num_ops: int, num_kinds: int) -> float:
    """P(an op is applied twice to one clip): k of the N draws applied (binomial, p=0.5),
    each a uniform draw of one of ``num_kinds`` ops, with replacement."""
    total = 0.0
    for k in range(num_ops + 1):
        p_k = math.comb(num_ops, k) / 2**num_ops
        distinct = math.prod((num_kinds - i) / num_kinds for i in range(k))
        total += p_k * (1 - distinct)
    return total


def test_ops_are_drawn_with_replacement() -> None:
    per_clip = _applied_ops()
    kinds = len(OPS)
    expected = _exact_repeat_probability(NUM_OPS, kinds)  # 0.095 for 4 of 15 ops
    repeated = np.mean([len(set(ops)) < len(ops) for ops in per_clip])
    tolerance = 4 * math.sqrt(expected * (1 - expected) / CLIPS)  # 4 standard errors
    assert abs(repeated - expected) < tolerance, (repeated, expected)  # distinct draws: 0

    applied = Counter(len(ops) for ops in per_clip)  # Binomial(4, 0.5) ops applied per clip
    for k in range(NUM_OPS + 1):
        p = math.comb(NUM_OPS, k) / 2**NUM_OPS
        assert abs(applied[k] / CLIPS - p) < 4 * math.sqrt(p * (1 - p) / CLIPS), (k, applied)

    counts = Counter(itertools.chain.from_iterable(per_clip))  # every op equally likely
    assert set(counts) == set(OPS)
    mean = CLIPS * NUM_OPS * 0.5 / kinds
    assert all(abs(n - mean) < 5 * math.sqrt(mean) for n in counts.values()), counts


def test_the_exact_distribution_matches_timm_sampling() -> None:
    """The formula above against timm's own draw (``np.random.choice`` with replacement)."""
    rng = np.random.default_rng(1)
    draws = rng.choice(15, size=(20000, NUM_OPS), replace=True)
    kept = rng.random((20000, NUM_OPS)) < 0.5
    repeated = np.mean([len(set(d[k])) < k.sum() for d, k in zip(draws, kept, strict=True)])
    assert abs(repeated - _exact_repeat_probability(NUM_OPS, 15)) < 0.01
