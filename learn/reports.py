"""What a :class:`~learn.dynamic.DynamicSparsity` update did: :class:`SparsityReport`
(one per update, kept in the controller's history and its ``state_dict``) made of one
:class:`LayerReport` per gated layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["SparsityReport", "LayerReport"]


@dataclass
class LayerReport:
    """One gated layer after an update: live blocks ``nnz`` of ``total`` positions."""
    name: str
    nnz: int
    total: int
    removed: int = 0
    regrown: int = 0

    @property
    def density(self) -> float:
        return self.nnz / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    """What one update did: ``step`` (training steps so far), ``update`` (1-based index of
    the update), one :class:`LayerReport` per gated layer and, for a controller with a
    ``target_density``, ``scheduled``: the density its schedule asked for at this update
    (None without a target)."""
    step: int
    update: int
    layers: list = field(default_factory=list)
    scheduled: float | None = None

    @property
    def density(self) -> float:
        """Live fraction of all block positions of all gated layers."""
        total = sum(r.total for r in self.layers)
        return sum(r.nnz for r in self.layers) / total if total else 0.0

    @property
    def removed(self) -> int:
        return sum(r.removed for r in self.layers)

    @property
    def regrown(self) -> int:
        return sum(r.regrown for r in self.layers)

    def as_dict(self) -> dict:
        return {"step": self.step, "update": self.update, "layers": [asdict(r) for r in self.layers],
                "scheduled": self.scheduled}

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityReport":
        scheduled = d.get("scheduled")  # absent from reports saved before schedules existed
        return cls(int(d["step"]), int(d["update"]), [LayerReport(**r) for r in d["layers"]],
                   None if scheduled is None else float(scheduled))

    def __str__(self):
        per_layer = " ".join(f"{r.name or '<root>'}={r.density:.3f}" for r in self.layers)
        goal = "" if self.scheduled is None else f", scheduled {self.scheduled:.3f}"
        return (f"step {self.step}: density {self.density:.3f} (removed {self.removed}, "
                f"regrown {self.regrown}{goal}) | {per_layer}")
