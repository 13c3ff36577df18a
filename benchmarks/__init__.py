"""Reproductions of the paper's experiments, the embedded demo and the overhead benchmark.

Run ``python -m benchmarks <command> --help``; commands: demo, linear, ood, outliers,
trainsize, sweep, overhead, stability. Subpackages by purpose: :mod:`.common` (backends, flow
builders, run records), :mod:`.cifar` (the CIFAR-10 reproduction), :mod:`.toy` (the digits
demo and the linear flow), :mod:`.overhead` (the cost of the penalty) and :mod:`.stability`
(the training-failure gallery).
"""
