"""Sampling (latent-to-data) passes, captured with ``attach(model, direction="sample")``.

For each framework, small models are run through the framework's own sampling API (normflows
``sample`` / ``reverse_kld``, zuko ``rsample_and_log_prob``, nflows ``sample_and_log_prob``,
FrEIA ``model(z, rev=True, jac=True)``), and each layer's record is compared with the exact
Jacobian of that layer's sampling map at the point the pass ran it: the log-determinant
always, and the KLJ term ``sum e^2 - 1 - 2 log|e|`` over the exact diagonal ``e`` for layers
whose sampling map is one triangular factor (up to a permutation of both sides). Layers made
of several factors are also checked factor by factor against the data-to-latent pass on the
same sample (``log e = -log d``), which the framework tests check against exact Jacobians.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.divergence import log_det_of, record_divergence
from klj_reg.kit import MAX_CHECKS
from tests import truth

B = 8


pytestmark = pytest.mark.usefixtures("float64")


def attach(model: nn.Module, direction: str = "sample") -> klj_reg.Capture:
    """Attach for the sampling pass unless told otherwise (detached after the test)."""
    return truth.attach(model, direction)


def noisy(model: nn.Module, std: float = 0.3) -> None:
    """Non-trivial weights (frameworks zero-initialise many output layers)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # not FrEIA's fixed permutation matrices
                p.add_(std * torch.randn_like(p))


def klj_of(diag: Tensor) -> Tensor:
    return (diag.square() - 1 - 2 * diag.abs().log()).sum(1)


def per_sample(t: Tensor) -> Tensor:
    return t.expand(B) if t.numel() == 1 else t.reshape(B)


def take(capture: klj_reg.Capture, sampling: bool) -> dict[str, klj_reg.LayerRecord]:
    found = capture.take_pass(None, True, "sample" if sampling else "data")
    assert found is not None and found.sampling == sampling
    return dict(found.records)


def check_layers(
    recs: dict[str, klj_reg.LayerRecord],
    maps: dict[str, tuple[Callable[[Tensor], Tensor], Tensor]],
    single: set[str],
) -> None:
    """Each layer's record against the exact Jacobian of its sampling map ``fn`` at ``z``."""
    assert set(recs) == set(maps), (sorted(recs), sorted(maps))
    for name, (fn, z) in maps.items():
        jac = truth.jacobian_each(fn, z.detach())
        log_det = torch.linalg.slogdet(jac)[1]
        rec = recs[name]
        torch.testing.assert_close(per_sample(log_det_of(rec)).detach(), log_det, msg=name)
        if rec.log_det is not None:
            torch.testing.assert_close(per_sample(rec.log_det).detach(), log_det, msg=name)
        if name in single:
            exact = klj_of(torch.diagonal(jac, dim1=1, dim2=2))
            torch.testing.assert_close(per_sample(record_divergence(rec)).detach(), exact)


def check_inverted(
    sample: dict[str, klj_reg.LayerRecord], data: dict[str, klj_reg.LayerRecord]
) -> None:
    """Sampling factors are the data-to-latent factors at the same sample, inverted."""
    assert set(sample) == set(data)
    for name, rec in sample.items():
        mine, theirs = rec.factors, data[name].factors
        assert len(mine) == len(theirs), name
        for f, g in zip(mine, theirs, strict=True):
            torch.testing.assert_close(
                f.log_abs_d().detach().expand_as(g.log_abs_d()),
                -g.log_abs_d().detach(),
                msg=name,
            )


def penalty_total(model: nn.Module) -> Tensor:
    return klj_reg.penalty(model, alpha=1.0, normaliser="none", reduction="none")


# FrEIA --------------------------------------------------------------------------------------


def freia_model(dim: int, blocks: list[str]) -> nn.Module:
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))

    inn = Ff.SequenceINN(dim)
    for name in blocks:
        cls = getattr(Fm, name)
        if name in ("ActNorm", "PermuteRandom"):
            inn.append(cls)
        else:
            inn.append(cls, subnet_constructor=subnet)
    noisy(inn)
    inn = inn.double()  # FrEIA builds some tensors in float32
    inn(torch.randn(64, dim))  # ActNorm's data-dependent initialisation
    return inn


FREIA_SINGLE = ("AffineCouplingOneSided", "ActNorm")


@pytest.mark.parametrize(
    ("dim", "blocks"),
    [
        (2, ["AffineCouplingOneSided", "ActNorm", "PermuteRandom", "AffineCouplingOneSided"]),
        (5, ["AllInOneBlock", "GLOWCouplingBlock", "RNVPCouplingBlock", "ActNorm"]),
        (4, ["GINCouplingBlock", "PermuteRandom", "AllInOneBlock"]),
    ],
)
def test_freia_rev_pass_matches_the_exact_jacobian(dim: int, blocks: list[str]) -> None:
    inn = freia_model(dim, blocks)
    z = torch.randn(B, dim)
    maps: dict[str, tuple[Callable[[Tensor], Tensor], Tensor]] = {}
    h = z
    with torch.no_grad():
        for i in reversed(range(len(blocks))):
            block = inn.module_list[i]
            if blocks[i] != "PermuteRandom":
                maps[f"module_list.{i}"] = (lambda t, b=block: b([t], rev=True)[0][0], h)
            (h,), _ = block([h], rev=True)
    capture = attach(inn)
    x, log_det = inn(z, rev=True, jac=True)
    torch.testing.assert_close(x, h)
    single = {f"module_list.{i}" for i, b in enumerate(blocks) if b in FREIA_SINGLE}
    recs = dict(capture.book.latest().records)  # type: ignore[union-attr]
    check_layers(recs, maps, single)
    value = penalty_total(inn)
    torch.testing.assert_close(
        value.detach(), sum(per_sample(record_divergence(r)) for r in recs.values()).detach()
    )
    value.mean().backward()


def test_freia_sampling_factors_are_the_data_factors_inverted() -> None:
    inn = freia_model(4, ["AllInOneBlock", "GLOWCouplingBlock", "RNVPCouplingBlock", "ActNorm"])
    capture = attach(inn, "both")
    x, _ = inn(torch.randn(B, 4), rev=True, jac=True)
    sample = take(capture, True)
    inn(x.detach())
    check_inverted(sample, take(capture, False))


# normflows ----------------------------------------------------------------------------------


def normflows_layers(dim: int, kinds: list[str]) -> list[nn.Module]:
    nf = pytest.importorskip("normflows")
    half = dim // 2
    made: list[nn.Module] = []
    for kind in kinds:
        if kind == "coupling":
            made.append(nf.flows.AffineCouplingBlock(nf.nets.MLP([half, 16, 2 * (dim - half)])))
        elif kind == "sigmoid":
            made.append(
                nf.flows.AffineCouplingBlock(
                    nf.nets.MLP([half, 16, 2 * (dim - half)]), scale_map="sigmoid"
                )
            )
        elif kind == "maf":
            made.append(nf.flows.MaskedAffineAutoregressive(dim, 16, num_blocks=1))
        elif kind == "actnorm":
            made.append(nf.flows.ActNorm(dim))
        elif kind == "arqs":
            made.append(nf.flows.AutoregressiveRationalQuadraticSpline(dim, 1, 16))
        elif kind == "crqs":
            made.append(nf.flows.CoupledRationalQuadraticSpline(dim, 1, 16))
        elif kind == "lu":
            made.append(nf.flows.LULinearPermute(dim))
        elif kind == "permute":
            made.append(nf.flows.Permute(dim, mode="swap"))
    return made


def normflows_model(dim: int, kinds: list[str], target: object = None) -> nn.Module:
    nf = pytest.importorskip("normflows")
    model = nf.NormalizingFlow(
        nf.distributions.DiagGaussian(dim, trainable=False),
        normflows_layers(dim, kinds),
        p=target,
    )
    noisy(model, 0.2)
    with torch.no_grad():
        model.inverse_and_log_det(torch.randn(64, dim))  # ActNorm's initialisation
    return model


def capture_inputs(model: nn.Module) -> tuple[dict[str, Tensor], list[object]]:
    """The input of each layer's ``forward`` (the sampling direction) during the next pass."""
    seen: dict[str, Tensor] = {}
    handles = []
    for i, layer in enumerate(model.flows):  # type: ignore[arg-type]

        def keep(module: nn.Module, args: tuple[Tensor, ...], i: int = i) -> None:
            seen[f"flows.{i}"] = args[0].detach().clone()

        handles.append(layer.register_forward_pre_hook(keep))
    return seen, handles


def normflows_name(model: nn.Module, name: str) -> str:
    """The captured site of layer ``name``: AffineCouplingBlock records its inner coupling."""
    layer = model.get_submodule(name)
    return f"{name}.flows.1" if type(layer).__name__ == "AffineCouplingBlock" else name


@pytest.mark.parametrize(
    ("dim", "kinds"),
    [
        (2, ["coupling", "permute", "maf", "actnorm"]),
        (4, ["sigmoid", "arqs", "permute", "crqs"]),
        (6, ["maf", "lu", "coupling"]),
    ],
)
def test_normflows_sample_matches_the_exact_jacobian(dim: int, kinds: list[str]) -> None:
    model = normflows_model(dim, kinds)
    capture = attach(model)
    seen, handles = capture_inputs(model)
    x, log_q = model.sample(B)
    for h in handles:
        h.remove()  # type: ignore[attr-defined]
    recs = take(capture, True)
    maps = {}
    single = set()
    for i, kind in enumerate(kinds):
        if kind == "permute":
            continue
        name = f"flows.{i}"
        layer = model.flows[i]
        maps[normflows_name(model, name)] = (lambda t, f=layer: f(t)[0], seen[name])
        if kind != "lu":
            single.add(normflows_name(model, name))
    check_layers(recs, maps, single)


def test_normflows_reverse_kld_penalty_needs_no_extra_pass() -> None:
    nf = pytest.importorskip("normflows")
    model = normflows_model(2, ["coupling", "permute", "maf"], nf.distributions.target.TwoMoons())
    attach(model)
    calls = []
    handle = model.flows[2].autoregressive_net.register_forward_hook(lambda *a: calls.append(1))
    loss = model.reverse_kld(B)
    n = len(calls)
    value = klj_reg.penalty(model, alpha=1e-2)
    assert len(calls) == n == 1  # one MADE pass in the sampling direction, none by the penalty
    handle.remove()
    (loss + value).backward()
    assert value > 0


def test_normflows_score_fn_false_keeps_the_sampling_pass() -> None:
    """``reverse_kld(score_fn=False)`` runs the layers' inverse inside the sampling pass; those
    data-to-latent calls do not replace the sampling records."""
    nf = pytest.importorskip("normflows")
    model = normflows_model(2, ["coupling", "maf"], nf.distributions.target.TwoMoons())
    capture = attach(model, "both")
    torch.manual_seed(3)
    model.reverse_kld(B, score_fn=False)
    first = take(capture, True)
    torch.manual_seed(3)
    model.reverse_kld(B)
    second = take(capture, True)
    for name, rec in first.items():
        torch.testing.assert_close(
            record_divergence(rec).detach(), record_divergence(second[name]).detach()
        )


def test_normflows_sampling_factors_are_the_data_factors_inverted() -> None:
    model = normflows_model(4, ["coupling", "maf", "actnorm", "lu", "arqs", "crqs"])
    capture = attach(model, "both")
    x, _ = model.sample(B)
    sample = take(capture, True)
    model.log_prob(x.detach())
    data = take(capture, False)
    assert set(sample) == set(data)
    for name in sample:
        torch.testing.assert_close(
            per_sample(log_det_of(sample[name])).detach(),
            -per_sample(log_det_of(data[name])).detach(),
        )


# nflows -------------------------------------------------------------------------------------


def nflows_flow(dim: int, kinds: list[str]) -> nn.Module:
    pytest.importorskip("nflows")
    from nflows import distributions, flows
    from nflows import transforms as T
    from nflows.nn.nets import ResidualNet

    def net(c_in: int, c_out: int) -> nn.Module:
        return ResidualNet(c_in, c_out, 16, num_blocks=1)

    mask = torch.arange(dim) % 2
    made: list[nn.Module] = []
    for kind in kinds:
        if kind == "maf":
            made.append(T.MaskedAffineAutoregressiveTransform(features=dim, hidden_features=16))
        elif kind == "coupling":
            made.append(T.AffineCouplingTransform(mask=mask, transform_net_create_fn=net))
        elif kind == "actnorm":
            made.append(T.ActNorm(dim))
        elif kind == "rqs-ar":
            made.append(
                T.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    features=dim, hidden_features=16, num_bins=4, tails="linear", tail_bound=3.0
                )
            )
        elif kind == "rqs-coupling":
            made.append(
                T.PiecewiseRationalQuadraticCouplingTransform(
                    mask=1 - mask,
                    transform_net_create_fn=net,
                    num_bins=4,
                    tails="linear",
                    tail_bound=3.0,
                    apply_unconditional_transform=True,
                )
            )
        elif kind == "inverse-maf":
            made.append(
                T.InverseTransform(
                    T.MaskedAffineAutoregressiveTransform(features=dim, hidden_features=16)
                )
            )
        elif kind == "lu":
            made.append(T.LULinear(dim))
        elif kind == "reverse":
            made.append(T.ReversePermutation(dim))
    flow = flows.Flow(T.CompositeTransform(made), distributions.StandardNormal([dim]))
    noisy(flow, 0.2)
    with torch.no_grad():
        flow.log_prob(torch.randn(64, dim))  # ActNorm's initialisation
    return flow


NFLOWS_SINGLE = {"maf", "coupling", "actnorm", "rqs-ar", "rqs-coupling", "inverse-maf"}


@pytest.mark.filterwarnings("ignore:torch.triangular_solve")
@pytest.mark.parametrize(
    ("dim", "kinds"),
    [
        (2, ["maf", "reverse", "coupling", "actnorm"]),
        (4, ["rqs-ar", "reverse", "rqs-coupling", "inverse-maf"]),
        (5, ["lu", "maf", "coupling"]),
    ],
)
def test_nflows_sample_and_log_prob_matches_the_exact_jacobian(dim: int, kinds: list[str]) -> None:
    flow = nflows_flow(dim, kinds)
    layers = list(flow._transform._transforms)
    torch.manual_seed(5)
    noise = flow._distribution.sample(B)
    maps = {}
    h = noise
    with torch.no_grad():
        for i in reversed(range(len(layers))):
            if kinds[i] != "reverse":
                maps[f"_transform._transforms.{i}"] = (lambda t, f=layers[i]: f.inverse(t)[0], h)
            h, _ = layers[i].inverse(h)
    capture = attach(flow)
    torch.manual_seed(5)
    x, log_prob = flow.sample_and_log_prob(B)
    torch.testing.assert_close(x, h)
    single = {f"_transform._transforms.{i}" for i, k in enumerate(kinds) if k in NFLOWS_SINGLE}
    check_layers(take(capture, True), maps, single)


@pytest.mark.filterwarnings("ignore:torch.triangular_solve")
def test_nflows_sampling_factors_are_the_data_factors_inverted() -> None:
    flow = nflows_flow(4, ["maf", "coupling", "actnorm", "lu", "inverse-maf"])
    capture = attach(flow, "both")
    x = flow.sample(B)
    sample = take(capture, True)
    flow.log_prob(x.detach())
    check_inverted(sample, take(capture, False))


# zuko ---------------------------------------------------------------------------------------


def zuko_flow(kind: str, dim: int) -> nn.Module:
    zuko = pytest.importorskip("zuko")
    flows = {
        "MAF": lambda: zuko.flows.MAF(dim, transforms=2, hidden_features=(16,)),
        "NSF": lambda: zuko.flows.NSF(dim, transforms=2, hidden_features=(16,)),
        "RealNVP": lambda: zuko.flows.RealNVP(dim, transforms=2, hidden_features=(16,)),
        "NAF": lambda: zuko.flows.NAF(dim, transforms=1, hidden_features=(16,)),
    }
    if kind == "mixed":  # elementwise, inverse autoregressive, unconditional LU, coupling
        from zuko.flows.autoregressive import MaskedAutoregressiveTransform
        from zuko.flows.coupling import GeneralCouplingTransform
        from zuko.flows.gaussianization import ElementWiseTransform
        from zuko.lazy import LazyInverse, UnconditionalTransform
        from zuko.transforms import LULinearTransform

        lu = torch.randn(dim, dim) + 2 * torch.eye(dim)
        flows["mixed"] = lambda: zuko.flows.Flow(
            [
                ElementWiseTransform(dim),
                LazyInverse(MaskedAutoregressiveTransform(dim, hidden_features=(16,))),
                UnconditionalTransform(LULinearTransform, lu),
                GeneralCouplingTransform(dim, hidden_features=(16,)),
            ],
            zuko.flows.UnconditionalDistribution(
                zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True
            ),
        )
    flow = flows[kind]()
    noisy(flow, 0.2)
    return flow


@pytest.mark.parametrize(
    ("kind", "dim"), [("MAF", 2), ("NSF", 3), ("RealNVP", 4), ("NAF", 2), ("mixed", 3)]
)
def test_zuko_rsample_and_log_prob_matches_the_exact_jacobian(kind: str, dim: int) -> None:
    flow = zuko_flow(kind, dim)
    dist = flow()
    torch.manual_seed(7)
    z = dist.base.rsample((B,))
    maps = {}
    h = z
    with torch.no_grad():
        for i in reversed(range(len(dist.transform.transforms))):
            t = dist.transform.transforms[i]
            name = f"transform.transforms.{i}"
            if type(t).__name__ not in ("PermutationTransform", "RotationTransform"):
                maps[name] = (lambda v, t=t: t.inv(v), h)
            h = t.inv(h)
    capture = attach(flow)
    torch.manual_seed(7)
    x, log_q = flow().rsample_and_log_prob((B,))
    torch.testing.assert_close(x, h)
    lu = {n for n in maps if "LULinear" in type(dist.transform.transforms[int(n[-1])]).__name__}
    check_layers(take(capture, True), maps, set(maps) - lu)


def test_zuko_sampling_factors_are_the_data_factors_inverted() -> None:
    flow = zuko_flow("NSF", 4)
    capture = attach(flow, "both")
    x, _ = flow().rsample_and_log_prob((B,))
    sample = take(capture, True)
    flow().log_prob(x.detach())
    check_inverted(sample, take(capture, False))


# Direction: the default is unchanged, and wrong directions say what to do ------------------


def test_default_attach_ignores_sampling_passes() -> None:
    flow = zuko_flow("MAF", 3)
    attach(flow, "data")
    flow().rsample_and_log_prob((B,))
    with pytest.raises(klj_reg.CaptureError, match="direction='sample'"):
        klj_reg.penalty(flow, alpha=1e-2)
    x = torch.randn(B, 3)
    flow().log_prob(x)
    flow().rsample_and_log_prob((B,))
    assert klj_reg.penalty(flow, x, alpha=1e-2) > 0  # the data pass on x, as before


def test_normflows_default_attach_ignores_sample_and_reverse_kld() -> None:
    nf = pytest.importorskip("normflows")
    model = normflows_model(2, ["coupling", "maf"], nf.distributions.target.TwoMoons())
    capture = attach(model, "data")
    model.sample(B)
    model.reverse_kld(B)
    assert capture.book.latest() is None
    with pytest.raises(klj_reg.CaptureError, match="no captured forward pass"):
        klj_reg.penalty(model, alpha=1e-2)


def test_wrong_direction_errors_name_the_fix() -> None:
    flow = zuko_flow("MAF", 2)
    with pytest.raises(ValueError, match="direction must be one of"):
        klj_reg.attach(flow, direction="reverse")
    with pytest.raises(klj_reg.CaptureError, match=r"attach\(model, direction='sample'\)"):
        klj_reg.penalty(flow, direction="sample", alpha=1e-2)  # not attached yet
    attach(flow, "data")
    with pytest.raises(ValueError, match=r"klj_reg.detach\(model\)"):
        klj_reg.attach(flow, direction="sample")
    with pytest.raises(klj_reg.CaptureError, match=r"direction='sample'"):
        klj_reg.penalty(flow, direction="sample", alpha=1e-2)


def test_sample_only_attach_cannot_run_a_pass_of_its_own() -> None:
    flow = zuko_flow("MAF", 2)
    attach(flow, "sample")
    x = torch.randn(B, 2)
    flow().log_prob(x)  # not recorded
    with pytest.raises(klj_reg.CaptureError, match="cannot run a sampling pass itself"):
        klj_reg.penalty(flow, x, alpha=1e-2)


def test_both_directions_are_read_apart() -> None:
    flow = zuko_flow("RealNVP", 4)
    attach(flow, "both")
    x = torch.randn(B, 4)
    flow().log_prob(x)
    samples, _ = flow().rsample_and_log_prob((B,))
    on_sample = klj_reg.penalty(flow, direction="sample", alpha=1e-2)
    on_data = klj_reg.penalty(flow, x, alpha=1e-2)  # still there: reading the sampling pass kept it
    assert on_sample > 0 and on_data > 0 and not torch.isclose(on_sample, on_data)


def test_registered_layers_refuse_sampling_direction() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.zeros(3))

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x * self.s.exp(), self.s.sum().expand(x.shape[0])

    klj_reg.register_adapter(Scale, lambda layer, inputs, output: layer.s.unsqueeze(0))
    with pytest.raises(klj_reg.UnsupportedModelError, match="register_adapter"):
        klj_reg.attach(Scale(), direction="sample")


def test_no_grad_sample_is_kept_apart() -> None:
    flow = zuko_flow("MAF", 2)
    attach(flow)
    flow().rsample((B,))  # computes no log-det: nothing to read
    with pytest.raises(klj_reg.CaptureError, match="rsample_and_log_prob"):
        klj_reg.penalty(flow, alpha=1e-2)
    with torch.no_grad():
        flow().rsample_and_log_prob((B,))
        value = klj_reg.penalty(flow, alpha=1e-2)
    assert torch.isfinite(value)
    with pytest.raises(klj_reg.CaptureError):
        klj_reg.penalty(flow, alpha=1e-2)  # no grad-mode sampling pass to give a gradient


# The self-check runs on the sampling pass -----------------------------------------------------


def test_sampling_records_are_checked_against_the_layers_own_log_det() -> None:
    inn = freia_model(4, ["AllInOneBlock", "RNVPCouplingBlock", "ActNorm"])
    capture = attach(inn, "both")
    inn(torch.randn(B, 4), rev=True, jac=True)
    klj_reg.penalty(inn, alpha=1e-2)
    for site in capture.sites.values():
        assert site.sample_checks_left < MAX_CHECKS  # checked on the sampling pass
        assert site.checks_left == MAX_CHECKS  # the data-side count is its own


def test_sampling_check_catches_a_wrong_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    inn = freia_model(4, ["AffineCouplingOneSided"])
    pytest.importorskip("klj_reg.adapters.freia")
    from klj_reg import reader

    monkeypatch.setattr(reader, "inverted", list)  # log e = +log d: the wrong map
    attach(inn)
    inn(torch.randn(B, 4), rev=True, jac=True)
    with pytest.raises(klj_reg.AdapterMismatchError, match="module_list.0"):
        klj_reg.penalty(inn, alpha=1e-2)


def test_normflows_conditional_sample_reads_its_dimension_from_the_layers() -> None:
    """``sample(n, context)``'s only tensor is the context: the pass's dimension D (the
    default normaliser) comes from the layers, not from it."""
    nf = pytest.importorskip("normflows")
    layers = [nf.flows.MaskedAffineAutoregressive(4, 16, context_features=3, num_blocks=1)]
    model = nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(4), layers)
    noisy(model, 0.2)
    attach(model)
    context = torch.randn(B, 3)
    values = []
    for normaliser in ("dim", "none"):
        torch.manual_seed(2)
        model.sample(B, context=context)
        values.append(klj_reg.penalty(model, alpha=1.0, normaliser=normaliser))
    torch.testing.assert_close(4 * values[0], values[1])


def test_a_sampling_pass_on_z_is_found_by_z() -> None:
    """``forward_and_log_det(z)`` (normflows) and ``model(z, rev=True)`` (FrEIA) begin their
    pass on ``z``: ``penalty(model, z)`` reads it (by identity, or a copy by value), and
    names a pass a later one superseded."""
    model = normflows_model(2, ["coupling", "maf"])
    attach(model)
    z1, z2 = torch.randn(B, 2), torch.randn(B, 2)
    model.forward_and_log_det(z1)
    first = klj_reg.penalty(model, z1, reduction="none", alpha=1e-2)
    model.forward_and_log_det(z2)
    second = klj_reg.penalty(model, z2.clone(), reduction="none", alpha=1e-2)
    assert not torch.allclose(first, second)
    model.forward_and_log_det(z1)
    model.forward_and_log_det(z2)
    with pytest.raises(klj_reg.CaptureError, match="dropped unread"):
        klj_reg.penalty(model, z1, alpha=1e-2)
    inn = freia_model(3, ["AffineCouplingOneSided", "ActNorm"])
    attach(inn)
    inn(z1.new_ones(B, 3), rev=True)
    inn(torch.randn(B, 3), rev=True)
    with pytest.raises(klj_reg.CaptureError, match="2 grad-mode sampling passes"):
        klj_reg.penalty(inn, direction="sample", alpha=1e-2)  # which one is meant?
    inn(torch.randn(B, 3), rev=True)
    value = klj_reg.penalty(inn, direction="sample", alpha=1e-2)  # the only one
    assert value.shape == ()
