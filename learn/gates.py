"""Hard-concrete L0 gates (Louizos, Welling & Kingma, "Learning Sparse Neural Networks
through L0 Regularization", ICLR 2018), one gate per weight block.

A gate ``k`` has one parameter ``log_alpha[k]``.  With temperature ``beta`` and stretch
interval ``(gamma, zeta)`` (``gamma < 0 < 1 < zeta``):

* training sample:  ``u ~ U(eps, 1 - eps)``,
  ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)``;
* keep probability (the expected L0 of the gate, differentiable in ``log_alpha``):
  ``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``;
* deterministic gate (evaluation): ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``.

The deterministic gate is exactly zero when ``log_alpha <= logit(-gamma / (zeta - gamma))``
(about -2.398 with the defaults), i.e. when the keep probability is at most
:func:`zero_gate_probability` (about 0.310 with the defaults).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from numbasparse._checks import LOW_PRECISION
from numbasparse.optim_state import gather_slots, resize_slots, track
from numbasparse.sharding import fill_slots_, full_tensor

from .noise import counter_uniform, split_seed

__all__ = ["HardConcreteGate", "DEAD_LOG_ALPHA", "zero_gate_probability"]

#: ``log_alpha`` given to the gate of a removed block.  With the default
#: hyper-parameters every sample of such a gate is exactly 0 (the largest noise
#: logit is ``logit(1 - eps)`` ~ 13.8) and its keep probability is ~1e-8.
DEAD_LOG_ALPHA = -20.0


def _real(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def zero_gate_probability(beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1) -> float:
    """Keep probability below which the deterministic (evaluation) gate is exactly 0."""
    log_alpha = math.log(-gamma / zeta)  # logit(-gamma / (zeta - gamma))
    return 1.0 / (1.0 + math.exp(-(log_alpha - beta * math.log(-gamma / zeta))))


class HardConcreteGate(nn.Module):
    """``n`` independent hard-concrete gates with parameter ``log_alpha`` of shape ``(n,)``.

    Args:
        n: number of gates (for a block-sparse layer: its storage capacity, one gate
            per weight slot).
        beta: temperature (> 0).  gamma, zeta: stretch interval, ``gamma < 0``, ``zeta > 1``.
        init_keep: initial keep probability ``P(z != 0)`` in (0, 1); ``log_alpha`` starts
            at ``logit(init_keep) + beta * log(-gamma / zeta)`` (the inverse of
            :meth:`prob_nonzero`).
        eps: the noise ``u`` is drawn from ``U(eps, 1 - eps)``, ``0 < eps < 0.5``.
        seed: seed of the gate's own noise (``0 <= seed < 2**64``).  The noise is a hash
            of the seed, a counter and the gate index (:mod:`learn.noise`): the buffers
            ``noise_key`` and ``noise_counter`` are its whole state, saved in
            ``state_dict``, so a resumed run draws the same noise, every DDP rank built with
            the same seed draws the same noise, the stream is the same on every device,
            and ``torch.compile`` / ``torch.export`` trace it.  ``None`` draws the seed
            from torch's global generator at construction.

    Calling the module returns ``(n,)`` gate values: a fresh sample in training mode,
    the deterministic gate in evaluation mode.
    """

    def __init__(self, n: int, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
                 init_keep: float = 0.9, eps: float = 1e-6, seed: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be an integer, got {n!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        beta, gamma, zeta = _real(beta, "beta"), _real(gamma, "gamma"), _real(zeta, "zeta")
        init_keep, eps = _real(init_keep, "init_keep"), _real(eps, "eps")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if gamma >= 0:
            raise ValueError(f"gamma must be < 0, got {gamma}")
        if zeta <= 1:
            raise ValueError(f"zeta must be > 1, got {zeta}")
        if not 0.0 < init_keep < 1.0:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
        self.n = int(n)
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.init_keep = init_keep
        self.eps = eps
        self.seed = int(seed)
        if dtype in LOW_PRECISION:
            dtype = torch.float32   # see _apply
        self.log_alpha = nn.Parameter(torch.full((self.n,), self.init_log_alpha, device=device, dtype=dtype))
        self.register_buffer("noise_key", torch.tensor(split_seed(self.seed), dtype=torch.int64, device=device))
        self.register_buffer("noise_counter", torch.zeros((), dtype=torch.int64, device=device))
        self._dead = np.zeros(self.n, dtype=bool)  # gates closed by kill_()
        track(self.log_alpha, "HardConcreteGate log_alpha")

    # ------------------------------------------------------------------ formulas
    @property
    def init_log_alpha(self) -> float:
        """``log_alpha`` whose keep probability is ``init_keep``."""
        p = self.init_keep
        return math.log(p / (1.0 - p)) + self.beta * math.log(-self.gamma / self.zeta)

    def prob_nonzero(self) -> torch.Tensor:
        """``(n,)`` keep probabilities ``P(z != 0) = sigmoid(log_alpha - beta*log(-gamma/zeta))``
        (the expected L0 norm of each gate; differentiable in ``log_alpha``; gathered from
        the ranks when FSDP shards ``log_alpha``)."""
        return torch.sigmoid(full_tensor(self.log_alpha) - self.beta * math.log(-self.gamma / self.zeta))

    def deterministic(self) -> torch.Tensor:
        """``(n,)`` evaluation gates ``clamp(sigmoid(log_alpha)*(zeta-gamma)+gamma, 0, 1)``."""
        return torch.clamp(torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def noise(self) -> torch.Tensor:
        """``(n,)`` uniform noise ``u ~ U(eps, 1-eps)``, the next draw of the gate's
        counter-based stream (the counter advances by one), on ``log_alpha``'s device
        and dtype."""
        u = counter_uniform(self.noise_key, self.noise_counter, self.n).to(self.log_alpha.device)
        with torch.no_grad():
            self.noise_counter.add_(1)
        u = self.eps + (1.0 - 2.0 * self.eps) * u
        return u.to(self.log_alpha.dtype)

    def sample(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """``(n,)`` stochastic gates ``clamp(sigmoid((logit(u)+log_alpha)/beta)*(zeta-gamma)+gamma, 0, 1)``;
        ``u`` (shape ``(n,)``) defaults to :meth:`noise`."""
        if u is None:
            u = self.noise()
        elif not isinstance(u, torch.Tensor) or tuple(u.shape) != (self.n,):
            raise ValueError(f"u must be a tensor of shape ({self.n},), one noise value per gate, got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return torch.clamp(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def forward(self) -> torch.Tensor:
        """``(n,)`` gate values: :meth:`sample` in training mode, :meth:`deterministic` in eval mode."""
        return self.sample() if self.training else self.deterministic()

    def reset_parameters(self) -> None:
        """Every gate back to ``init_keep`` (those closed with :meth:`kill_` to
        :data:`DEAD_LOG_ALPHA`) and the noise back to the start of ``seed``'s stream: what the
        constructor did, for modules built on the ``meta`` device and materialized with
        ``to_empty()``."""
        with torch.no_grad():
            self.log_alpha.fill_(self.init_log_alpha)
            if self._dead.any():
                dead = torch.from_numpy(np.flatnonzero(self._dead)).to(self.log_alpha.device)
                self.log_alpha[dead] = DEAD_LOG_ALPHA
            self.noise_key.copy_(torch.tensor(split_seed(self.seed), dtype=torch.int64))
            self.noise_counter.zero_()

    # ------------------------------------------------------------------ editing
    def _index(self, index) -> torch.Tensor:
        """``index`` as a CPU int64 tensor of gate numbers, each in ``[0, n)``."""
        index = torch.as_tensor(index, device="cpu") if not isinstance(index, torch.Tensor) else index.cpu()
        if index.dtype in (torch.bool, torch.uint8) or index.is_floating_point() or index.is_complex():
            raise TypeError(f"gate indices must be integers, got dtype {index.dtype}")
        index = index.to(torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise IndexError(f"gate indices must be in [0, {self.n}), got values from {int(index.min())} "
                             f"to {int(index.max())}")
        return index

    @torch.no_grad()
    def reset_(self, index) -> None:
        """Set the gates ``index`` (ints in ``[0, n)``) back to ``init_keep``."""
        index = self._index(index)
        fill_slots_(self.log_alpha, index, self.init_log_alpha)
        self._dead[index.numpy()] = False

    @torch.no_grad()
    def kill_(self, index) -> None:
        """Close the gates ``index`` (ints in ``[0, n)``): ``log_alpha`` to :data:`DEAD_LOG_ALPHA`
        (samples exactly 0); they stay closed through :meth:`reset_parameters`."""
        index = self._index(index)
        fill_slots_(self.log_alpha, index, DEAD_LOG_ALPHA)
        self._dead[index.numpy()] = True

    def compact_(self, index, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only the gates ``index`` (ints in ``[0, n)``), in that order, in place:
        ``log_alpha`` stays the same Parameter, now of shape ``(len(index),)``; the
        per-gate state of ``optimizer`` follows (see :meth:`numbasparse.storage.BlockStorage.compact`)."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        index = self._index(index)
        gather_slots(self.log_alpha, index, () if optimizer is None else (optimizer,))
        self._dead = self._dead[index.numpy()]
        self.n = int(self.log_alpha.shape[0])

    def _resize(self, n: int) -> None:
        """``n`` gates, uninitialized (a checkpoint's values follow)."""
        resize_slots(self.log_alpha, n)
        self.n = int(n)
        self._dead = np.zeros(self.n, dtype=bool)

    # ------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A compacted checkpoint has fewer gates: resize (in place) before the copy.
        incoming = state_dict.get(prefix + "log_alpha")
        if isinstance(incoming, torch.Tensor) and incoming.dim() == 1 and incoming.shape != self.log_alpha.shape:
            self._resize(incoming.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._after_load()
        track(self.log_alpha, "HardConcreteGate log_alpha")

    def _load_values(self, state_dict, prefix) -> None:
        """Take this gate's entries of a checkpoint (``log_alpha`` already of this gate's
        shape); what the block-sparse layer owning the gate loads with its weight."""
        with torch.no_grad():
            for name, tensor in (("log_alpha", self.log_alpha), ("noise_key", self.noise_key),
                                 ("noise_counter", self.noise_counter)):
                value = state_dict.get(prefix + name)
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    tensor.copy_(value)
        self._after_load()

    def _after_load(self) -> None:
        if self.noise_key.device.type != "meta":
            low, high = (int(v) for v in self.noise_key.tolist())
            self.seed = low | (high << 32)
        self._find_dead()

    def _find_dead(self) -> None:
        """After a load: the gates at (about) DEAD_LOG_ALPHA are the closed ones."""
        if self.log_alpha.shape == (self.n,) and self.log_alpha.device.type != "meta":
            self._dead = (self.log_alpha.detach().cpu() <= DEAD_LOG_ALPHA / 2).numpy()

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(torch.bfloat16) of a model leave log_alpha (and its gradient) in
        # their precision: the hard-concrete noise and the logits need more than 8 bits
        # of mantissa; device moves apply as usual.
        log_alpha = self.log_alpha
        keep = {id(log_alpha), id(log_alpha.grad)} - {id(None)}

        def keep_precision(t):
            out = fn(t)
            if id(t) in keep and isinstance(out, torch.Tensor) and out.dtype in LOW_PRECISION \
                    and t.dtype not in LOW_PRECISION:
                return t.to(device=out.device)
            return out

        out = super()._apply(keep_precision, *args, **kwargs)
        track(self.log_alpha, "HardConcreteGate log_alpha")
        return out

    def extra_repr(self) -> str:
        return (f"n={self.n}, beta={self.beta:.4g}, gamma={self.gamma:g}, zeta={self.zeta:g}, "
                f"init_keep={self.init_keep:g}")
