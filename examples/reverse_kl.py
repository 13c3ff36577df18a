"""Reverse KL on a 2-D energy with klj-reg: the penalty read from the sampling pass.

A normflows RealNVP fitted to normflows' two-moons energy by reverse KL: each step samples
through the flow (``reverse_kld``) and the penalty reads that pass (``direction="sample"``),
so no data-to-latent pass runs. See docs/reverse-kl.md. Run: ``python examples/reverse_kl.py``.
"""

from __future__ import annotations

import normflows as nf
import torch

import klj_reg


def make_model(seed: int = 0) -> nf.NormalizingFlow:
    torch.manual_seed(seed)
    flows = []
    for _ in range(4):
        param_map = nf.nets.MLP([1, 32, 2], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(param_map), nf.flows.Permute(2, mode="swap")]
    base = nf.distributions.DiagGaussian(2, trainable=False)
    return nf.NormalizingFlow(base, flows, p=nf.distributions.target.TwoMoons())


def main(steps: int = 500, alpha: float = 0.1, batch: int = 256) -> dict:
    model = make_model()
    klj_reg.attach(model, direction="sample")  # before the first sampling pass
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        loss = model.reverse_kld(batch)  # the sampling pass
        loss = loss + klj_reg.penalty(model, alpha=alpha)  # read from that pass
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    with torch.no_grad():
        kl = float(model.reverse_kld(4096))  # up to the target's normalising constant
        klj = float(klj_reg.penalty(model, alpha=1.0))  # the sampling map's KLJ
    print(f"reverse KL {kl:.3f}, sampling-map KLJ {klj:.3f} (alpha {alpha})")
    return {"reverse_kl": kl, "klj": klj}


if __name__ == "__main__":
    main()
