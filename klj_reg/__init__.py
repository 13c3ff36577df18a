"""klj-reg: the KL-Jacobian regulariser for normalizing flows (Song et al., AAAI 2024).

loss = nll + klj_reg.penalty(model, x)
"""

from .capture import Capture, attach, capturing, clear, detach
from .divergence import divergence, klj_sum, klj_terms
from .errors import (
    AdapterMismatchError,
    CaptureError,
    CompileOrderError,
    KLJError,
    NonFiniteScaleError,
    NonFiniteScaleWarning,
    UnsupportedModelError,
)
from .monitor import DivergenceGrowthWarning, Flag, Monitor, layer_divergence
from .penalty import penalty
from .records import Factor, LayerRecord
from .registry import register_adapter, register_runner

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "Capture",
    "CaptureError",
    "CompileOrderError",
    "DivergenceGrowthWarning",
    "Factor",
    "Flag",
    "KLJError",
    "LayerRecord",
    "Monitor",
    "NonFiniteScaleError",
    "NonFiniteScaleWarning",
    "UnsupportedModelError",
    "attach",
    "capturing",
    "clear",
    "detach",
    "divergence",
    "klj_sum",
    "klj_terms",
    "layer_divergence",
    "penalty",
    "register_adapter",
    "register_runner",
]
