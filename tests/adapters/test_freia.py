"""FrEIA adapter: captured diagonals against exact Jacobians and FrEIA's own log-dets."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from tests.truth import (
    assert_log_det,
    assert_triangular,
    implied_log_det,
    jacobian,
    only,
    records,
)

Ff = pytest.importorskip("FrEIA.framework")
Fm = pytest.importorskip("FrEIA.modules")

F64 = torch.float64
SHAPES = [(6,), (4, 2, 2)]


def mlp(c_in: int, c_out: int) -> nn.Module:
    net = nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))
    with torch.no_grad():  # non-trivial scales: well away from the identity
        for p in net.parameters():
            p.normal_(0, 0.7)
    return net


def conv(c_in: int, c_out: int) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, c_out, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net


def make(cls: type, dims: tuple[int, ...], cond: int = 0, **kwargs: object) -> nn.Module:
    sub = conv if len(dims) == 3 else mlp
    dims_c = [(cond, *dims[1:])] if cond else []
    return cls([dims], dims_c, subnet_constructor=sub, **kwargs).double()


def inputs(dims: tuple[int, ...], cond: int, batch: int = 3) -> tuple[Tensor, list[Tensor]]:
    x = torch.randn(batch, *dims, dtype=F64)
    return x, ([torch.randn(batch, cond, *dims[1:], dtype=F64)] if cond else [])


def call(layer: nn.Module, x: Tensor, cs: list[Tensor], rev: bool = False) -> tuple[Tensor, Tensor]:
    (z,), log_det = layer((x,), c=cs, rev=rev) if cs else layer((x,), rev=rev)
    return z, log_det


def expanded(log_abs: Tensor, dim: int, start: int) -> Tensor:
    """A factor's full diagonal: ones, and exp(log|d|) from flat position ``start`` on."""
    flat = log_abs.exp().reshape(log_abs.shape[0], -1)
    out = torch.ones(flat.shape[0], dim, dtype=flat.dtype)
    out[:, start : start + flat.shape[1]] = flat
    return out


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("cond", [0, 2])
@pytest.mark.parametrize("name", ["GLOWCouplingBlock", "RNVPCouplingBlock", "GINCouplingBlock"])
def test_two_sided_blocks_record_one_factor_per_half(
    name: str, cond: int, dims: tuple[int, ...]
) -> None:
    layer = make(getattr(Fm, name), dims, cond)
    x, cs = inputs(dims, cond)
    rec = only(records(layer, lambda: call(layer, x, cs)))
    first, second = rec.factors
    l1, dim = layer.split_len1, x[0].numel()

    def half1(xx: Tensor, *cc: Tensor) -> Tensor:  # (x1, x2) -> (y1, x2)
        u2 = torch.cat([xx[:, l1:], *cc], 1)
        return torch.cat([layer._coupling1(xx[:, :l1], u2)[0], xx[:, l1:]], 1)

    def half2(yy: Tensor, *cc: Tensor) -> Tensor:  # (y1, x2) -> (y1, y2)
        u1 = torch.cat([yy[:, :l1], *cc], 1)
        return torch.cat([yy[:, :l1], layer._coupling2(yy[:, l1:], u1)[0]], 1)

    with torch.no_grad():
        y = half1(x, *cs)
    j1, j2 = jacobian(half1, x, *cs), jacobian(half2, y, *cs)
    assert_triangular(j1, lower=False)
    assert_triangular(j2, lower=True)
    torch.testing.assert_close(
        torch.diagonal(j1, dim1=1, dim2=2), expanded(first.log_abs_d(), dim, 0)
    )
    start = x[:, :l1][0].numel()
    torch.testing.assert_close(
        torch.diagonal(j2, dim1=1, dim2=2), expanded(second.log_abs_d(), dim, start)
    )
    assert_log_det(rec, call(layer, x, cs)[1])
    assert (first.log_abs_d() - 0).abs().max() > 0.05  # the test is not at the identity


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("cond", [0, 2])
@pytest.mark.parametrize("name", ["AffineCouplingOneSided", "ConditionalAffineTransform"])
def test_one_sided_blocks(name: str, cond: int, dims: tuple[int, ...]) -> None:
    if name == "ConditionalAffineTransform" and not cond:
        pytest.skip("ConditionalAffineTransform needs a condition")
    layer = make(getattr(Fm, name), dims, cond)
    x, cs = inputs(dims, cond)
    rec = only(records(layer, lambda: call(layer, x, cs)))
    (factor,) = rec.factors
    jac = jacobian(lambda xx, *cc: call(layer, xx, list(cc))[0], x, *cs)
    assert_triangular(jac)
    dim = x[0].numel()
    start = (
        0
        if name == "ConditionalAffineTransform"
        else dim - factor.source[:, : layer.split_len2][0].numel()
    )
    torch.testing.assert_close(
        torch.diagonal(jac, dim1=1, dim2=2), expanded(factor.log_abs_d(), dim, start)
    )
    assert_log_det(rec, call(layer, x, cs)[1])


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("cond", [0, 2])
@pytest.mark.parametrize("gin", [False, True])
@pytest.mark.parametrize("global_type", ["SOFTPLUS", "SIGMOID", "EXP"])
def test_all_in_one_block(global_type: str, gin: bool, cond: int, dims: tuple[int, ...]) -> None:
    layer = make(
        Fm.AllInOneBlock,
        dims,
        cond,
        affine_clamping=1.3,
        gin_block=gin,
        global_affine_type=global_type,
        global_affine_init=0.8,
        permute_soft=True,
    )
    with torch.no_grad():
        layer.global_scale.add_(0.3 * torch.randn_like(layer.global_scale))
    x, cs = inputs(dims, cond)
    rec = only(records(layer, lambda: call(layer, x, cs)))
    coupling = rec.factors[0]
    assert len(rec.factors) == (1 if gin else 2)
    l1, dim = layer.splits[0], x[0].numel()

    def couple(xx: Tensor, *cc: Tensor) -> Tensor:  # the coupling factor C alone
        a = layer.subnet(torch.cat([xx[:, :l1], *cc], 1))
        return torch.cat([xx[:, :l1], layer._affine(xx[:, l1:], a)[0]], 1)

    jac = jacobian(couple, x, *cs)
    assert_triangular(jac)
    start = x[:, :l1][0].numel()
    torch.testing.assert_close(
        torch.diagonal(jac, dim1=1, dim2=2), expanded(coupling.log_abs_d(), dim, start)
    )
    # The whole block is P diag(g) C: its Jacobian factorises with the captured global scale.
    block_jac = jacobian(lambda xx, *cc: call(layer, xx, list(cc))[0], x, *cs)
    if not gin:
        g = rec.factors[1]
        assert g.repeat == dim // dims[0]
        scale = g.log_abs_d().exp().expand(1, *dims).reshape(-1)
        perm = torch.kron(
            layer.w_perm.reshape(dims[0], dims[0]), torch.eye(dim // dims[0], dtype=F64)
        )
        torch.testing.assert_close(block_jac, perm @ torch.diag(scale) @ jac)
    assert_log_det(rec, call(layer, x, cs)[1])


@pytest.mark.parametrize("dims", SHAPES)
def test_act_norm_is_shared_per_channel(dims: tuple[int, ...]) -> None:
    layer = Fm.ActNorm([dims]).double()
    x = 3 * torch.randn(5, *dims, dtype=F64) + 1
    call(layer, x, [])  # data-dependent initialisation
    with torch.no_grad():
        layer.scale.add_(0.2 * torch.randn_like(layer.scale))
    rec = only(records(layer, lambda: call(layer, x, [])))
    (factor,) = rec.factors
    assert factor.source.shape[0] == 1 and factor.repeat == x[0].numel() // dims[0]
    jac = jacobian(lambda xx: call(layer, xx, [])[0], x)
    expected = factor.log_abs_d().exp().expand(1, *dims).reshape(1, -1).expand(5, -1)
    torch.testing.assert_close(jac, torch.diag_embed(expected))
    assert_log_det(rec, call(layer, x, [])[1])


def test_haar_and_orthogonal_are_uniform_or_diagonal_factors() -> None:
    haar = Fm.HaarDownsampling([(4, 4, 4)], rebalance=0.5).double()
    x = torch.randn(2, 4, 4, 4, dtype=F64)
    (rec,) = records(haar, lambda: call(haar, x, [])).values()
    jac = jacobian(lambda xx: call(haar, xx, [])[0], x)
    klj = jac.square().sum((1, 2)) - 64 - 2 * torch.linalg.slogdet(jac)[1]  # whole-layer KL
    torch.testing.assert_close(klj_reg.divergence([rec]).expand(2), klj)


def sequence(cond: int = 0) -> nn.Module:
    inn = Ff.SequenceINN(6)
    kw = {"cond": 0, "cond_shape": (cond,)} if cond else {}
    inn.append(Fm.ActNorm)
    inn.append(Fm.AllInOneBlock, subnet_constructor=mlp, affine_clamping=1.0, **kw)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=mlp, **kw)
    inn.append(Fm.PermuteRandom)
    inn.append(Fm.RNVPCouplingBlock, subnet_constructor=mlp, **kw)
    return inn.double()


@pytest.mark.parametrize("cond", [0, 3])
def test_sequence_inn_records_every_block_once_and_matches_its_log_det(cond: int) -> None:
    inn = sequence(cond)
    x = torch.randn(4, 6, dtype=F64)
    c = [torch.randn(4, cond, dtype=F64)] if cond else None
    inn(x, c=c)  # ActNorm initialisation
    recs = records(inn, lambda: inn(x, c=c))
    assert sorted(recs) == ["module_list.0", "module_list.1", "module_list.2", "module_list.4"]
    _, log_det = inn(x, c=c)
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(torch.broadcast_to(total, log_det.shape), log_det)


def test_graph_inn_is_captured() -> None:
    nodes = [Ff.InputNode(4, 2, 2, name="in")]
    nodes.append(Ff.Node(nodes[-1], Fm.AllInOneBlock, {"subnet_constructor": conv}))
    nodes.append(Ff.Node(nodes[-1], Fm.IRevNetDownsampling, {}))
    nodes.append(Ff.Node(nodes[-1], Fm.GLOWCouplingBlock, {"subnet_constructor": conv}))
    nodes.append(Ff.OutputNode(nodes[-1], name="out"))
    inn = Ff.GraphINN(nodes).double()
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    recs = records(inn, lambda: inn(x))
    assert len(recs) == 2
    _, log_det = inn(x)
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(torch.broadcast_to(total, log_det.shape), log_det)


def test_reverse_calls_are_not_recorded() -> None:
    inn = sequence()
    z = torch.randn(4, 6, dtype=F64)
    capture = klj_reg.attach(inn)
    inn(z, rev=True)
    assert capture.records == {}
    with torch.no_grad():
        inn(z)
    assert len(capture.records) == 4


def test_penalty_is_zero_at_identity_and_positive_otherwise() -> None:
    def zero(c_in: int, c_out: int) -> nn.Module:
        net = mlp(c_in, c_out)
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    inn = Ff.SequenceINN(6)
    for _ in range(3):
        inn.append(Fm.AllInOneBlock, subnet_constructor=zero, global_affine_init=1.0)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=zero)
    x = torch.randn(8, 6)
    inn(x)
    assert klj_reg.penalty(inn, x, alpha=1e-2).item() == pytest.approx(0.0, abs=1e-6)
    nonzero = sequence().float()
    nonzero(x)
    nonzero(x)
    assert klj_reg.penalty(nonzero, x, alpha=1e-2).item() > 1e-3


def test_backward_reaches_the_scale_subnetworks() -> None:
    inn = sequence()
    x = torch.randn(8, 6, dtype=F64)
    inn(x)
    inn.zero_grad()
    inn(x)
    klj_reg.penalty(inn, x, alpha=1e-2).backward()
    for name in (
        "module_list.1.subnet",
        "module_list.2.subnet1",
        "module_list.2.subnet2",
        "module_list.4.subnet_s1",
        "module_list.4.subnet_s2",
    ):
        grads = [p.grad for p in inn.get_submodule(name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert inn.module_list[0].scale.grad.abs().sum() > 0  # ActNorm scale
    assert inn.module_list[1].global_scale.grad.abs().sum() > 0


@pytest.mark.parametrize("block", ["AllInOneBlock", "MasterAllInOne"])
def test_released_code_form_matches_the_authors_formula(block: str) -> None:
    """Raw pre-activations are the subnet's output whether the block scales it in place
    (FrEIA 0.2) or not (master)."""
    inn = Ff.SequenceINN(4, 2, 2)
    for _ in range(2):
        inn.append(
            Fm.AllInOneBlock if block == "AllInOneBlock" else MasterAllInOne,
            subnet_constructor=conv,
            affine_clamping=0.7,
            global_affine_type="EXP",
            global_affine_init=0.75,
        )
    inn = inn.double()
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    raws: list[Tensor] = []  # each block's subnet output, before AllInOne scales it
    hooks = [
        b.subnet.register_forward_hook(lambda m, a, o: raws.append(o.clone()))
        for b in inn.module_list
    ]
    inn(x)
    for h in hooks:
        h.remove()
    # per block: sum(raw_active^2) + n_passive - 2 * block_log_det, over 2 blocks
    per_block = []
    xs = x
    for b, raw in zip(inn.module_list, raws, strict=True):
        (xs2,), ld = b((xs,))
        active = raw[:, : b.splits[1]]
        per_block.append(active.square().flatten(1).sum(1) + (16 - active[0].numel()) - 2 * ld)
        xs = xs2
    # the authors divide by the number of blocks and add it to a per-dimension NLL; in
    # per-sample units (the penalty's convention) that is a weight D / blocks
    expected = torch.stack(per_block).sum(0).mean() / 2 * 16
    inn(x)
    got = klj_reg.penalty(inn, x, alpha=1.0, form="released-code")
    torch.testing.assert_close(got, expected)


class MasterAllInOne(Fm.AllInOneBlock):
    """AllInOneBlock as FrEIA's GitHub master computes its coupling: ``a = a * 0.1`` (not in
    place) and ``clamp * tanh(a / clamp)`` — the version drift the adapter must detect."""

    def _affine(self, x: Tensor, a: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        a = a * 0.1
        ch = x.shape[1]
        sub_jac = self.clamp * torch.tanh(a[:, :ch] / self.clamp)
        if self.GIN:
            sub_jac = sub_jac - torch.mean(sub_jac, dim=self.sum_dims, keepdim=True)
        if not rev:
            return x * torch.exp(sub_jac) + a[:, ch:], torch.sum(sub_jac, dim=self.sum_dims)
        return (x - a[:, ch:]) * torch.exp(-sub_jac), -torch.sum(sub_jac, dim=self.sum_dims)


@pytest.mark.parametrize("dims", SHAPES)
def test_all_in_one_block_of_freia_master_is_detected(dims: tuple[int, ...]) -> None:
    layer = make(MasterAllInOne, dims, 0, affine_clamping=1.5)
    with torch.no_grad():
        for p in layer.subnet.parameters():
            p.mul_(4.0)  # large pre-activations, where the two clampings differ
    x, _ = inputs(dims, 0)
    rec = only(records(layer, lambda: call(layer, x, [])))
    l1, dim = layer.splits[0], x[0].numel()

    def couple(xx: Tensor) -> Tensor:
        a = layer.subnet(xx[:, :l1])
        return torch.cat([xx[:, :l1], layer._affine(xx[:, l1:], a)[0]], 1)

    diag = torch.diagonal(jacobian(couple, x), dim1=1, dim2=2)
    coupling = rec.factors[0]
    torch.testing.assert_close(diag, expanded(coupling.log_abs_d(), dim, x[:, :l1][0].numel()))
    v02 = layer.clamp * torch.tanh(0.1 * coupling.source[:, : layer.splits[1]])
    assert (v02 - coupling.log_abs_d()).abs().max() > 1e-2  # the 0.2 formula would be wrong
    assert_log_det(rec, call(layer, x, [])[1])


def test_unknown_all_in_one_variant_is_refused() -> None:
    class Odd(Fm.AllInOneBlock):
        def _affine(self, x: Tensor, a: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
            s = torch.sigmoid(a[:, : x.shape[1]])
            return x * s.exp() + a[:, x.shape[1] :], s.sum(dim=self.sum_dims)

    layer = make(Odd, (6,), 0)
    with pytest.raises(klj_reg.AdapterMismatchError, match="AllInOneBlock"):
        klj_reg.attach(layer)
