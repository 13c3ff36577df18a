"""klj-reg: the KL-Jacobian regulariser for normalizing flows (Song et al., AAAI 2024).

loss = -model.log_prob(x).mean() + klj_reg.penalty(model, x)   # both per sample
"""

from .capture import Capture, attach, capturing, clear, detach
from .choose import ALPHAS, AlphaChoice, choose_alpha, pick_alpha
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
from .reader import Call, Keep
from .records import Factor, LayerRecord
from .registry import register_adapter, register_runner

__version__ = "0.1.0"

__all__ = [
    "ALPHAS",
    "AdapterMismatchError",
    "AlphaChoice",
    "Call",
    "Capture",
    "CaptureError",
    "CompileOrderError",
    "DivergenceGrowthWarning",
    "Factor",
    "Flag",
    "Keep",
    "KLJError",
    "LayerRecord",
    "Monitor",
    "NonFiniteScaleError",
    "NonFiniteScaleWarning",
    "UnsupportedModelError",
    "attach",
    "capturing",
    "choose_alpha",
    "clear",
    "detach",
    "divergence",
    "klj_sum",
    "klj_terms",
    "layer_divergence",
    "penalty",
    "pick_alpha",
    "register_adapter",
    "register_runner",
]
