"""The CUDA kernels build: every module, every instantiation, through NVRTC, no GPU needed.

NVRTC comes from ``cuda-python`` (``cuda.bindings.nvrtc``, or ``cuda.nvrtc`` in older releases)
and the ``nvidia-cuda-nvrtc-cu12`` wheel (the ``nvrtc`` extra). The compile uses exactly
``gpuhnsw._kernels.OPTIONS`` plus an architecture, and the loader's own inlined source and name
expressions, so what passes here is what CuPy compiles at the first GPU query.

Also here: the loader itself (header inlining, #line markers, the instantiation matrix, import
without CuPy), and a compile with a local ``nvcc`` when there is one.
"""
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from gpuhnsw import _kernels

ARCHS = ("compute_75", "compute_90")  # oldest CUDA 13 target; Hopper


# ---------------------------------------------------------------------------------------------
# the loader, without any CUDA

def test_every_module_has_a_source_and_instantiations():
    for name in _kernels.MODULES:
        src = _kernels.kernel_source(name)
        exprs = _kernels.name_expressions(name)
        assert exprs and len(set(exprs)) == len(exprs)
        for expr in exprs:  # every expression names a kernel template of this module
            assert re.search(r"\b%s\b" % re.escape(expr.split("<")[0]), src)
    assert len(_kernels.name_expressions("search")) == 2 * 4 * 5
    assert len(_kernels.name_expressions("distance")) == 2 * 4
    assert len(_kernels.name_expressions("topk")) == 6
    assert len(_kernels.name_expressions("scatter")) == 2
    with pytest.raises(ValueError):
        _kernels.kernel_source("nope")
    with pytest.raises(ValueError):
        _kernels.name_expressions("nope")


@pytest.mark.parametrize("name", sorted(_kernels.MODULES))
def test_headers_inlined_once_with_line_markers(name):
    src = _kernels.kernel_source(name)
    assert not re.search(r'^\s*#\s*include', src, re.M), "no include may be left (system or ours)"
    markers = re.findall(r'^#line 1 "([^"]+)"$', src, re.M)
    assert markers[0] == _kernels.MODULES[name]
    assert len(markers) == len(set(markers)), "each header inlined once"
    assert "common.cuh" in markers
    # every #line marker is true: the line after it is that line of that file
    lines = src.splitlines()
    folder = _kernels.kernel_dir()
    files = {}
    for i, line in enumerate(lines):
        m = re.match(r'^#line (\d+) "([^"]+)"$', line)
        if not m or i + 1 >= len(lines):
            continue
        fname, lineno = m.group(2), int(m.group(1))
        text = files.setdefault(fname, folder.joinpath(fname).read_text(encoding="utf-8").splitlines())
        nxt = lines[i + 1]
        if nxt.startswith("#line") or nxt.startswith("// ") and nxt.endswith("already included above"):
            continue
        assert nxt == text[lineno - 1], (fname, lineno)


def test_import_without_cupy():
    code = textwrap.dedent("""
        import sys
        sys.modules["cupy"] = None          # import cupy -> ImportError
        from gpuhnsw import _kernels
        assert _kernels.kernel_source("search")
        try:
            _kernels.get_kernel("topk", _kernels.topk_expr(32))
        except RuntimeError as e:           # DeviceError
            assert "CuPy" in str(e)
        else:
            raise AssertionError("get_kernel without CuPy must raise")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_launch_arithmetic():
    assert _kernels.team_size(128) == 32 and _kernels.team_size(16) == 4 and _kernels.team_size(3) == 4
    assert _kernels.team_size(64) == 16 and _kernels.team_size(784) == 32
    assert _kernels.team_size(128, "float16") == 16
    assert _kernels.row_stride(3) == 4 and _kernels.row_stride(3, "float16") == 8
    assert _kernels.beam_capacity(10, 5) == 32 and _kernels.beam_capacity(64, 100) == 128
    with pytest.raises(ValueError):
        _kernels.beam_capacity(513, 1)
    assert _kernels.topk_capacity(1000) == 1024
    log2 = _kernels.search_hash_log2(512, 4, 64)
    assert (1 << (log2 - 1)) >= 2 * 512 + 4 * 64
    # 128 dims, M = 16, width 1, capacity 64: query + 2 candidate buffers of 32 pairs + 1024 slots
    assert _kernels.search_shared_bytes(128, 1, 32, 16, 10) == 4 * (128 + 4 * 32 + 1024)
    assert _kernels.topk_shared_bytes(1024, 2) <= 48 * 1024


# ---------------------------------------------------------------------------------------------
# NVRTC through cuda-python

def _preload_libnvrtc():
    """Load libnvrtc from the nvidia-cuda-nvrtc wheel, for cuda-python releases that only look on
    the system library path (recent ones find it through cuda-pathfinder). RTLD_LOCAL: the
    library's symbols must not leak into extension modules loaded later in this process."""
    for base in sys.path:
        for sub in ("nvidia/cuda_nvrtc/lib", "nvidia/cu13/lib"):
            for lib in sorted(glob.glob(os.path.join(base, sub, "libnvrtc.so*"))):
                if "builtins" in lib or ".alt." in lib:
                    continue
                try:
                    ctypes.CDLL(lib, mode=ctypes.RTLD_LOCAL)
                    return
                except OSError:
                    continue


def _import_nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            from cuda import nvrtc
        except ImportError:
            return None
    for attempt in range(2):
        try:
            err, _major, _minor = nvrtc.nvrtcVersion()
            return nvrtc if int(err) == 0 else None
        except Exception:  # the bindings are there but did not find libnvrtc: point them at the wheel's
            if attempt:
                return None
            _preload_libnvrtc()


@pytest.fixture(scope="module")
def nvrtc():
    mod = _import_nvrtc()
    if mod is None:
        pytest.skip("NVRTC not available: pip install 'gpuhnsw[nvrtc]' (cuda-python + nvidia-cuda-nvrtc)")
    return mod


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    assert int(err) == 0, f"{what}: {err}"
    return result[1:] if isinstance(result, tuple) else ()


# Output buffers are bytearrays, never bytes: NVRTC writes into them, and a 1-byte ``b" " * 1`` is
# CPython's shared single-character object; filling it with NUL turned every b" " of the process
# into b"\0" (seen as another module's test failing after this one).
def _log(nvrtc, prog):
    (size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
    buf = bytearray(size)
    _check(nvrtc.nvrtcGetProgramLog(prog, buf), "log")
    return bytes(buf).rstrip(b"\0 ").decode(errors="replace")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(_kernels.MODULES))
def test_nvrtc_compiles_every_instantiation(nvrtc, name, arch):
    src = _kernels.kernel_source(name).encode()
    (prog,) = _check(nvrtc.nvrtcCreateProgram(src, f"{name}.cu".encode(), 0, [], []), "create")
    try:
        exprs = _kernels.name_expressions(name)
        for expr in exprs:
            _check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()), f"add {expr}")
        opts = [o.encode() for o in _kernels.OPTIONS] + [f"--gpu-architecture={arch}".encode()]
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _log(nvrtc, prog)
        assert int(result[0]) == 0, f"NVRTC failed for {name} ({arch}):\n{log}"
        assert "warning" not in log.lower(), f"NVRTC warnings for {name} ({arch}):\n{log}"
        (ptx_size,) = _check(nvrtc.nvrtcGetPTXSize(prog), "ptx size")
        ptx = bytearray(ptx_size)
        _check(nvrtc.nvrtcGetPTX(prog, ptx), "ptx")
        ptx = bytes(ptx).decode(errors="replace")
        for expr in exprs:
            (lowered,) = _check(nvrtc.nvrtcGetLoweredName(prog, expr.encode()), f"lowered {expr}")
            lowered = lowered.decode() if isinstance(lowered, bytes) else str(lowered)
            assert lowered.startswith("_Z"), (expr, lowered)
            assert f".entry {lowered}(" in ptx, f"{expr} ({lowered}) missing from the PTX"
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---------------------------------------------------------------------------------------------
# a local nvcc, when there is one (not in CI)

def _nvcc():
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc")
                                         if os.path.exists(p)), None)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_kernels.MODULES))
def test_nvcc_compiles_every_instantiation(name, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    # taking a kernel's address instantiates it, as a name expression does
    refs = ", ".join(f"(void*)&{e}" for e in _kernels.name_expressions(name))
    src = tmp_path / f"{name}_all.cu"
    src.write_text(_kernels.kernel_source(name) + f"\nstatic void* const kAll[] = {{{refs}}};\n")
    cmd = [nvcc, *_kernels.OPTIONS, "--ptx", "-arch=sm_90", "-o", str(tmp_path / f"{name}.ptx"), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
