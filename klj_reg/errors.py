"""Exceptions raised by klj-reg. Every message names the layer and the fix."""

from __future__ import annotations


class KLJError(Exception):
    """Base class of every error klj-reg raises on purpose."""


class UnsupportedModelError(KLJError, TypeError):
    """The model contains no layer that klj-reg knows how to read scales from."""


class CaptureError(KLJError, RuntimeError):
    """The capture is missing, stale or used in a way that cannot give the right penalty."""


class AdapterMismatchError(KLJError, RuntimeError):
    """Captured scales disagree with the layer's own log-determinant (framework version drift)."""


class NonFiniteScaleError(KLJError, FloatingPointError):
    """The penalty is not finite (raised with ``check_finite=True``); it names the layers."""


class CompileOrderError(CaptureError):
    """Capture was attached after ``torch.compile``; its hooks would be silently skipped."""


class NonFiniteScaleWarning(RuntimeWarning):
    """The penalty is not finite (returned as it is); it names the layers."""
