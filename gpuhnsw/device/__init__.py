"""The GPU side, one module per job: ``arrays`` (the one home of the CuPy import, host/device
conversions), ``kernels`` (the loader: sources, instantiations, compilation), ``launch`` (launch
arithmetic and the launchers, the only Python that knows a kernel's arguments), ``mirror`` (the
device copy of a core's graph, kept in step by deltas), ``ops`` (top-k selection, in-batch exact
neighbours), ``brute`` (exact search and the exact k-NN graph: screening on tensor cores, certified)
and ``clock`` (seconds per phase from CUDA events).  Nothing here imports CuPy before it is needed.
"""
