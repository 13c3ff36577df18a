"""Facts behind benchmarks/results/ood/diagnosis.md (issue 25, item 3).

(a) zuko's IB rows in the cpu preset leave the density untrained: not because the zuko flow
cannot learn (its log-det is exact, every parameter gets a gradient, and L_x alone trains
it), but because under IB its L_y gradient crowds L_x out of Adam's per-parameter steps.
(b) cNLL's class means barely move under SGD: their gradient is a class-mean residual over
D, so one step moves them ``2 n_c lr lr_mu / (B D)`` of the way to the class mean of z.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cifar import objectives
from benchmarks.cifar.classifier import GenerativeClassifier
from benchmarks.cifar.train import TrainConfig, make_optimizer
from benchmarks.common.backends import BackendFlow
from benchmarks.common.image_flows import build

SHAPE = (3, 8, 8)


def _correlated_images(n: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] whose pixels share a per-image level: a density a flow can learn."""
    g = torch.Generator().manual_seed(seed)
    level = 0.2 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    return (level + 0.03 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)


def _l_x(clf: GenerativeClassifier, x: torch.Tensor) -> float:
    with torch.no_grad():
        out = clf(x)
        return float(objectives.l_x(out.zz, out.log_det, out.log_prior, clf.dim).mean())


@pytest.mark.slow
def test_zuko_flow_parameters_learn_the_density() -> None:
    """Every zuko parameter gets an L_x gradient and moves; L_x alone trains the density."""
    pytest.importorskip("zuko")
    torch.manual_seed(0)
    clf = GenerativeClassifier(build("zuko", "tiny", SHAPE, seed=0), shape=SHAPE)
    x = _correlated_images(64)
    y = torch.arange(64) % 10
    flow_params = dict(clf.flow.named_parameters())
    assert flow_params and sum(p.numel() for p in flow_params.values()) > 1000
    start = {n: p.detach().clone() for n, p in flow_params.items()}
    before = _l_x(clf, x)

    out = clf(x)
    objectives.objective("ib", out.zz, out.log_det, out.log_prior, y, clf.dim).l_x.backward()
    no_grad = [n for n, p in flow_params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no L_x gradient reaches {no_grad}"

    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    try:
        for _ in range(40):
            opt.zero_grad(set_to_none=True)
            out = clf(x)
            terms = objectives.objective("ib", out.zz, out.log_det, out.log_prior, y, clf.dim)
            terms.l_x.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    after = _l_x(clf, x)
    unchanged = [n for n, p in flow_params.items() if torch.equal(p.detach(), start[n])]
    assert not unchanged, f"parameters that never moved: {unchanged}"
    assert after < before - 0.5, (before, after)


def test_cnll_moves_class_means_a_fraction_over_d_per_sgd_step() -> None:
    """One SGD step of the cNLL objective moves mu_c toward the mean of class c's latents by
    exactly ``2 n_c lr lr_mu / (B D)`` of the distance (momentum 0, no weight decay on mu):
    with the converged preset (lr 0.07, lr_mu 3, D = 768) that is 1/18,000 per step for
    n_c / B = 1/10, against ~3,100 steps at full learning rate."""
    torch.manual_seed(0)
    n_classes, dim, batch = 4, 12, 8
    z = torch.randn(batch, dim, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 1])
    mu = torch.nn.Parameter(torch.randn(n_classes, dim, dtype=torch.float64))
    log_det = torch.zeros(batch, dtype=torch.float64)
    log_prior = torch.zeros(n_classes, dtype=torch.float64).log_softmax(0)
    loss = objectives.objective(
        "cnll", objectives.class_distances(z, mu), log_det, log_prior, y, dim
    ).loss
    (grad,) = torch.autograd.grad(loss, mu)
    for c in range(n_classes):
        members = y == c
        expected = 2 * int(members.sum()) / (batch * dim) * (mu[c] - z[members].mean(0))
        torch.testing.assert_close(grad[c], expected.detach())

    # the optimiser groups the benchmark uses: mu at lr * lr_mu, momentum 0, no decay
    flow = BackendFlow("identity", torch.nn.Linear(2, 2), lambda m, x: (x, x.new_zeros(len(x))))
    clf = GenerativeClassifier(flow, n_classes=n_classes, shape=(3, 2, 2))
    clf.phi.requires_grad_(False)  # as fit() does for cNLL
    opt, _, _ = make_optimizer(clf, TrainConfig(optimizer="sgd", lr=0.07, lr_mu=3.0), 1)
    (mu_group,) = [g for g in opt.param_groups if any(p is clf.mu for p in g["params"])]
    assert mu_group["lr"] == pytest.approx(0.21)
    assert mu_group["momentum"] == 0.0 and mu_group["weight_decay"] == 0.0
