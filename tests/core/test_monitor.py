"""The per-layer KLJ monitor: values against the exact per-layer Jacobian diagonal, logging,
its flag on a constructed blow-up, its per-entry floor, validation penalties it ignores, and
its defaults on real training: silent on a healthy run, flagging a run whose scales run away
before its loss is lost."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from tests.truth import diagonal


def klj_of(diag: Tensor) -> Tensor:
    """Batch mean of sum_j d^2 - 1 - 2 log|d| over a ``(B, D)`` exact diagonal."""
    return (diag.square() - 1 - 2 * diag.abs().log()).sum(1).mean()


class Scale(nn.Module):
    """``y = x * exp(s)`` with one learnable log-scale per feature (unbounded)."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.log_scale.expand_as(x)
        return x * s.exp(), s.sum(1)


class Chain(nn.Module):
    def __init__(self, n: int = 3, dim: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Scale(dim) for _ in range(n))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = torch.zeros(x.shape[0])
        for layer in self.layers:
            x, log_det = layer(x)
            total = total + log_det
        return x, total


@pytest.fixture(autouse=True)
def _scale_adapter() -> None:
    klj_reg.register_adapter(
        Scale,
        lambda layer, inputs, output: layer.log_scale.expand_as(inputs[0]),
        log_det=lambda layer, inputs, output: output[1],
    )


def _inputs_of(layers: list[nn.Module], run: Callable[[], object], method: str = "") -> list:
    """Each layer's input during ``run()`` (through a forward hook, or a wrapped method)."""
    seen: list[list[Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        if method:
            original = getattr(layer, method)

            def wrapped(
                *args: object, _i: int = i, _f: Callable = original, **kw: object
            ) -> object:
                seen[_i].append(args[0])  # type: ignore[arg-type]
                return _f(*args, **kw)

            setattr(layer, method, wrapped)
        else:
            handles.append(
                layer.register_forward_pre_hook(lambda m, a, _i=i: seen[_i].append(a[0]))
            )
    try:
        run()
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            if method:
                layer.__dict__.pop(method, None)
    return [s[-1].detach() for s in seen]


def _check(
    model: nn.Module,
    run: Callable[[], object],
    layers: dict[str, Callable[[Tensor], Tensor]],
    inputs: list[Tensor],
) -> None:
    klj_reg.attach(model)
    klj_reg.clear(model)
    run()
    got = klj_reg.layer_divergence(model)
    assert list(got) == list(layers)
    for (name, fn), x in zip(layers.items(), inputs, strict=True):
        want = klj_of(diagonal(fn, x))
        torch.testing.assert_close(got[name].double(), want.double(), rtol=1e-4, atol=1e-5)
        assert want > 1e-3, name


def test_layer_values_equal_the_exact_per_layer_kl_user_layers() -> None:
    model = Chain()
    x = torch.randn(8, 3)
    run = lambda: model(x)  # noqa: E731
    inputs = _inputs_of(list(model.layers), run)
    _check(
        model,
        run,
        {f"layers.{i}": (lambda t, _m=m: _m(t)[0]) for i, m in enumerate(model.layers)},
        inputs,
    )


def test_layer_values_equal_the_exact_per_layer_kl_zuko() -> None:
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.MAF(4, transforms=3, hidden_features=[16])
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(8, 4)
    transforms = list(flow.transform.transforms)
    inputs, t = [], x
    for lazy in transforms:  # each transform's input in log_prob's order
        inputs.append(t)
        t = lazy(None)(t)
    layers = {
        f"transform.transforms.{i}": (lambda t, _l=lazy: _l(None)(t))
        for i, lazy in enumerate(transforms)
        if not isinstance(lazy(None), zuko.transforms.PermutationTransform)
    }
    inputs = [
        inp
        for inp, lazy in zip(inputs, transforms, strict=True)
        if not isinstance(lazy(None), zuko.transforms.PermutationTransform)
    ]
    _check(flow, lambda: flow().log_prob(x), layers, inputs)


def test_layer_values_equal_the_exact_per_layer_kl_normflows() -> None:
    nf = pytest.importorskip("normflows")
    layers = [nf.flows.MaskedAffineAutoregressive(4, 16) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(4), layers)
    x = torch.randn(8, 4)
    run = lambda: model.forward_kld(x)  # noqa: E731
    inputs = _inputs_of(layers, run, method="inverse")
    fns = {f"flows.{i}": (lambda t, _m=m: _m.inverse(t)[0]) for i, m in enumerate(layers)}
    names = list(fns)[::-1]  # the data-to-latent pass runs the flows in reverse
    _check(model, run, {n: fns[n] for n in names}, inputs[::-1])


def test_the_monitor_is_fed_by_the_penalty_and_logs() -> None:
    model = Chain()
    logged: list[tuple[dict[str, float], int]] = []

    class Writer:  # the part of SummaryWriter the monitor uses
        def __init__(self) -> None:
            self.scalars: dict[str, list[tuple[float, int]]] = {}

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.setdefault(tag, []).append((value, step))

    writer = Writer()
    calls = klj_reg.Monitor(model, log=lambda v, s: logged.append((v, s)), every=2)
    tensorboard = klj_reg.Monitor(model, log=writer)
    x = torch.randn(8, 3)
    for _ in range(5):
        model(x)
        klj_reg.penalty(model, x, alpha=1e-2)
    assert [s for _, s in logged] == [1, 3, 5]  # every second penalty
    model(x)
    expected = {k: float(v) for k, v in klj_reg.layer_divergence(model, x).items()}
    assert logged[-1][0] == pytest.approx(expected)
    assert set(writer.scalars) == {"klj/layers.0", "klj/layers.1", "klj/layers.2", "klj/total"}
    assert [s for _, s in writer.scalars["klj/total"]] == [1, 2, 3, 4, 5]
    assert writer.scalars["klj/total"][-1][0] == pytest.approx(sum(expected.values()))
    calls.close()
    tensorboard.close()


def test_the_monitor_flags_a_constructed_blow_up() -> None:
    """Layer 1's log-scale stays at 0.1 for 10 steps, then grows by 0.4 a step; the flag
    comes at the first step where its KLJ exceeds 10x max(window median, floor 1 x dim 3)."""
    model = Chain(dim=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.log_scale.fill_(0.1)
    monitor = klj_reg.Monitor(model, window=5, factor=10.0, floor=1.0)
    x = torch.randn(4, 3)
    s_of = [0.1 if t < 10 else 0.1 + 0.4 * (t - 9) for t in range(30)]

    def klj(s: float) -> float:
        return 3 * (math.exp(2 * s) - 1 - 2 * s)

    expected = next(
        t + 1
        for t in range(1, 30)
        if klj(s_of[t])
        > 10 * max(statistics.median(klj(v) for v in s_of[max(0, t - 5) : t]), 1.0 * 3)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(30):
            with torch.no_grad():
                model.layers[1].log_scale.fill_(s_of[t])
            model(x)
            klj_reg.penalty(model, x, alpha=1e-2)
    assert [(f.step, f.layer) for f in monitor.flags] == [(expected, "layers.1")]
    assert any(w.category is klj_reg.DivergenceGrowthWarning for w in caught)
    with torch.no_grad():
        model.layers[2].log_scale.fill_(float("nan"))
    model(x)
    flags = monitor.step(x)  # a loop without the penalty
    assert [(f.layer, math.isnan(f.reference)) for f in flags] == [("layers.2", True)]
    monitor.close()


def test_layer_divergence_reads_and_takes_the_pass() -> None:
    model = Chain()
    x = torch.randn(8, 3)
    klj_reg.attach(model)
    model(x)
    values = klj_reg.layer_divergence(model, x)
    assert set(values) == {"layers.0", "layers.1", "layers.2"}
    with pytest.raises(klj_reg.CaptureError, match="no captured forward pass"):
        klj_reg.penalty(model, alpha=1e-2)
    with torch.no_grad():
        model(x)
    again = klj_reg.layer_divergence(model)  # a no-grad pass: fine for a diagnostic
    assert {k: float(v) for k, v in again.items()} == pytest.approx(
        {k: float(v) for k, v in values.items()}
    )


def test_warmup_observations_are_logged_but_never_flagged() -> None:
    model = Chain(dim=3)
    logged: list[int] = []
    monitor = klj_reg.Monitor(
        model, log=lambda v, s: logged.append(s), window=3, warmup=4, warn=False
    )
    x = torch.randn(4, 3)
    for t in range(8):  # from the identity, the scales grow fast and then stay
        with torch.no_grad():
            model.layers[0].log_scale.fill_(min(0.6 * t, 1.8))
        model(x)
        klj_reg.penalty(model, x, alpha=1e-2)
    assert logged == list(range(1, 9)) and monitor.flags == []
    unwarmed = klj_reg.Monitor(Chain(dim=3), window=3, warn=False)
    for t in range(8):
        with torch.no_grad():
            unwarmed.model.layers[0].log_scale.fill_(min(0.6 * t, 1.8))
        unwarmed.model(x)
        klj_reg.penalty(unwarmed.model, x, alpha=1e-2)
    assert [f.layer for f in unwarmed.flags] == ["layers.0"]  # the false alarm it avoids


def test_monitor_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="every"):
        klj_reg.Monitor(Chain(), every=0)
    with pytest.raises(ValueError, match="factor"):
        klj_reg.Monitor(Chain(), factor=1.0)


def _log_scale_with(klj: float) -> float:
    """The log-scale ``s > 0`` whose KLJ per entry, ``exp(2 s) - 1 - 2 s``, is ``klj``."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.exp(2 * mid) - 1 - 2 * mid < klj else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("dim", [2, 64])
def test_the_floor_is_per_entry_so_it_scales_with_the_layers_dimension(dim: int) -> None:
    """A layer jumps from the identity to a KLJ of ``k`` per entry (``k * dim`` in all): with
    the defaults (floor 0.1 per entry, factor 10) it is flagged iff ``k > 1``, at any ``dim``.
    An absolute floor of 1 (the old default) flagged the 64-entry layer at 0.5 per entry and
    missed the 2-entry layer at 2 per entry."""
    x = torch.randn(8, dim)
    for per_entry, flagged in [(0.5, False), (2.0, True)]:
        model = Chain(n=1, dim=dim)
        monitor = klj_reg.Monitor(model, warn=False)
        for s in [0.0, 0.0, _log_scale_with(per_entry)]:
            with torch.no_grad():
                model.layers[0].log_scale.fill_(s)
            model(x)
            klj_reg.penalty(model, x, alpha=1e-2)
        assert monitor.dims == {"layers.0": dim}
        assert monitor.latest["layers.0"] == pytest.approx(per_entry * dim, rel=1e-4)
        assert [(f.step, f.layer) for f in monitor.flags] == ([(3, "layers.0")] if flagged else [])
        monitor.close()


def test_penalties_without_gradients_are_not_observed() -> None:
    """A validation penalty under ``torch.no_grad()`` (here on a blown-up layer) is neither
    logged, nor flagged, nor counted as a step; ``monitor.step(x)`` is observed either way."""
    model = Chain(dim=3)
    logged: list[int] = []
    monitor = klj_reg.Monitor(model, log=lambda v, s: logged.append(s), window=3)
    x, held_out = torch.randn(8, 3), torch.randn(8, 3)
    for _ in range(4):
        model(x)
        klj_reg.penalty(model, x, alpha=1e-2)  # training: observed
        with torch.no_grad():
            model.layers[0].log_scale.add_(20.0)
            model(held_out)
            assert torch.isfinite(
                klj_reg.penalty(model, held_out, alpha=1e-2)
            )  # computed, not observed
            model.layers[0].log_scale.sub_(20.0)
    assert logged == [1, 2, 3, 4] and monitor.seen == 4 and monitor.flags == []
    with torch.no_grad():
        model(held_out)
        monitor.step(held_out)  # an explicit step is observed, with or without gradients
    assert logged == [1, 2, 3, 4, 5]
    monitor.close()


def _mixture(n: int, dim: int, seed: int = 0) -> Tensor:
    """Standardised draws from a 4-component mixture of correlated Gaussians."""
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(4, dim, generator=g)
    mixes = torch.randn(4, dim, dim, generator=g) / dim**0.5
    label = torch.randint(4, (n,), generator=g)
    eps = torch.randn(n, dim, generator=g)
    x = means[label] + torch.einsum("nd,nkd->nk", eps, mixes[label])
    return (x - x.mean(0)) / x.std(0)


def _couplings(dim: int, layers: int = 4) -> nn.Module:
    """normflows ``AffineCouplingBlock`` (unbounded exp scale, zero-initialised output, so the
    flow starts at the identity) and swap permutations."""
    nf = pytest.importorskip("normflows")
    flows: list[nn.Module] = []
    for _ in range(layers):
        net = nf.nets.MLP([dim // 2, 32, 32, dim], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="swap")]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)


def test_the_defaults_raise_no_flag_on_a_healthy_run() -> None:
    """150 steps of Adam (lr 1e-3) on a 64-D mixture from the identity: the layers' KLJ grows
    from 0 to tens, fast enough that the old defaults (10x the window minimum, absolute floor
    1) flagged layers as running away; the defaults flag none."""
    model = _couplings(64)
    data = _mixture(2000, 64)
    history: list[dict[str, float]] = []
    monitor = klj_reg.Monitor(model, log=lambda v, s: history.append(v))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", klj_reg.DivergenceGrowthWarning)
        for _ in range(150):
            x = data[torch.randint(len(data), (64,))]
            loss = model.forward_kld(x) + klj_reg.penalty(model, x, alpha=1e-2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    monitor.close()
    assert monitor.flags == [] and len(history) == 150
    assert losses[-1] < losses[0] - 20  # it trained
    old = [
        name
        for name in history[0]
        if any(
            history[t][name] > 10 * max(1.0, min(h[name] for h in history[max(0, t - 20) : t]))
            for t in range(1, len(history))
        )
    ]
    assert old  # what the old defaults would have flagged


def test_a_layer_whose_scales_run_away_is_flagged_before_the_loss_is_lost() -> None:
    """From step 21, one coupling's output layer is multiplied by 1.2 a step (its log-scales
    grow until exp overflows): it is flagged while the loss is still at its level before the
    run-away, steps before the loss turns non-finite."""
    model = _couplings(8)
    data = _mixture(1000, 8)
    monitor = klj_reg.Monitor(model, warn=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = model.flows[2].flows[1].param_map.net[-1]  # coupling 2's output layer
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", klj_reg.NonFiniteScaleWarning)
        for step in range(1, 121):
            if step > 20:
                with torch.no_grad():
                    out.weight.mul_(1.2)
                    out.bias.mul_(1.2)
            x = data[torch.randint(len(data), (64,))]
            loss = model.forward_kld(x) + klj_reg.penalty(model, x, alpha=1e-2)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    monitor.close()
    lost = len(losses)  # the step whose loss is non-finite
    assert not math.isfinite(losses[-1]) and lost > 25
    first = monitor.flags[0]
    assert first.layer == "flows.2.flows.1" and first.step < lost - 3
    assert losses[first.step - 1] < 1.2 * max(losses[10:20])  # the loss does not show it yet


def test_a_high_learning_rate_is_flagged_on_the_pass_whose_loss_jumps() -> None:
    """The stability gallery's high-lr failure, small: 4 FrEIA ``AllInOneBlock`` on a 16-D
    mixture at Adam lr 0.1. The second update throws the loss up by 50-1000x; the monitor
    flags that pass (step 3), before the optimiser steps on it (the pass before, one update
    from the identity, is indistinguishable from healthy training)."""
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")

    def subnet(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(
            nn.Linear(c_in, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, c_out)
        )
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        return net

    inn = Ff.SequenceINN(16)
    for _ in range(4):
        inn.append(Fm.AllInOneBlock, subnet_constructor=subnet)
    data = _mixture(2000, 16)
    monitor = klj_reg.Monitor(inn, warn=False)
    optimizer = torch.optim.Adam(inn.parameters(), lr=0.1)
    losses = []
    for _ in range(10):
        x = data[torch.randint(len(data), (256,))]
        z, log_det = inn(x)
        loss = (0.5 * z.square().sum(1) - log_det).mean() / 16 + klj_reg.penalty(inn, x, alpha=1e-2)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    monitor.close()
    jump = next(t for t, v in enumerate(losses, 1) if v > 10 * losses[0])
    assert monitor.flags and monitor.flags[0].step == jump == 3


# Lifecycle (issue 27) -------------------------------------------------------------------------


def test_a_monitor_survives_detach_and_attach() -> None:
    model = Chain()
    logged: list[int] = []
    monitor = klj_reg.Monitor(model, log=lambda v, s: logged.append(s))
    x = torch.randn(8, 3)
    model(x)
    klj_reg.penalty(model, x, alpha=1e-2)
    klj_reg.detach(model)
    klj_reg.attach(model)
    for _ in range(2):
        model(x)
        klj_reg.penalty(model, x, alpha=1e-2)
    assert logged == [1, 2, 3]
    monitor.close()
    model(x)
    klj_reg.penalty(model, x, alpha=1e-2)
    assert logged == [1, 2, 3]
    klj_reg.detach(model)


def test_a_sampling_direction_model_is_monitored_and_counts_training_penalties() -> None:
    """A model attached with ``direction="sample"`` (reverse KL) can be monitored, its
    penalty still works, and only penalties with gradients on count as steps."""
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.MAF(features=3, transforms=2, hidden_features=(8,))
    klj_reg.attach(flow, direction="sample")
    logged: list[tuple[list[str], int]] = []
    monitor = klj_reg.Monitor(flow, log=lambda v, s: logged.append((sorted(v), s)))
    for _ in range(3):
        flow().rsample_and_log_prob((16,))
        klj_reg.penalty(flow, alpha=1.0).backward()
        with torch.no_grad():
            flow().rsample_and_log_prob((16,))
            klj_reg.penalty(flow, alpha=1.0)  # validation: not a step
    assert [s for _, s in logged] == [1, 2, 3] and monitor.seen == 3
    assert logged[0][0] == ["transform.transforms.0", "transform.transforms.1"]
    monitor.close()
    klj_reg.detach(flow)
