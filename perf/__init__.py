"""`make perf`: timing and memory of the suite's hot paths against targets and peer tools.

``python -m perf`` (:mod:`perf.__main__`) times each workload interleaved with its peers;
:mod:`perf.child` runs one workload in a process of its own for its peak memory;
:mod:`perf.work` builds the workloads and :mod:`perf.report` writes the figures.
"""
