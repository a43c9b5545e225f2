"""CUDA sources of gpuhnsw (installed as the package ``gpuhnsw.kernels``).

Nothing to import here: ``gpuhnsw._kernels`` reads the ``.cu`` / ``.cuh`` files next to this one
and compiles them with NVRTC through CuPy. See README.md in this folder.
"""
