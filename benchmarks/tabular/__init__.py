"""``python -m benchmarks tabular``: the KLJ alpha grid on real tables, eight flows, four
backends. It is made to choose the library's default ``alpha`` and to test the
validation-chosen alpha (:func:`klj_reg.pick_alpha`).

Data (:mod:`.data`): scikit-learn's bundled tables, read from files inside the package (no
download): iris (D = 4), wine (13), breast_cancer (30), diabetes (its 10 features and the
target, 11) and digits (64 integer pixels); every column dequantised at its own resolution
(``U[0, g)`` noise, ``g`` the smallest gap between its values: :mod:`.data`). Per
seed ``s`` in {0, 1, 2}: a permutation of the rows (generator seeded by ``s`` and the data
set) cut 60/20/20 into train/validation/test; every column standardised with the training
split's mean and standard deviation.

Models (:mod:`.models`), two per backend, 4 layers, hidden width 64, starting at (or near) the
identity: freia-allinone, freia-glow, nflows-realnvp, nflows-maf, normflows-realnvp,
normflows-maf, zuko-realnvp, zuko-nsf. normflows-maf is normflows' MADE layer turned with
``nf.flows.Reverse`` so that data to latent is its one-pass direction (as in nflows and zuko);
normflows' layer as it comes (``normflows-maf-loop``, D MADE passes per layer and step, ~40x
the time of the turned one at D = 64) is left out of the default grid to fit the time budget.

Training (:mod:`.run`): per (data set, model, seed) the same split, the same initial
parameters (``torch.manual_seed`` and numpy's seed from the cell before the flow is built)
and the same batches for every alpha, so comparisons are paired. Adam, learning rate 1e-3,
batches of 64 from a seeded epoch shuffle of the training split, 1,000 steps (``--steps``),
no early stopping, loss = mean NLL per sample (nats) + ``klj_reg.penalty(model, x,
alpha=alpha)``, the penalty per sample (the library's convention: summed over layers and
dimensions, not divided by D). alpha in {0,
0.001, 0.01, 0.1, 1, 10} (``--alphas``); at alpha = 0 the loss is the NLL alone and the
penalty is read (in grad mode, for the monitor) but left out of it. Every run has a
``klj_reg.Monitor(model, warn=False)`` with its default arguments. A non-finite training loss
stops the run (a blow-up at that step); a test mean NLL that is non-finite or above 10
nats/dim is a blow-up too.

Recorded per run (one JSON line in ``benchmarks/results/tabular/runs.jsonl``, written as each
run ends; a rerun skips the finished (data set, model, seed, alpha, steps) keys): sizes,
validation and test NLL in nats per dimension (test: mean, median, worst sample, fraction
non-finite), blow-up, monitor flags and the first flag's step, median step time, the KLJ
(unweighted) and the penalty at the last step, commit, machine and versions.

Runs go cell by cell (all alphas of a (data set, model, seed) before the next, all cells of
a seed before the next seed) on ``--workers`` processes (2), one torch thread each. The full
grid is 5 x 8 x 3 x 6 = 720 runs of 1,000 steps: measured thread CPU time per step 4-10 ms
for the affine flows and 13-42 ms for zuko's NSF, ~53 minutes on two otherwise idle cores
(``benchmarks/README.md``); the command prints its own estimate after its first runs.
``--quick`` (tests): iris, seed 0, alphas 0 and 0.01, 20 steps, hidden width 16, into
``benchmarks/runs/tabular-quick``. ``--report`` only rewrites ``report.md`` and
``figure.png`` (:mod:`.report`) from ``runs.jsonl``, as every run does at its end.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The command line (see :func:`benchmarks.tabular.run.main`)."""
    from .run import main as run_main

    return run_main(argv)
