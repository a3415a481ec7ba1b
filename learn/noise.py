"""Counter-based uniform noise for the gates, in plain integer tensor operations.

``counter_uniform(key, counter, n)`` is a pure function of a 64-bit key, a 64-bit
counter and the index ``0..n-1``: the same numbers on every device and every run, no
generator object (which ``torch.compile`` and ``torch.export`` cannot carry), and a
state of two small tensors that checkpoints and DDP ranks share.  Each value is a
32-bit hash (MurmurHash3's finalizer applied to the key, the counter and the index)
mapped to the open interval ``(0, 1)``.

All arithmetic stays below 2**63 (32-bit products are formed from 16-bit halves), so
no signed overflow happens in any backend.
"""
from __future__ import annotations

import torch

__all__ = ["counter_uniform", "split_seed"]

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` for ``0 <= h, c < 2**32``."""
    return (h * (c & 0xFFFF) + ((h * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def split_seed(seed: int) -> list:
    """A non-negative seed below 2**64 as the two 32-bit halves of a noise key."""
    return [seed & _M32, (seed >> 32) & _M32]


def counter_uniform(key: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` float64 values in ``(0, 1)`` for ``key`` (int64 ``(2,)``, two 32-bit
    halves) and ``counter`` (int64 scalar, ``>= 0``), on ``key``'s device."""
    low, high = counter & _M32, (counter >> 32) & _M32
    state = _mix32((key[0] ^ _mix32(low)) & _M32)
    state = _mix32((key[1] ^ _mix32((state + high) & _M32)) & _M32)
    index = torch.arange(n, device=key.device, dtype=torch.int64)
    bits = _mix32((_mix32(index) ^ state) & _M32)
    return (bits.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
