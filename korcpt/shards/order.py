"""The order of an epoch: a permutation of ``range(n)`` that is a pure function of (seed, epoch, n).

It is computed here, not drawn from numpy's or torch's generators, so that it cannot change with a
library upgrade (numpy does not promise stable streams across versions) and so that any position can
be mapped to its sequence without materialising the whole permutation: position ``p`` of epoch ``e``
is sequence ``permute(p)``, where ``permute`` is a keyed Feistel network over the smallest even
number of bits that covers ``n``, with cycle-walking (re-apply until the value falls below ``n``;
a bijection of a bigger domain restricted this way stays a bijection of ``range(n)``).

Nothing here depends on the number of ranks or workers: those only decide who reads which position.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic is intended)."""
    z = x + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _round_keys(seed: int, epoch: int, n: int) -> list[np.uint64]:
    digest = hashlib.blake2b(f"korcpt-order:{seed}:{epoch}:{n}".encode(), digest_size=8 * _ROUNDS).digest()
    return [np.uint64(int.from_bytes(digest[8 * i: 8 * i + 8], "little")) for i in range(_ROUNDS)]


def permute(positions: np.ndarray | int, seed: int, epoch: int, n: int) -> np.ndarray:
    """The sequences at ``positions`` of epoch ``epoch``'s order over ``n`` sequences.

    Args:
        positions: integers in ``[0, n)`` (an array or a single int).
        seed: the run's seed.
        epoch: the epoch (0-based); each epoch has its own order.
        n: number of sequences.

    Returns:
        An int64 array shaped like ``positions``; over ``positions = range(n)`` it is a permutation.

    Example:
        ``permute(np.arange(5), seed=0, epoch=0, n=5)`` -> ``[0, 4, 1, 2, 3]``; epoch 1 gives another
        permutation; the same call always gives the same answer, on any machine or numpy version.
    """
    pos = np.asarray(positions, dtype=np.int64)
    if n < 1:
        raise ValueError(f"n must be >= 1, found {n}")
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in [0, {n}), found [{pos.min()}, {pos.max()}]")
    if n == 1:
        return np.zeros_like(pos)
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 2**(2*half) >= n, under 4n
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = _round_keys(seed, epoch, n)
    x = pos.astype(np.uint64).ravel()
    out = np.empty_like(x)
    todo = np.arange(x.size)
    with np.errstate(over="ignore"):
        while todo.size:
            left, right = x[todo] >> shift, x[todo] & mask
            for key in keys:
                left, right = right, left ^ (_mix(right ^ key) & mask)
            y = (left << shift) | right
            done = y < np.uint64(n)
            out[todo[done]] = y[done]
            x[todo[~done]] = y[~done]  # cycle-walk: encrypt again until inside range(n)
            todo = todo[~done]
    return out.astype(np.int64).reshape(pos.shape)


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """The whole order of an epoch: ``permute(arange(n))``, or ``arange(n)`` without shuffling."""
    positions = np.arange(n, dtype=np.int64)
    return permute(positions, seed, epoch, n) if shuffle and n > 0 else positions
