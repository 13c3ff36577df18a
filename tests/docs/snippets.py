"""What the documentation tests share: releasing what a page's or the README's code built."""

from __future__ import annotations

import gc
from typing import Any

import torch


def release(namespace: dict[str, Any]) -> None:
    """Detach what the code attached (an attached layer keeps framework-wide patches, e.g.
    nflows' spline functions, in place for the tests that run after it), close its monitors,
    and empty ``namespace``."""
    import klj_reg

    for value in namespace.values():
        if isinstance(value, klj_reg.Monitor):
            value.close()
        elif isinstance(value, torch.nn.Module):
            for module in value.modules():
                klj_reg.detach(module)
    namespace.clear()
    gc.collect()
