"""Build of the C extension gpuhnsw._core (the rest is in pyproject.toml).

SIMD kernels are compiled with per-function ``target`` attributes and chosen at run time
(AVX-512, AVX2+FMA, portable), so no ``-march=native``: a wheel built on one x86 machine runs on
another.  Set ``GHNSW_NATIVE=1`` to add ``-march=native`` for a local build anyway, and
``GHNSW_SANITIZE=address`` for an AddressSanitizer build.
"""
import glob
import os

from setuptools import Extension, setup

cflags = ["-std=c11", "-D_GNU_SOURCE", "-O3", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
ldflags = ["-pthread"]
if os.environ.get("GHNSW_NATIVE") == "1":
    cflags.append("-march=native")
san = os.environ.get("GHNSW_SANITIZE")
if san:
    cflags += [f"-fsanitize={san}", "-fno-omit-frame-pointer", "-g", "-O1"]
    ldflags += [f"-fsanitize={san}"]
if os.environ.get("GHNSW_DEBUG") == "1":
    cflags += ["-g", "-O0", "-UNDEBUG"]

ext = Extension(
    "gpuhnsw._core",
    sources=sorted(glob.glob("gpuhnsw/csrc/*.c")),
    depends=sorted(glob.glob("gpuhnsw/csrc/*.h")),
    include_dirs=["gpuhnsw/csrc"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

setup(ext_modules=[ext])
