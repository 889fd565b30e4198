"""LargeFedBench: the privacy-utility benchmark of popri (POPri against DP-FedAvg, PE and the ε=0 / ε=∞ references).

Entry points: ``popri bench`` (:mod:`benchmark.cli`) and :func:`benchmark.run.run_benchmark`. See docs/benchmark.md.
"""
