"""Passes that cannot go stale (issue 27): unread passes neither block later penalties nor
keep their graphs, an x that is not a pass's input reads the right pass or raises, passes
are found through views of their input, reverse-KL passes are never read for one another,
and pass state is per thread.

Memory is measured by what klj-reg keeps, not by RSS: the passes a model's book holds, and
weak references to the tensors its records held (freed once nothing keeps them).
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.capture import get_capture
from tests import truth

D = 4


def zuko_maf() -> nn.Module:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(features=D, transforms=2, hidden_features=(16,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    truth.attach(flow)
    return flow


def nll(flow: nn.Module, x: Tensor) -> Tensor:
    return -flow().log_prob(x).mean()


def reference(flow: nn.Module, x: Tensor) -> Tensor:
    """The penalty right after a plain pass on ``x`` (nothing else waiting)."""
    klj_reg.clear(flow)
    nll(flow, x)
    return klj_reg.penalty(flow, x, alpha=1.0).detach()


def sources(flow: nn.Module) -> list[weakref.ref[Tensor]]:
    """Weak references to the tensors the records of every pass the model keeps hold."""
    capture = get_capture(flow)
    assert capture is not None
    book = capture.book
    passes = [*book.grad, *([book.latest_no_grad] if book.latest_no_grad else [])]
    return [weakref.ref(f.source) for p in passes for r in p.records.values() for f in r.factors]


def alive(refs: list[weakref.ref[Tensor]]) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


# 1. Unread passes -------------------------------------------------------------------------


def test_an_abandoned_pass_does_not_block_later_penalties() -> None:
    """A forward whose penalty is never taken (here on a view, the input kept alive) and then
    steps whose penalty gets an equal tensor, not the identical one: each step reads its own
    pass (it raised 'N grad-mode passes are waiting', N growing, before)."""
    flow = zuko_maf()
    x0 = torch.randn(32, D)
    nll(flow, x0.view(32, D))  # abandoned
    for _ in range(3):
        x = torch.randn(32, D)
        want = reference(flow, x)
        nll(flow, x0.view(32, D))  # abandoned again
        nll(flow, x.clone())  # the model ran on a copy of x
        torch.testing.assert_close(klj_reg.penalty(flow, x, alpha=1.0).detach(), want)


def test_dropped_forwards_keep_no_graph() -> None:
    """Eight grad-mode forwards whose results are dropped (evaluation without no_grad): at
    most the latest pass is kept, and the records of the others are freed."""
    flow = zuko_maf()
    first: list[weakref.ref[Tensor]] = []
    for i in range(8):
        nll(flow, torch.randn(64, D))
        if i == 0:
            first = sources(flow)
    capture = get_capture(flow)
    assert capture is not None
    assert len([p for p in capture.book.grad if p.records]) <= 1
    assert first and alive(first) == 0
    # the next training step reads its own pass
    x = torch.randn(64, D)
    loss = nll(flow, x) + klj_reg.penalty(flow, x, alpha=1.0)
    loss.backward()


def test_skipped_penalties_keep_no_graph() -> None:
    """Training steps whose penalty is skipped (a bad batch) keep at most one pass."""
    flow = zuko_maf()
    refs: list[weakref.ref[Tensor]] = []
    for _ in range(6):
        x = torch.randn(64, D)
        loss = nll(flow, x)
        refs += sources(flow)
        loss.backward()
        del loss, x
    capture = get_capture(flow)
    assert capture is not None
    assert len(capture.book.grad) <= 1
    assert alive(refs) <= len(sources(flow))


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_the_fallback_estimators_leave_no_pass(estimator: str) -> None:
    flow = zuko_maf()
    refs: list[weakref.ref[Tensor]] = []
    for _ in range(3):
        x = torch.randn(16, D)
        value = klj_reg.penalty(flow, x, alpha=1.0, estimator=estimator)
        value.backward()
        refs += sources(flow)
    capture = get_capture(flow)
    assert capture is not None
    assert [p for p in capture.book.grad if p.records] == []
    assert alive(refs) == 0


def test_accumulation_takes_each_penalty_before_the_next_pass() -> None:
    """Gradient accumulation, the penalty of each micro-batch before the next pass, reads
    each; a penalty on a superseded pass raises naming the cause (it is not kept)."""
    flow = zuko_maf()
    xs = [torch.randn(16, D) for _ in range(3)]
    wants = [reference(flow, x) for x in xs]
    total = torch.zeros(())
    for x, want in zip(xs, wants, strict=True):
        value = klj_reg.penalty(flow, x, alpha=1.0) if nll(flow, x) is not None else None
        assert value is not None
        torch.testing.assert_close(value.detach(), want)
        total = total + value
    total.backward()
    nll(flow, xs[0])
    nll(flow, xs[1])
    with pytest.raises(klj_reg.CaptureError, match="dropped unread"):
        klj_reg.penalty(flow, xs[0], alpha=1.0)
    torch.testing.assert_close(klj_reg.penalty(flow, xs[1], alpha=1.0).detach(), wants[1])


# 2. An x that is not the pass's input -------------------------------------------------------


def test_another_batch_of_the_same_shape_is_never_read() -> None:
    """One pass waiting and an x of its shape with other values: raises naming the mismatch
    (it read the other batch's value before)."""
    flow = zuko_maf()
    x, other = torch.randn(32, D), torch.randn(32, D)
    nll(flow, x)
    with pytest.raises(klj_reg.CaptureError, match="not the batch") as caught:
        klj_reg.penalty(flow, other, alpha=1.0)
    assert "(32, 4)" in str(caught.value)


def test_an_equal_copy_reads_its_pass() -> None:
    """The model ran on a copy of x (``x.to(device)``, ``x.clone()``), gone since."""
    flow = zuko_maf()
    x = torch.randn(32, D)
    want = reference(flow, x)
    nll(flow, x.clone())
    torch.testing.assert_close(klj_reg.penalty(flow, x, alpha=1.0).detach(), want)
    with torch.no_grad():
        nll(flow, x.clone())
        torch.testing.assert_close(klj_reg.penalty(flow, x, alpha=1.0), want)


# 3. Views -----------------------------------------------------------------------------------


def test_a_pass_on_a_view_is_found_by_its_base() -> None:
    """The model is given a view of x (sbi's ``input.unsqueeze(0)``): ``penalty(model, x)``
    reads it, also with several passes waiting."""
    flow = zuko_maf()
    x1, x2 = torch.randn(32, D), torch.randn(32, D)
    want1, want2 = reference(flow, x1), reference(flow, x2)
    nll(flow, x1.unsqueeze(0))
    with torch.no_grad():
        nll(flow, x2.unsqueeze(0))  # a validation pass between
    torch.testing.assert_close(klj_reg.penalty(flow, x1, alpha=1.0).detach(), want1)
    nll(flow, x2[:, :].unsqueeze(0))
    torch.testing.assert_close(klj_reg.penalty(flow, x2, alpha=1.0).detach(), want2)
    nll(flow, x1.unsqueeze(0))
    nll(flow, x2.unsqueeze(0))
    with pytest.raises(klj_reg.CaptureError, match="dropped unread"):
        klj_reg.penalty(flow, x1, alpha=1.0)  # superseded, found through the view


def _sbi_estimator(inner: bool) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """An sbi zuko estimator and what is attached: the estimator, or (``inner``) its zuko
    flow, which sbi hands a view of theta (``input.unsqueeze(0)``)."""
    builders = pytest.importorskip("sbi.neural_nets.net_builders")
    torch.manual_seed(0)
    theta = torch.randn(200, 3) * 2 + 1
    x = theta + 0.1 * torch.randn(200, 3)
    est = builders.build_zuko_maf(batch_x=theta, batch_y=x)
    model = est.net if inner else est
    truth.attach(model)
    return est, model, theta, x


@pytest.mark.parametrize("inner", [True, False], ids=["zuko-flow", "estimator"])
def test_sbi_two_batches_accumulated(inner: bool) -> None:
    est, model, theta, x = _sbi_estimator(inner)
    t1, t2, c1, c2 = theta[:32], theta[32:64], x[:32], x[32:64]
    est.loss(t1, c1)
    want1 = klj_reg.penalty(model, t1, alpha=1.0).detach()
    est.loss(t2, c2)
    want2 = klj_reg.penalty(model, t2, alpha=1.0).detach()
    l1 = est.loss(t1, c1)
    p1 = klj_reg.penalty(model, t1, alpha=1.0)
    l2 = est.loss(t2, c2)
    p2 = klj_reg.penalty(model, t2, alpha=1.0)
    torch.testing.assert_close(p1.detach(), want1)
    torch.testing.assert_close(p2.detach(), want2)
    (l1.mean() + l2.mean() + p1 + p2).backward()


@pytest.mark.parametrize("inner", [True, False], ids=["zuko-flow", "estimator"])
def test_sbi_validation_between(inner: bool) -> None:
    """The documented validation-between pattern with sbi's view of theta."""
    est, model, theta, x = _sbi_estimator(inner)
    t, c = theta[:32], x[:32]
    est.loss(t, c)
    want = klj_reg.penalty(model, t, alpha=1.0).detach()
    loss = est.loss(t, c).mean()
    with torch.no_grad():
        est.loss(theta, x)
        val = klj_reg.penalty(model, theta, alpha=1.0)
    assert torch.isfinite(val)
    got = klj_reg.penalty(model, t, alpha=1.0)
    torch.testing.assert_close(got.detach(), want)
    (loss + got).backward()


# 4. Reverse KL ------------------------------------------------------------------------------


def _sampling_flow() -> nn.Module:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(features=D, transforms=2, hidden_features=(16,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    truth.attach(flow, "sample")
    return flow


def test_two_sampling_passes_then_two_penalties_raise_at_the_first() -> None:
    flow = _sampling_flow()
    flow().rsample_and_log_prob((16,))
    flow().rsample_and_log_prob((16,))
    with pytest.raises(klj_reg.CaptureError, match="sampling passes"):
        klj_reg.penalty(flow, alpha=1.0)
    # not blocked afterwards: one pass, one penalty
    for _ in range(2):
        flow().rsample_and_log_prob((16,))
        klj_reg.penalty(flow, alpha=1.0).backward()


def test_one_sampling_pass_per_penalty_reads_each() -> None:
    flow = _sampling_flow()
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        flow().rsample_and_log_prob((16,))
        values.append(klj_reg.penalty(flow, alpha=1.0).detach())
    assert not torch.allclose(values[0], values[1])


# 9. Threads ---------------------------------------------------------------------------------


class _Blocking(nn.Module):
    """Waits inside its forward until told to go on (so that a pass stays open)."""

    def __init__(self, inside: threading.Event, go: threading.Event) -> None:
        super().__init__()
        self.inside, self.go = inside, go

    def forward(self, x: Tensor) -> Tensor:
        self.inside.set()
        assert self.go.wait(10)
        return x


@pytest.fixture
def scale_adapter() -> Iterator[None]:
    from tests.core.test_monitor import Scale

    klj_reg.register_adapter(
        Scale,
        lambda layer, inputs, output: layer.log_scale.expand_as(inputs[0]),
        log_det=lambda layer, inputs, output: output[1],
    )
    yield


@pytest.mark.usefixtures("scale_adapter")
def test_a_pass_open_in_another_thread_keeps_this_threads_records() -> None:
    """Model A's pass is open in a thread while this thread runs model B's layers by hand
    (an implicit pass): B's records are kept (they were dropped before)."""
    from tests.core.test_monitor import Chain, Scale

    inside, go = threading.Event(), threading.Event()
    a = nn.Sequential(Scale(D), _Blocking(inside, go))
    b = Chain(2, D)
    truth.attach(a)
    truth.attach(b)
    errors: list[BaseException] = []

    def run_a() -> None:
        try:
            a(torch.randn(8, D))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert inside.wait(10)
        x = torch.randn(8, D)
        h = x
        for layer in b.layers:
            h, _ = layer(h)
        recorded = dict(get_capture(b).records)  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no pass of its own
            value = klj_reg.penalty(b, x, alpha=1.0)
    finally:
        go.set()
        thread.join(10)
    assert not errors
    assert list(recorded) == ["layers.0", "layers.1"]
    assert value > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert klj_reg.penalty(a, alpha=1.0) > 0  # A's pass, ended in its thread


@pytest.mark.usefixtures("scale_adapter")
def test_detach_ends_a_pass_left_open_in_this_thread() -> None:
    """A pass that never ended (a list-of-transforms model with one transform called by
    hand) kept this thread's other models from recording outside a pass, even after its
    model was detached; detaching (or clearing) it ends it."""
    from klj_reg import passes
    from tests.core.test_monitor import Chain

    a, b = Chain(2, D), Chain(2, D)
    truth.attach(b)
    capture = klj_reg.attach(a)
    capture.book.begin(None, 8, D)  # begun, never ended
    assert passes._active()
    klj_reg.detach(a)
    assert not passes._active()
    x = torch.randn(8, D)
    h = x
    for layer in b.layers:
        h, _ = layer(h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read from b's own records: no pass of its own
        assert torch.isfinite(klj_reg.penalty(b, x, alpha=1.0))
