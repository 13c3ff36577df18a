"""A small image flow on 8x8 digits, trained in bits per dimension with klj-reg.

FrEIA: an iRevNet squeeze (1x8x8 -> 4x4x4) and Glow-style ``AllInOneBlock``
couplings with convolutional subnetworks, on scikit-learn's 8x8 digits (17 grey levels,
dequantised). The loss is per dimension, so the penalty is too: ``normaliser="dim"``. Run:
``python examples/image_flow.py``.
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from sklearn.datasets import load_digits

import klj_reg

LEVELS = 17  # the digits' grey levels, 0..16


def conv_subnet(c_in: int, c_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(c_in, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, c_out, 1)
    )


def make_flow(blocks: int = 4) -> Ff.SequenceINN:
    inn = Ff.SequenceINN(1, 8, 8)
    inn.append(Fm.IRevNetDownsampling)  # 1x8x8 -> 4x4x4
    for _ in range(blocks):
        inn.append(Fm.AllInOneBlock, subnet_constructor=conv_subnet, affine_clamping=2.0)
    return inn


def nll_per_dim(inn: Ff.SequenceINN, x: torch.Tensor) -> torch.Tensor:
    """Per-dimension NLL in nats of the dequantised pixels in [0, 1)."""
    z, log_det = inn(x)
    d = x[0].numel()
    log_pz = -0.5 * z.flatten(1).square().sum(1) - 0.5 * d * math.log(2 * math.pi)
    return -(log_pz + log_det).mean() / d


def bits_per_dim(nats_per_dim: float) -> float:
    """Of the discrete pixels: undo the 1/LEVELS scaling, then nats -> bits."""
    return (nats_per_dim + math.log(LEVELS)) / math.log(2)


def main(steps: int = 500, alpha: float = 0.1, batch: int = 64, n: int | None = None) -> dict:
    torch.manual_seed(0)
    images = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)
    images = images[:n] if n else images
    train, test = images[: int(0.8 * len(images))], images[int(0.8 * len(images)) :]
    inn = make_flow()
    klj_reg.attach(inn)
    optimizer = torch.optim.Adam(inn.parameters(), lr=1e-3)
    for step in range(steps):
        pixels = train[torch.randint(0, len(train), (batch,))]
        x = (pixels + torch.rand_like(pixels)) / LEVELS  # dequantised, in [0, 1)
        nll = nll_per_dim(inn, x)
        loss = nll + klj_reg.penalty(inn, x, alpha=alpha, normaliser="dim")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: train {bits_per_dim(nll.item()):.3f} bits/dim")
    with torch.no_grad():
        x = (test + torch.rand_like(test)) / LEVELS
        test_bpd = bits_per_dim(float(nll_per_dim(inn, x)))
    print(f"test {test_bpd:.3f} bits/dim (alpha {alpha})")
    return {"test_bits_per_dim": test_bpd}


if __name__ == "__main__":
    main()
