"""The gallery's training-failure configurations: data, flow and optimiser per configuration.

Each configuration is a function ``(quick) -> Config`` registered with :func:`register`; its
docstring names the failure mode, the public report(s) that motivated it (repository and issue
number, found with the project's search tool), what each cited report shows and how the
failure reproduced here differs from it, and its failure threshold. A citation is not a claim
that the configuration reproduces the report: most reports are of a different failure (NaN
training losses, wrong log-probabilities, erratic test spikes on the full data set) than the
one measured here (mostly a held-out NLL that rises past a threshold). Everything a run
depends on is here, so that a run is ``(configuration, method, seed)``.

Data are drawn per seed (every method of one seed sees the same data), standardised with the
*training* split's mean and standard deviation, as a user would. Held-out NLL is reported in
nats per dimension of the flow's input. A configuration's failure threshold is fixed by one
rule before any run: the held-out NLL of the untrained flow, the identity map (``N(0, I)`` on
the standardised data), plus the configuration's ``margin`` in nats/dim: a flow that ends
further than that above its own starting point has failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..common.backends import BackendFlow

CIFAR_SIDE = 8  # the image configuration's images are 3 x 8 x 8 (4 x 4 average-pooled CIFAR-10)


class Split(NamedTuple):
    """Standardised float32 arrays: the training set and a held-out set."""

    train: np.ndarray
    held_out: np.ndarray


@dataclass(frozen=True)
class Config:
    """One failure configuration. ``make_data(seed)`` returns the training and *test* splits;
    ``make_flow()`` builds the flow from torch's (and numpy's) global generator."""

    name: str
    backend: str
    mode: str
    sources: tuple[str, ...]
    dim: int
    steps: int
    batch: int
    lr: float
    eval_every: int
    margin: float
    make_data: Callable[[int], Split]
    make_flow: Callable[[], BackendFlow]
    doc: str = ""
    needs_data: bool = False  # needs ../shared/data (CIFAR-10)

    def settings(self) -> dict[str, Any]:
        """The JSON-able part."""
        return {
            "name": self.name, "backend": self.backend, "mode": self.mode,
            "sources": list(self.sources), "dim": self.dim, "steps": self.steps,
            "batch": self.batch, "lr": self.lr, "eval_every": self.eval_every,
            "margin": self.margin,
        }  # fmt: skip


REGISTRY: dict[str, Callable[[bool], Config]] = {}


def register(fn: Callable[[bool], Config]) -> Callable[[bool], Config]:
    """Add a configuration function to :data:`REGISTRY` under its name (dashes for
    underscores)."""
    REGISTRY[fn.__name__.replace("_", "-")] = fn
    return fn


def get(name: str, quick: bool = False) -> Config:
    """The configuration ``name`` (its docstring as ``doc``)."""
    fn = REGISTRY[name]
    cfg = fn(quick)
    doc = " ".join((fn.__doc__ or "").split())
    return Config(**{**cfg.__dict__, "doc": doc})


# --- data ------------------------------------------------------------------------------------


def standardise(train: np.ndarray, held_out: np.ndarray) -> Split:
    """Both splits by the training split's per-feature mean and standard deviation."""
    mean, std = train.mean(0), train.std(0) + 1e-12
    return Split(
        ((train - mean) / std).astype(np.float32), ((held_out - mean) / std).astype(np.float32)
    )


def _correlated(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A random ``dim x dim`` mixing matrix with singular values between 0.3 and 3."""
    q1, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q1 @ np.diag(np.geomspace(0.3, 3.0, dim)) @ q2


def mixture(rng: np.random.Generator, n: int, dim: int, components: int = 5) -> np.ndarray:
    """A mixture of ``components`` correlated Gaussians with means spread over a few stds."""
    means = 3.0 * rng.standard_normal((components, dim))
    mixes = [_correlated(rng, dim) / 2 for _ in range(components)]
    label = rng.integers(components, size=n)
    eps = rng.standard_normal((n, dim))
    out = np.empty((n, dim))
    for k in range(components):
        rows = label == k
        out[rows] = means[k] + eps[rows] @ mixes[k].T
    return out


def student_t(rng: np.random.Generator, n: int, dim: int, df: float) -> np.ndarray:
    """Correlated multivariate Student-t with ``df`` degrees of freedom (one chi^2 draw per
    sample scales all its features; ``df = 1`` is a multivariate Cauchy)."""
    mix = _correlated(rng, dim)
    g = rng.standard_normal((n, dim)) @ mix.T
    w = np.sqrt(df / rng.chisquare(df, size=(n, 1)))
    return g * w


# --- flows -----------------------------------------------------------------------------------


def _mlp(c_in: int, c_out: int, hidden: int, zero: bool = True) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, c_out),
    )  # fmt: skip
    if zero:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


def _normflows_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model.inverse_and_log_det(x)


def _nflows_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model._transform(x)


def _freia_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return model(x)


def _zuko_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model().transform.call_and_ladj(x)


def normflows_couplings(dim: int, layers: int, hidden: int) -> BackendFlow:
    """normflows issue #73's model: ``AffineCouplingBlock`` (exp scale) on an ``nf.nets.MLP``
    with zero-initialised output and ``Permute(mode='swap')``, ``layers`` times."""
    import normflows as nf

    cond = (dim + 1) // 2
    flows: list[nn.Module] = []
    for _ in range(layers):
        net = nf.nets.MLP([cond, hidden, hidden, 2 * (dim - cond)], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="swap")]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)
    return BackendFlow("normflows", model, _normflows_forward)


def normflows_glow(channels: int, levels: int, steps: int, hidden: int, side: int) -> BackendFlow:
    """A multi-scale normflows Glow (``Squeeze``, ``GlowBlock`` with the RealNVP ``exp`` scale
    map, 1x1 LU convolution and ActNorm) on ``channels x side x side`` images."""
    import normflows as nf

    c = channels
    data_to_latent: list[nn.Module] = []
    for _ in range(levels):
        c *= 4
        data_to_latent.append(nf.flows.Squeeze())
        data_to_latent += [
            nf.flows.GlowBlock(c, hidden, scale_map="exp", init_zeros=True) for _ in range(steps)
        ]
    h = side >> levels
    base = nf.distributions.DiagGaussian((c, h, h), trainable=False)
    model = nf.NormalizingFlow(base, data_to_latent[::-1])
    return BackendFlow("normflows", model, _normflows_forward)


def freia_allinone(dim: int, layers: int, hidden: int) -> BackendFlow:
    """FrEIA ``AllInOneBlock`` (its defaults: clamp 2, learned global affine, soft
    permutation), ``layers`` times."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(dim)
    for _ in range(layers):
        inn.append(Fm.AllInOneBlock, subnet_constructor=lambda i, o: _mlp(i, o, hidden))
    return BackendFlow("freia", inn, _freia_forward)


def zuko_realnvp(dim: int, transforms: int, hidden: int) -> BackendFlow:
    """zuko's ``RealNVP`` (affine couplings, alternating masks), hidden ``hidden`` x 2."""
    import zuko

    flow = zuko.flows.RealNVP(dim, transforms=transforms, hidden_features=(hidden, hidden))
    return BackendFlow("zuko", flow, _zuko_forward)


def zuko_nsf(dim: int, transforms: int, hidden: int) -> BackendFlow:
    """zuko's ``NSF`` (autoregressive monotonic rational-quadratic splines, 8 bins on
    [-5, 5], identity outside), hidden ``hidden`` x 2."""
    import zuko

    flow = zuko.flows.NSF(dim, transforms=transforms, hidden_features=(hidden, hidden))
    return BackendFlow("zuko", flow, _zuko_forward)


def nflows_realnvp(dim: int, layers: int, hidden: int) -> BackendFlow:
    """nflows ``ActNorm`` (identity start), ``AffineCouplingTransform`` (alternating masks)
    and ``RandomPermutation``, ``layers`` times: :func:`benchmarks.common.tabular.tabular_flow`."""
    from ..common.tabular import tabular_flow

    return tabular_flow("nflows", dim, layers, hidden, "realnvp")


# --- the configurations ------------------------------------------------------------------------


def _tabular(
    seed: int, draw: Callable[[np.random.Generator, int], np.ndarray], n_train: int, n_test: int
) -> Split:
    rng = np.random.default_rng([seed, 7])
    x = draw(rng, n_train + n_test)
    return standardise(x[:n_train], x[n_train:])


def _with_outliers(
    rng: np.random.Generator, n: int, dim: int, fraction: float, scale: float
) -> np.ndarray:
    """Mixture data whose first ``round(fraction * n)`` rows are replaced by gross outliers,
    ``N(0, scale^2 I)``."""
    x = mixture(rng, n, dim)
    k = int(round(fraction * n))
    x[:k] = scale * rng.standard_normal((k, dim))
    return x


def _outlier_split(seed: int, dim: int, n_train: int, n_test: int) -> Split:
    """Training rows with 5 % outliers at 30 stds, shuffled; a clean test set from the same
    mixture (the same generator state draws the mixture's parameters)."""
    train = _with_outliers(np.random.default_rng([seed, 7]), n_train, dim, 0.05, 30.0)
    np.random.default_rng([seed, 8]).shuffle(train)
    test = mixture(np.random.default_rng([seed, 7]), n_train + n_test, dim)[n_train:]
    return standardise(train, test)


def _embedded(rng: np.random.Generator, n: int, dim: int, thin: int, noise: float) -> np.ndarray:
    """Near-singular data: mixture data in ``dim - thin`` dimensions mapped linearly into
    ``dim`` features, plus isotropic noise of standard deviation ``noise`` (``thin``
    eigenvalues of the covariance are about ``noise^2``)."""
    low = mixture(rng, n, dim - thin)
    lift = rng.standard_normal((dim - thin, dim)) / math.sqrt(dim - thin)
    return low @ lift + noise * rng.standard_normal((n, dim))


def _digits(seed: int, n_train: int, n_test: int) -> Split:
    """scikit-learn's 8x8 digits (17 grey levels): ``n_train`` random training images and
    ``n_test`` other ones, dequantised ``(v + U[0, 1)) / 17``, one scalar standardisation
    (by the training images' pixel mean and std)."""
    from sklearn.datasets import load_digits

    v = load_digits().data.astype(np.float64)
    rng = np.random.default_rng([seed, 7])
    u = (v[rng.permutation(len(v))] + rng.random(v.shape)) / 17
    train, test = u[:n_train], u[n_train : n_train + n_test]
    mean, std = train.mean(), train.std()
    return Split(
        ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)
    )


_CIFAR: dict[str, np.ndarray] = {}


def _cifar_pooled(split: str) -> np.ndarray:
    """CIFAR-10 ``split`` (``../shared/data`` or ``$KLJ_DATA``), 4 x 4 average-pooled to
    3 x 8 x 8 and requantised to 256 levels (uint8); cached per process."""
    if split not in _CIFAR:
        from ..cifar.data import load_cifar10

        x = load_cifar10(split).x.float()
        pooled = torch.nn.functional.avg_pool2d(x, 32 // CIFAR_SIDE).round().to(torch.uint8)
        _CIFAR[split] = pooled.numpy()
    return _CIFAR[split]


def _cifar(seed: int, n_train: int, n_test: int) -> Split:
    """``n_train`` random training images and the first ``n_test`` (lossless) test images,
    dequantised ``(v + U[0, 1)) / 256`` and mapped by ``(u - 0.5) / 0.25``."""
    rng = np.random.default_rng([seed, 7])
    train_all, test_all = _cifar_pooled("train"), _cifar_pooled("test")
    train = train_all[rng.permutation(len(train_all))[:n_train]].astype(np.float64)
    test = test_all[:n_test].astype(np.float64)

    def scale(v: np.ndarray) -> np.ndarray:
        return (((v + rng.random(v.shape)) / 256 - 0.5) / 0.25).astype(np.float32)

    return Split(scale(train), scale(test))


# --- the configurations ------------------------------------------------------------------------


@register
def deep_coupling(quick: bool) -> Config:
    """Deep unbounded exp-scale affine couplings (normflows). Model: the one posted in
    VincentStimper/normalizing-flows#73 (a 32-layer ``AffineCouplingBlock`` flow, exp scale,
    ``MLP([10, 64, 64, 18], init_zeros=True)``, swap permutations), whose reporter saw NaN/inf
    *training* losses on 19-D data. That failure did not reproduce here (no non-finite
    training loss in any run); what fails here, in 2 of 5 plain seeds, is the *held-out* NLL,
    which spikes late in training (step 375) after falling steadily.
    rosinality/glow-pytorch#25 (weights "rapidly become NaN" with affine, not additive,
    couplings in a Glow on CIFAR-10) motivated the deep affine couplings; it is not
    reproduced. Data: 19-D 5-component correlated Gaussian mixture, 2,000 training and 1,000
    test points. Adam lr 1e-3, batch 256, 400 steps. Threshold: identity NLL + 1 nat/dim."""
    dim = 19
    return Config(
        name="deep-coupling", backend="normflows",
        mode="deep exp-scale couplings: late held-out NLL spikes",
        sources=("VincentStimper/normalizing-flows#73 (model)",
                 "rosinality/glow-pytorch#25 (motivation)"),
        dim=dim, steps=30 if quick else 400, batch=256, lr=1e-3,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _tabular(seed, lambda r, n: mixture(r, n, dim), 2000, 1000),
        make_flow=lambda: normflows_couplings(dim, 4 if quick else 32, 64),
    )  # fmt: skip


@register
def heavy_tails(quick: bool) -> Config:
    """Heavy-tailed data with affine couplings (normflows). Motivated by
    bayesflow-org/bayesflow#721 ("Spline flow can be unstable for heavy-tailed
    distributions"), which is about a *spline* flow: NaN losses because the rational-quadratic
    spline's log-determinant was evaluated, and NaN, for inputs outside its bounded domain
    (in the reporter's case, widening the domain removed them). No spline is used here, so
    that report is not reproduced. The model is 16 ``AffineCouplingBlock`` (exp scale), the block of
    VincentStimper/normalizing-flows#73 (cited for the model only: that report is about 19-D
    mixture-like data, not heavy tails). Data: 16-D correlated multivariate Student-t with 1
    degree of freedom (Cauchy tails), standardised by mean and std, 2,000 training and 1,000
    test points. What fails here: non-finite held-out densities on extreme test points, and
    non-finite training losses (skipped). Adam lr 1e-3, batch 256, 250 steps. Threshold:
    identity NLL + 1 nat/dim (the identity's NLL is itself large on seeds whose test set holds
    an extreme point)."""
    dim = 16
    return Config(
        name="heavy-tails", backend="normflows", mode="heavy-tailed data, affine couplings",
        sources=("bayesflow-org/bayesflow#721 (spline; motivation)",
                 "VincentStimper/normalizing-flows#73 (model)"),
        dim=dim, steps=30 if quick else 250, batch=256, lr=1e-3,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _tabular(seed, lambda r, n: student_t(r, n, dim, 1.0), 2000, 1000),
        make_flow=lambda: normflows_couplings(dim, 2 if quick else 16, 64),
    )  # fmt: skip


@register
def near_singular(quick: bool) -> Config:
    """Near-singular data with N close to D (nflows). Motivated by bayesiains/nflows#22
    ("Higher dimensional data leads to exploding likelihood": autoregressive rational-quadratic
    splines + ``LULinear`` on 2-D data repeated into 24 features, exactly degenerate; the
    *training* NLL falls without bound, to -45 and lower). Here the flow differs (affine
    couplings), the data are nearly (not exactly) degenerate and few, and the failure measured
    is the *held-out* NLL climbing past the threshold (overfitting of a near-singular sample):
    related to, not a reproduction of, the report's unbounded training likelihood. 40
    training points of 19-D data (a 16-D mixture mapped into 19 features plus noise of std
    1e-2: three near-zero eigenvalues), 1,000 test points; nflows ``ActNorm`` +
    ``AffineCouplingTransform`` + ``RandomPermutation``, 8 layers, hidden 64; full-batch Adam
    lr 1e-3, 500 steps. Threshold: identity NLL + 1 nat/dim."""
    dim = 19
    return Config(
        name="near-singular", backend="nflows",
        mode="near-singular data, N close to D: held-out NLL climbs",
        sources=("bayesiains/nflows#22 (related)",),
        dim=dim, steps=30 if quick else 500, batch=40, lr=1e-3,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _tabular(seed, lambda r, n: _embedded(r, n, dim, 3, 1e-2), 40, 1000),
        make_flow=lambda: nflows_realnvp(dim, 2 if quick else 8, 16 if quick else 64),
    )  # fmt: skip


@register
def outliers(quick: bool) -> Config:
    """Training outliers (FrEIA). Motivated by thoglu/jammy_flows#5 ("NaN during training":
    NaN after a few epochs of a jammy_flows density on a sphere; the report itself names no
    cause; a maintainer reply pointing at large outliers and gradient clipping, quoted in an
    earlier version of this docstring, could not be re-read with the search tool).
    vislearn/FrEIA#38, cited earlier, could not be found with the search tool and is no
    longer cited. The failure did not reproduce: no method failed. Here: 8 ``AllInOneBlock``
    (FrEIA's defaults: soft clamp 2, learned global affine, soft permutation), hidden 64, on
    8-D mixture data with 5 % of the 2,000 training rows replaced by N(0, 30^2) outliers
    (standardised with them, as a user would), clean test set; Adam lr 1e-3, batch 256, 300
    steps. Threshold: identity NLL + 1 nat/dim."""
    dim = 8
    return Config(
        name="outliers", backend="freia", mode="training outliers (did not fail)",
        sources=("thoglu/jammy_flows#5 (motivation)",),
        dim=dim, steps=30 if quick else 300, batch=256, lr=1e-3,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _outlier_split(seed, dim, 2000, 1000),
        make_flow=lambda: freia_allinone(dim, 2 if quick else 8, 64),
    )  # fmt: skip


@register
def high_lr(quick: bool) -> Config:
    """A high learning rate (FrEIA). volflow/DeFlow#4 (the NLL turns NaN and training stops;
    the authors: learned scales become too large or too close to 0, and a 10x lower learning
    rate fixed it for the reporter); y0ast/Glow-PyTorch#1 (NaN loss at the start of Glow
    training on CIFAR-10 for some seeds, fixed by learning-rate warm-up; no warm-up is run
    here). The failure here is the same in kind (training diverges at once) but shows as a
    held-out NLL far above the threshold at the first evaluation rather than as NaN; the
    first report's fix (a 10x lower learning rate) also fixes it here. 8 ``AllInOneBlock``
    (FrEIA's defaults), hidden 64, on 16-D mixture data (2,000 / 1,000 points), Adam at lr
    0.1, batch 256, 300 steps (in trials FrEIA's clamped blocks did not fail at lr 0.03).
    Threshold: identity NLL + 1 nat/dim."""
    dim = 16
    return Config(
        name="high-lr", backend="freia", mode="high learning rate",
        sources=("volflow/DeFlow#4", "y0ast/Glow-PyTorch#1 (related)"),
        dim=dim, steps=30 if quick else 300, batch=256, lr=0.1,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _tabular(seed, lambda r, n: mixture(r, n, dim), 2000, 1000),
        make_flow=lambda: freia_allinone(dim, 2 if quick else 8, 64),
    )  # fmt: skip


@register
def small_set(quick: bool) -> Config:
    """Long training on a small set (zuko): overfitting. Motivated by this project's digits
    demo (normflows on 20 % of the digits: 943.9 +- 1285.5 test bits/dim) and, loosely, by
    PolinaKirichenko/flows_ood#5 ("Validation set loss exploding for baseline realNVP
    training with CIFAR10"), which shows a different failure: RealNVP on the *full* CIFAR-10
    training set whose test bits/dim jump erratically from the first epoch (between 4.7 and
    62,053) while the training bits/dim fall steadily to 3.8. Here the held-out NLL falls,
    then rises steadily past the threshold while the training loss keeps falling: a small
    training set overfitted. zuko ``RealNVP`` (6 couplings, hidden 64) on 300 of
    scikit-learn's 8x8 digits (64-D), 500 other digits held out; full-batch Adam lr 1e-3, 600
    steps. Threshold: identity NLL + 1 nat/dim. A run that survives 600 steps has not
    necessarily stopped overfitting: see the summary's end trend."""
    return Config(
        name="small-set", backend="zuko", mode="overfitting: long training on a small set",
        sources=("PolinaKirichenko/flows_ood#5 (other failure)",),
        dim=64, steps=30 if quick else 600, batch=300, lr=1e-3,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _digits(seed, 300, 500),
        make_flow=lambda: zuko_realnvp(64, 2 if quick else 6, 16 if quick else 64),
    )  # fmt: skip


@register
def spline(quick: bool) -> Config:
    """A spline flow on few points (zuko): overfitting. No public report of this failure was
    found. Cited earlier, but about other failures and not reproduced here:
    VincentStimper/normalizing-flows#24 (a 32-layer autoregressive RQ-spline flow that fits
    its samples well but reports wrong log-probabilities) and bayesiains/nflows#23 (a
    RuntimeError when every input of a batch lies beyond the spline's tail bound; fixed by
    nflows#25). In trials here, nflows and normflows spline flows did not fail on
    heavy-tailed 8-10-D data; what did fail is a spline flow on few points: its held-out NLL
    rises from its best through the end of the run. zuko ``NSF`` (4 autoregressive
    transforms, 8 bins on [-5, 5]), hidden 64, on 100 training points of 16-D mixture data,
    1,000 test points; full-batch Adam lr 1e-3, 500 steps. Threshold: identity NLL + 1
    nat/dim."""
    dim = 16
    return Config(
        name="spline", backend="zuko", mode="overfitting: spline flow, few points",
        sources=(),
        dim=dim, steps=30 if quick else 500, batch=100, lr=1e-3,
        eval_every=10 if quick else 25, margin=1.0,
        make_data=lambda seed: _tabular(seed, lambda r, n: mixture(r, n, dim), 100, 1000),
        make_flow=lambda: zuko_nsf(dim, 2 if quick else 4, 16 if quick else 64),
    )  # fmt: skip


@register
def cifar_small(quick: bool) -> Config:
    """A small image flow on a CIFAR-10 subset (normflows): overfitting. Motivated by
    PolinaKirichenko/flows_ood#5 (RealNVP on the *full* CIFAR-10: test bits/dim spike
    erratically, to 10^2-10^4, from the first epoch while the training loss falls steadily:
    a different failure from the slow rise measured here) and rosinality/glow-pytorch#25
    (Glow with affine couplings on CIFAR-10: weights become NaN; no NaN occurred here). Here:
    a 2-level normflows Glow (``Squeeze``, 3 ``GlowBlock`` per level with the RealNVP ``exp``
    scale map, 1x1 LU convolutions and ActNorm, 24 hidden channels) on 300 random training
    images pooled to 3 x 8 x 8 (192-D), the first 500 test images held out; Adam lr 1e-3,
    batch 64, 600 steps: the held-out NLL falls, then rises steadily past the threshold while
    the training loss keeps falling. NLL in nats/dim of ``(u - 0.5) / 0.25``; bits/dim of the
    256-level pixels = (NLL + ln 64) / ln 2. Threshold: identity NLL + 1 nat/dim. A run that
    survives 600 steps has not necessarily stopped overfitting: see the summary's end trend.
    Needs CIFAR-10 under ``../shared/data``."""
    return Config(
        name="cifar-small", backend="normflows",
        mode="overfitting: small image flow, CIFAR-10 subset",
        sources=("PolinaKirichenko/flows_ood#5 (other failure)",
                 "rosinality/glow-pytorch#25 (other failure)"),
        dim=3 * CIFAR_SIDE**2, steps=30 if quick else 600, batch=64, lr=1e-3,
        eval_every=10 if quick else 50, margin=1.0,
        make_data=lambda seed: _cifar(seed, 300, 500),
        make_flow=lambda: normflows_glow(3, 2, 1 if quick else 3, 8 if quick else 24, CIFAR_SIDE),
        needs_data=True,
    )  # fmt: skip
