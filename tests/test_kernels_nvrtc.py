"""The CUDA kernels build and their launches fit: every instantiation, sm_75/80/90, no GPU needed.

NVRTC comes from ``cuda-python`` and the ``nvidia-cuda-nvrtc-cu12`` wheel (the ``nvrtc`` extra).
Each instantiation is compiled once per test session, as its own program (``kernels.instance_source``)
with the complete option list CuPy hands NVRTC (``kernels.nvrtc_options``: ours, then CuPy's
``-ftz=true``, ``-arch=sm_XX``, ``--device-as-default-execution-space``) plus ``-Xptxas=-v``, so
what passes here is what CuPy compiles at the first GPU query, and ptxas reports each kernel's
registers, spills and static shared memory. From those:

* no instantiation spills or needs more than ``MAX_REGISTERS`` registers (the launch bounds);
* every search launch the code can produce (a grid over dim, M, ef, k, search_width, storage,
  filtered or not) fits each architecture's shared memory with the compiler's static size, or is
  refused (``search_launch`` returns None: the CPU answers) only where no launch could fit.

Also here: the loader itself (header inlining, #line markers, the instantiation matrix, import
without CuPy), the search kernel's argument struct against its NumPy twin (offsets and size, as the
device compiler lays it out), and the option list's consistency (an option of ours that CuPy overrides, like the
``-ftz=false`` it used to silently replace, fails).
"""
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from gpuhnsw._reference import COUNTS
from gpuhnsw.device import kernels, launch

ARCHS = ("sm_75", "sm_80", "sm_90")  # oldest CUDA 13 target; Ampere; Hopper
#: Shared memory per block with the opt-in (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {"sm_75": 64 * 1024, "sm_80": 163 * 1024, "sm_90": 227 * 1024}
REGISTERS_PER_BLOCK = 64 * 1024  # every architecture here


# ---------------------------------------------------------------------------------------------
# the loader, without any CUDA

def test_every_module_has_a_source_and_instantiations():
    for name, (_, kernel, params) in kernels.MODULES.items():
        src = kernels.kernel_source(name)
        assert re.search(r"GPUHNSW_KERNEL\(.*\)\s+%s\(" % kernel, src)
        found = kernels.instances(name)
        assert found and len(set(found)) == len(found) and all(len(i) == len(params) for i in found)
        one = kernels.instance_source(name, found[-1])
        assert one.startswith("#define GPUHNSW_INSTANCE ") and one.endswith(src)
        assert f"#define GPUHNSW_MAX_THREADS {kernels.block_size(name, found[-1])}\n" in one
    assert len(kernels.instances("search")) == 2 * 4 * 5
    assert len(kernels.instances("search_fixed")) == 3 * 3 * 4
    assert len(kernels.instances("distance")) == 3 * 4
    assert len(kernels.instances("topk")) == 6
    assert len(kernels.instances("merge")) == 1
    assert len(kernels.instances("scatter")) == 3
    with pytest.raises(ValueError):
        kernels.kernel_source("nope")
    with pytest.raises(ValueError):
        kernels.instances("nope")
    with pytest.raises(ValueError):
        kernels.instance_source("search", ("float32", 32, 96))
    with pytest.raises(ValueError):   # bfloat16 rows: search_fixed_kernel only
        kernels.instance_source("search", ("bfloat16", 32, 64))


@pytest.mark.parametrize("name", sorted(kernels.MODULES))
def test_headers_inlined_once_with_line_markers(name):
    src = kernels.kernel_source(name)
    assert not re.search(r'^\s*#\s*include', src, re.M), "no include may be left (system or ours)"
    markers = re.findall(r'^#line 1 "([^"]+)"$', src, re.M)
    assert markers[0] == kernels.MODULES[name][0]
    assert len(markers) == len(set(markers)), "each header inlined once"
    assert "common.cuh" in markers
    # every #line marker is true: the line after it is that line of that file
    lines = src.splitlines()
    folder = kernels.kernel_dir()
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
        from gpuhnsw.device import kernels, launch
        assert kernels.kernel_source("search")
        try:
            kernels.get_kernel("topk", (32,))
        except RuntimeError as e:           # DeviceError
            assert "CuPy" in str(e)
        else:
            raise AssertionError("get_kernel without CuPy must raise")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_launch_arithmetic():
    assert launch.team_size(128) == 32 and launch.team_size(16) == 4 and launch.team_size(3) == 4
    assert launch.team_size(64) == 16 and launch.team_size(784) == 32
    assert launch.team_size(128, "float16") == 16
    assert launch.row_stride(3) == 4 and launch.row_stride(3, "float16") == 8
    assert launch.beam_capacity(10) == 32 and launch.beam_capacity(100) == 128
    assert launch.beam_capacity(100, filtered=True) == 512 and launch.beam_capacity(200, filtered=True) == 512
    with pytest.raises(ValueError):
        launch.beam_capacity(513)
    assert launch.topk_capacity(1000) == 1024
    log2 = launch.search_hash_log2(512, 4, 64)
    assert (1 << (log2 - 1)) >= 2 * 512 + 4 * 64
    # 128 dims, M = 16, width 1, capacity 64: query + 2 candidate buffers of 32 pairs + 1024 slots
    assert launch.search_shared_bytes(128, 1, 32, 16, 10) == 4 * (128 + 4 * 32 + 1024)
    assert launch.topk_shared_bytes(1024, 2) <= 48 * 1024
    # the example: dim 1536, M 32, ef 128, width 2, filtered: 40,960 dynamic + 8,480 static
    big = launch.search_launch(1536, "float32", 32, 64, 128, 2, True, lambda inst: 8480, 227 * 1024)
    assert big.instance == ("float32", 32, 512) and big.shared_bytes == 40960
    assert big.shared_bytes + 8480 > launch.DEFAULT_SHARED_LIMIT         # needs the opt-in
    small = launch.search_launch(1536, "float32", 32, 64, 128, 2, True, lambda inst: 8480, 48 * 1024)
    assert small.hash_log2 < big.hash_log2 and small.shared_bytes + 8480 <= 48 * 1024   # a smaller hash
    assert launch.search_launch(4096, "float32", 64, 128, 512, 32, True, lambda inst: 8480, 48 * 1024) is None


def test_fixed_launch_arithmetic():
    # a lane loads at most LOAD_BATCH 16-byte chunks a round: 128 fp16 dims (16 chunks) -> 8 lanes
    assert launch.fixed_team_size(128, "float16") == 8 and launch.fixed_team_size(128, "float32") == 16
    assert launch.fixed_team_size(384, "float16") == 32 and launch.fixed_team_size(8, "bfloat16") == 8
    assert launch.FIXED_COUNTERS == len(COUNTS)
    assert launch.fixed_capacity(10) == 32 and launch.fixed_capacity(256) == 256 and launch.fixed_capacity(257) is None
    log2 = launch.fixed_hash_log2(64, 10, 4, 32)
    assert log2 == 10 and (1 << (log2 - 1)) >= 64 + 10 + 4 * 32
    assert (1 << (launch.fixed_hash_log2(256, 100, 8, 64, 5) - 1)) >= 256 + 100 + 8 * 64
    g = launch.fixed_global_log2(8, 8, 64, 5)
    assert (1 << (g - 1)) >= 8 * 8 * 64 + 64 + 1 and launch.workspace_words(g) == 2 + (1 << g)
    # one block per query once the batch fills twice the multiprocessors, up to 8 for small batches
    assert [launch.fixed_blocks(n, 132) for n in (1, 33, 66, 132, 264, 10_000)] == [8, 8, 4, 2, 1, 1]
    assert launch.fixed_block_beam(64, 10, 1) == 64 and launch.fixed_block_beam(64, 10, 4) == 32
    assert launch.fixed_block_beam(40, 10, 8) == 10
    # 128 fp16 dims, M0 32, width 4, beam 64: query + 5 * 128 words + a 1024-slot hash
    one = launch.fixed_launch(128, "float16", 32, 10, 64, 4, 1, lambda inst: 2288, 48 * 1024)
    assert one == launch.FixedLaunch(("float16", 8, 64), 1, 64, 10, 0, 4 * (128 + 5 * 128 + 1024))
    four = launch.fixed_launch(128, "float16", 32, 10, 64, 4, 4, lambda inst: 1264, 48 * 1024)
    assert four.blocks == 4 and four.beam == 32 and four.instance[2] == 32 and four.hash_log2 == 0
    assert four.shared_bytes == 4 * (128 + 5 * 128) and four.global_log2 == 15
    assert launch.fixed_launch(128, "float16", 32, 10, 300, 1, 1, lambda inst: 0, 1 << 20) is None   # beam
    assert launch.fixed_launch(128, "float16", 65, 10, 64, 1, 1, lambda inst: 0, 1 << 20) is None    # degree
    assert launch.fixed_launch(128, "float16", 32, 10, 64, 9, 1, lambda inst: 0, 1 << 20) is None    # width


def test_search_kernel_switch(monkeypatch):
    monkeypatch.delenv("GHNSW_SEARCH_KERNEL", raising=False)
    assert launch.search_kernel("float16") == "beam" and launch.search_kernel("bfloat16") == "fixed"
    monkeypatch.setenv("GHNSW_SEARCH_KERNEL", "fixed")
    assert launch.search_kernel("float32") == "fixed"
    monkeypatch.setenv("GHNSW_SEARCH_KERNEL", "fast")
    with pytest.raises(ValueError, match="GHNSW_SEARCH_KERNEL"):
        launch.search_kernel("float32")


def test_option_list_says_what_runs():
    """Every ``-name=value`` option of ours survives CuPy's additions unchanged (CuPy appends
    ``-ftz=true``: an ``-ftz=false`` of ours would be silently overridden)."""
    for arch in ARCHS:
        final = kernels.nvrtc_options(arch)
        assert final[:len(kernels.OPTIONS)] == kernels.OPTIONS
        seen = {}
        for opt in final:
            key, eq, value = opt.partition("=")
            if eq:
                assert seen.setdefault(key.lstrip("-"), value) == value, f"{opt} overrides an earlier {key}"
        assert seen["ftz"] == "true" and seen["fmad"] == "true" and seen["arch"] == arch


def _compiles_with(module, checks):
    """Compile the first instantiation of `module` with `checks` (static_asserts) appended, for
    every architecture; assert it compiles."""
    nvrtc = kernels.nvrtc_module()
    if nvrtc is None:
        pytest.skip("NVRTC not available: pip install 'gpuhnsw[nvrtc]' (cuda-python + nvidia-cuda-nvrtc)")
    src = (kernels.instance_source(module, kernels.instances(module)[0]) + "\n".join(checks) + "\n").encode()
    for arch in ARCHS:
        err, prog = nvrtc.nvrtcCreateProgram(src, kernels.MODULES[module][0].encode(), 0, [], [])
        assert int(err) == 0
        try:
            opts = [o.encode() for o in kernels.nvrtc_options(arch)]
            result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = bytearray(size)
            nvrtc.nvrtcGetProgramLog(prog, log)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        err = result[0] if isinstance(result, tuple) else result
        assert int(err) == 0, bytes(log).decode(errors="replace")


def _struct_checks(struct, dtype):
    """static_asserts of a struct's size and every field's size; with no padding on either side (the
    NumPy fields abut, and the struct's size is the sum of its fields'), equal sizes in the same
    order are equal offsets; the order (and each offset) is checked against g++'s offsetof in
    test_kernels_emulated.py (NVRTC has no offsetof)."""
    fields = sorted(dtype.fields.items(), key=lambda item: item[1][1])
    assert [offset for _, (_, offset) in fields] == list(np.cumsum([0] + [f.itemsize for _, (f, _) in fields]))[:-1]
    assert sum(f.itemsize for _, (f, _) in fields) == dtype.itemsize
    checks = [f"static_assert(sizeof({struct}) == {dtype.itemsize}, \"size\");"]
    return checks + [f"static_assert(sizeof({struct}::{name}) == {field.itemsize}, \"{name}\");"
                     for name, (field, _) in fields]


def test_search_args_dtype_is_the_cuda_struct():
    """launch.SEARCH_ARGS, the bytes CuPy hands search_beam_kernel, matches gpuhnsw::SearchArgs as
    NVRTC lays it out: the struct's size and every field's size, static_asserts compiled with the
    kernel's own program."""
    _compiles_with("search", _struct_checks("gpuhnsw::SearchArgs", launch.SEARCH_ARGS))


def test_search_fixed_args_and_constants_are_the_kernels():
    """launch.SEARCH_FIXED_ARGS matches gpuhnsw::SearchFixedArgs as NVRTC lays it out, and the
    launch arithmetic's constants are the kernel's (kLoadBatch, kMaxWidth, kMaxDegree, kFixedBlock)."""
    checks = _struct_checks("gpuhnsw::SearchFixedArgs", launch.SEARCH_FIXED_ARGS)
    checks += [f"static_assert(gpuhnsw::kLoadBatch == {launch.LOAD_BATCH}, \"kLoadBatch\");",
               f"static_assert(gpuhnsw::kMaxWidth == {launch.MAX_FIXED_WIDTH}, \"kMaxWidth\");",
               f"static_assert(gpuhnsw::kMaxDegree == {launch.MAX_FIXED_DEGREE}, \"kMaxDegree\");",
               f"static_assert(gpuhnsw::kFixedBlock == {kernels.FIXED_BLOCK}, \"kFixedBlock\");",
               f"static_assert(gpuhnsw::kCounts == {launch.FIXED_COUNTERS}, \"kCounts\");"]
    _compiles_with("search_fixed", checks)


# ---------------------------------------------------------------------------------------------
# every instantiation through NVRTC + ptxas, once per session

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) "
                    r"registers(?:.*?(\d+) bytes smem)?", re.S)


def _compile(job):
    name, instance, arch = job
    ok, log, _ = kernels.nvrtc_compile(name, instance, arch, ("-Xptxas=-v",))
    return job, ok, log


@pytest.fixture(scope="session")
def compiled():
    """{(module, instance, arch): (ok, log, usage)}, usage = {"stack": stack frame bytes, "spill":
    bytes stored + loaded, "registers": n, "smem": static shared bytes} from ptxas -v. Compiled in worker processes
    (NVRTC holds the GIL)."""
    if kernels.nvrtc_module() is None:
        pytest.skip("NVRTC not available: pip install 'gpuhnsw[nvrtc]' (cuda-python + nvidia-cuda-nvrtc)")
    jobs = [(name, inst, arch) for arch in ARCHS for name in kernels.MODULES for inst in kernels.instances(name)]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_compile, jobs, chunksize=4))
    out = {}
    for job, ok, log in results:
        m = _PTXAS.search(log)
        usage = None if m is None else {"stack": int(m.group(1)), "spill": int(m.group(2)) + int(m.group(3)),
                                        "registers": int(m.group(4)), "smem": int(m.group(5) or 0)}
        out[job] = (ok, log, usage)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_instantiation_compiles_without_warnings(compiled, arch):
    for (name, inst, a), (ok, log, usage) in compiled.items():
        if a != arch:
            continue
        assert ok, f"NVRTC failed for {name} {inst} ({arch}):\n{log}"
        assert "warning" not in log.lower(), f"NVRTC warnings for {name} {inst} ({arch}):\n{log}"
        assert usage is not None, f"no ptxas report for {name} {inst} ({arch}):\n{log}"
        assert f"entry function '{kernels.MODULES[name][1]}'" in log     # C linkage: the plain name


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_launchable_registers(compiled, arch):
    for (name, inst, a), (_, log, usage) in compiled.items():
        if a != arch:
            continue
        assert usage["spill"] == 0, f"{name} {inst} spills on {arch}:\n{log}"
        assert usage["registers"] <= kernels.max_registers(name), (name, inst, arch, usage)
        assert usage["registers"] * kernels.block_size(name, inst) <= REGISTERS_PER_BLOCK, (name, inst, arch)
        if name == "search_fixed":   # its register lists stay in registers (warp_sort.cuh): no local memory
            assert usage["stack"] == 0, f"{name} {inst} uses a stack frame on {arch}:\n{log}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_fits(compiled, arch):
    """Each launch the code can produce fits the architecture with the compiler's static shared
    memory; the search refuses (CPU fallback) only configurations no hash size could fit."""
    limit = SHARED_LIMIT[arch]

    def static(name, inst):
        return compiled[(name, tuple(inst), arch)][2]["smem"]

    refused = []
    for storage in kernels.BEAM_STORAGES:
        for dim in (1, 4, 16, 100, 128, 384, 768, 784, 960, 1024, 1536, 2048, 4096, 8192):
            for m in (2, 4, 8, 16, 32, 48, 64, 100):
                for ef in (1, 10, 40, 64, 100, 128, 200, 256, 400, 512):
                    for k in (1, 10, 100, 512):
                        for width in (1, 2, 4, 8, 16, 32):
                            for filtered in (False, True):
                                if max(ef, k) > kernels.SEARCH_CAPACITIES[-1]:
                                    continue
                                chosen = launch.search_launch(dim, storage, m, 2 * m, max(ef, k), width, filtered,
                                                              lambda inst: static("search", inst), limit)
                                if chosen is None:
                                    refused.append((dim, m, width))
                                    continue
                                total = static("search", chosen.instance) + chosen.shared_bytes
                                assert total <= limit, (storage, dim, m, ef, k, width, filtered, total)
    # refusals only for wide rows with many links per iteration, never for the common range
    assert not [r for r in refused if r[0] <= 1024 and r[1] <= 32 and r[2] <= 4], refused[:5]
    if arch != "sm_75":
        assert not [r for r in refused if r[0] <= 4096 and r[1] <= 64 and r[2] <= 8], refused[:5]
    fixed_refused = []
    for storage in kernels.STORAGE_TYPES:
        for dim in (1, 16, 100, 128, 384, 784, 1024, 1536, 4096):
            for degree in (8, 16, 32, 48, 64):
                for beam in (10, 32, 64, 100, 256):
                    for width in (1, 2, 4, 8):
                        for blocks in (1, 2, 8):
                            chosen = launch.fixed_launch(dim, storage, degree, 10, beam, width, blocks,
                                                         lambda inst: static("search_fixed", inst), limit)
                            if chosen is None:
                                fixed_refused.append((storage, dim, degree, beam, width, blocks))
                                continue
                            total = static("search_fixed", chosen.instance) + chosen.shared_bytes
                            assert total <= limit, (storage, dim, degree, beam, width, blocks, total)
    # beams up to 256, degrees up to 64, widths up to 8: the fixed kernel takes every one of these
    assert not fixed_refused, fixed_refused[:5]
    for (cap,) in kernels.instances("topk"):
        shared = static("topk", (cap,)) + launch.topk_shared_bytes(cap, kernels.topk_warps(cap))
        assert shared <= launch.DEFAULT_SHARED_LIMIT
    for storage, team in kernels.instances("distance"):   # the query row, dims up to 8192
        shared = static("distance", (storage, team)) + launch.distance_shared_bytes(8192)
        assert shared <= launch.DEFAULT_SHARED_LIMIT
