"""Reproductions of the paper's experiments, the embedded demo and the overhead benchmark.

Run ``python -m benchmarks <command> --help``; commands: demo, linear, ood, outliers,
trainsize, sweep, overhead.
"""
