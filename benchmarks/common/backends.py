"""The four backends behind one interface, so every benchmark can loop over them.

A :class:`BackendFlow` maps data to latent through the framework's *own* API (the call a
user of that framework makes), so klj-reg's capture sees it exactly as in user code, and
exposes the framework model (``.model``) that ``klj_reg.penalty`` is called on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import Tensor, nn

BACKENDS = ("freia", "nflows", "normflows", "zuko")
_IMPORT_NAMES = {"freia": "FrEIA", "nflows": "nflows", "normflows": "normflows", "zuko": "zuko"}


def available() -> list[str]:
    """Backends whose framework is installed, in the canonical order."""
    return [b for b in BACKENDS if importlib.util.find_spec(_IMPORT_NAMES[b]) is not None]


def parse(spec: str) -> list[str]:
    """``"freia,zuko"`` or ``"all"`` -> list of backends; unknown or missing ones raise."""
    names = available() if spec in ("all", "") else [s.strip() for s in spec.split(",")]
    for name in names:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if name not in available():
            raise SystemExit(f"backend {name!r} is not installed (pip install klj-reg[{name}])")
    return names


class BackendFlow(nn.Module):
    """``forward(x) -> (z, log_det)``, data to latent, via the framework's own API.

    Attributes:
        backend: one of :data:`BACKENDS`.
        model: the framework's model, the argument to ``klj_reg.penalty``.
    """

    def __init__(
        self,
        backend: str,
        model: nn.Module,
        forward: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
    ) -> None:
        super().__init__()
        self.backend = backend
        self.model = model
        self._forward = forward

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, log_det = self._forward(self.model, x)
        return z.reshape(z.shape[0], -1), log_det.reshape(-1).expand(x.shape[0])
