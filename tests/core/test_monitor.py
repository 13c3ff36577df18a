"""The per-layer KLJ monitor: values against the exact per-layer Jacobian diagonal, logging,
and its flag on a constructed blow-up."""

from __future__ import annotations

import math
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
        klj_reg.penalty(model, x)
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
    comes at the first step where its KLJ exceeds 10x max(window minimum, floor 1)."""
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
        for t in range(30)
        if klj(s_of[t])
        > 10 * max(min(klj(v) for v in s_of[max(0, t - 5) : t] or [klj(s_of[t])]), 1.0)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(30):
            with torch.no_grad():
                model.layers[1].log_scale.fill_(s_of[t])
            model(x)
            klj_reg.penalty(model, x)
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
        klj_reg.penalty(model)
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
        klj_reg.penalty(model, x)
    assert logged == list(range(1, 9)) and monitor.flags == []
    unwarmed = klj_reg.Monitor(Chain(dim=3), window=3, warn=False)
    for t in range(8):
        with torch.no_grad():
            unwarmed.model.layers[0].log_scale.fill_(min(0.6 * t, 1.8))
        unwarmed.model(x)
        klj_reg.penalty(unwarmed.model, x)
    assert [f.layer for f in unwarmed.flags] == ["layers.0"]  # the false alarm it avoids


def test_monitor_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="every"):
        klj_reg.Monitor(Chain(), every=0)
    with pytest.raises(ValueError, match="factor"):
        klj_reg.Monitor(Chain(), factor=1.0)
