"""The CUDA kernels, run on the CPU: every kernel against its oracle, no GPU needed.

The loader's inlined source of each module is compiled with g++ against tests/cuda_emulation.h
(one host thread per CUDA thread, real barriers for __syncthreads / __syncwarp / shuffles / ballots,
real atomics) and run on small real graphs:

* ``search_beam_kernel`` against the NumPy reference (gpuhnsw._reference), which is itself held to
  the C search in tests/test_reference.py: beam mode with search_width 1, 2, 4 and with visited-hash
  resets, filtered mode (filter, deletions, a 3-slot filter), fp16 storage, l2 / ip / cosine, an
  empty index, a grid smaller than the batch;
* ``compute_distances_kernel`` against NumPy, ``select_topk_kernel`` against a lexsort (ties and NaN,
  a second tile merged with the first's result), ``scatter_rows_kernel`` against the staged rows.

Skipped without a C++20 compiler with _Float16 (g++ >= 12). The GPU suite (``-m gpu``) still has to
run the same kernels on a device: emulation proves the algorithm and the indexing, not timing,
memory-model corner cases or the real warp scheduler.
"""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gpuhnsw
from gpuhnsw.device import kernels, launch
from gpuhnsw._reference import ReferenceGraph, beam_search_reference, normalize_queries
from gpuhnsw._reference import COUNTS
from gpuhnsw._reference_fixed import STATUS_BAD_QUERY, fixed_search_reference
from gpuhnsw.device.arrays import bf16_bits, bf16_values

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emulation.h"
INVALID = 0xFFFFFFFF
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")

# Text the host compiler cannot take, and what stands in for it.
REPLACE = [
    ('extern __shared__ __align__(16) unsigned char smem[];', 'unsigned char* smem = g_dynamic_smem;'),
    ('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));', 'f = emu_half_to_float(h);'),
    ('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));', 'h = emu_float_to_half(f);'),
]

IO = r'''
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
template <class T> std::vector<T> rd(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) { std::perror(path.c_str()); std::exit(2); }
  std::fseek(f, 0, SEEK_END); long n = std::ftell(f); std::fseek(f, 0, SEEK_SET);
  std::vector<T> v(n / sizeof(T) + 1);
  if (n && std::fread(v.data(), 1, n, f) != (size_t)n) std::exit(3);
  std::fclose(f);
  return v;
}
template <class T> void wr(const std::string& path, const std::vector<T>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}
'''

MAINS = {
    "search": r'''
int main(int, char** argv) {
  std::string d = argv[1];
  auto P = rd<long long>(d + "/params.bin");
  int block = P[0], use_deleted = P[1], use_filter = P[2], grid = P[3];
  auto raw = rd<unsigned char>(d + "/args.bin");  // gpuhnsw.device.launch.SEARCH_ARGS, pointers 0
  if (raw.size() != sizeof(gpuhnsw::SearchArgs) + 1) { std::fprintf(stderr, "SearchArgs size\n"); return 4; }
  gpuhnsw::SearchArgs a;
  std::memcpy(&a, raw.data(), sizeof a);
  auto vec = rd<STORAGE>(d + "/vectors.bin");
  auto links0 = rd<unsigned>(d + "/links0.bin");
  auto degree0 = rd<unsigned>(d + "/degree0.bin");
  auto ustart = rd<unsigned>(d + "/upper_start.bin");
  auto ulinks = rd<unsigned>(d + "/upper_links.bin");
  auto levels = rd<unsigned char>(d + "/levels.bin");
  auto labels = rd<unsigned long long>(d + "/labels.bin");
  auto deleted = rd<unsigned>(d + "/deleted.bin");
  auto filter = rd<unsigned>(d + "/filter.bin");
  auto queries = rd<float>(d + "/queries.bin");
  int nq = a.nq, k = a.k;
  std::vector<unsigned> o_slots(std::max(1, nq * k));
  std::vector<float> o_dists(std::max(1, nq * k));
  std::vector<unsigned long long> o_labels(std::max(1, nq * k));
  std::vector<int> o_found(nq), o_status(nq);
  a.vectors = vec.data(); a.links0 = links0.data(); a.degree0 = degree0.data(); a.upper_start = ustart.data();
  a.upper_links = ulinks.data(); a.levels = levels.data(); a.labels = labels.data(); a.deleted_bits = use_deleted ? deleted.data() : nullptr;
  a.queries = queries.data(); a.filter_bits = use_filter ? filter.data() : nullptr;
  a.out_slots = o_slots.data(); a.out_dists = o_dists.data(); a.out_labels = o_labels.data();
  a.out_found = o_found.data(); a.out_status = o_status.data();
  emu_launch(grid, block, [&] { search_beam_kernel<STORAGE, TEAM, CAP>(a); });
  wr(d + "/out_slots.bin", o_slots); wr(d + "/out_dists.bin", o_dists); wr(d + "/out_labels.bin", o_labels);
  wr(d + "/out_found.bin", o_found); wr(d + "/out_status.bin", o_status);
}
''',
    "search_fixed": r'''
int main(int, char** argv) {
  std::string d = argv[1];
  auto P = rd<long long>(d + "/params.bin");
  int use_deleted = P[0], use_filter = P[1], grid = P[2], use_counts = P[3], ws_words = P[4];
  auto raw = rd<unsigned char>(d + "/args.bin");  // gpuhnsw.device.launch.SEARCH_FIXED_ARGS, pointers 0
  if (raw.size() != sizeof(gpuhnsw::SearchFixedArgs) + 1) { std::fprintf(stderr, "SearchFixedArgs size\n"); return 4; }
  gpuhnsw::SearchFixedArgs a;
  std::memcpy(&a, raw.data(), sizeof a);
  auto vec = rd<STORAGE>(d + "/vectors.bin");
  auto graph = rd<unsigned>(d + "/graph.bin");
  auto ustart = rd<unsigned>(d + "/upper_start.bin");
  auto ulinks = rd<unsigned>(d + "/upper_links.bin");
  auto levels = rd<unsigned char>(d + "/levels.bin");
  auto labels = rd<unsigned long long>(d + "/labels.bin");
  auto deleted = rd<unsigned>(d + "/deleted.bin");
  auto filter = rd<unsigned>(d + "/filter.bin");
  auto queries = rd<float>(d + "/queries.bin");
  int nq = a.nq, width = a.blocks * a.k;
  std::vector<unsigned> o_slots(std::max(1, nq * width), 0xDEADBEEFu);
  std::vector<float> o_dists(std::max(1, nq * width), -1.f);
  std::vector<unsigned long long> o_labels(std::max(1, nq * a.k), 0xDEADBEEFull);
  std::vector<int> o_found(nq, -7), o_status(nq, -7), o_counts(5 * std::max(1, nq), 0);
  std::vector<unsigned> ws(std::max(1, nq * ws_words), 0u);
  a.vectors = vec.data(); a.graph = graph.data(); a.upper_start = ustart.data(); a.upper_links = ulinks.data();
  a.levels = levels.data(); a.labels = labels.data(); a.deleted_bits = use_deleted ? deleted.data() : nullptr;
  a.queries = queries.data(); a.filter_bits = use_filter ? filter.data() : nullptr;
  a.workspace = a.blocks > 1 ? ws.data() : nullptr;
  a.out_slots = o_slots.data(); a.out_dists = o_dists.data(); a.out_labels = o_labels.data();
  a.out_found = o_found.data(); a.out_status = o_status.data(); a.out_counts = use_counts ? o_counts.data() : nullptr;
  emu_launch(grid, 64, [&] { search_fixed_kernel<STORAGE, TEAM, CAP>(a); });
  wr(d + "/out_slots.bin", o_slots); wr(d + "/out_dists.bin", o_dists); wr(d + "/out_labels.bin", o_labels);
  wr(d + "/out_found.bin", o_found); wr(d + "/out_status.bin", o_status); wr(d + "/out_counts.bin", o_counts);
  wr(d + "/workspace.bin", ws);
}
''',
    "merge": r'''
int main(int, char** argv) {
  std::string d = argv[1];
  auto P = rd<long long>(d + "/params.bin");
  int tile_ld = P[0], nq = P[1], k = P[2], grid = P[3], block = P[4];
  long long ws_ld = P[5];
  auto columns = rd<long long>(d + "/columns.bin");
  auto tile_slots = rd<unsigned>(d + "/tile_slots.bin");
  auto labels = rd<unsigned long long>(d + "/labels.bin");
  auto ws = rd<unsigned>(d + "/workspace.bin");
  auto dists = rd<float>(d + "/dists.bin");
  auto found = rd<int>(d + "/found.bin");
  std::vector<unsigned> slots((size_t)nq * k);
  std::vector<unsigned long long> lab((size_t)nq * k);
  std::vector<int> status(nq);
  emu_launch(grid, block, [&] {
    gather_merged_kernel(columns.data(), tile_slots.data(), tile_ld, labels.data(), ws.data(), ws_ld, nq, k,
                         dists.data(), slots.data(), lab.data(), found.data(), status.data());
  });
  dists.resize((size_t)nq * k); found.resize(nq);
  wr(d + "/out_slots.bin", slots); wr(d + "/out_labels.bin", lab); wr(d + "/out_dists.bin", dists);
  wr(d + "/out_found.bin", found); wr(d + "/out_status.bin", status);
}
''',
    "distance": r'''
int main(int, char** argv) {
  std::string d = argv[1];
  auto P = rd<long long>(d + "/params.bin");
  int stride = P[0], metric = P[1], n_slots = P[2], nq = P[3], dim = P[4], c = P[5], block = P[6], grid = P[7];
  auto vec = rd<STORAGE>(d + "/vectors.bin");
  auto queries = rd<float>(d + "/queries.bin");
  auto slots = rd<unsigned>(d + "/slots.bin");
  std::vector<float> out((size_t)nq * c);
  emu_launch(grid, block, [&] {
    compute_distances_kernel<STORAGE, TEAM>(vec.data(), stride, metric, n_slots, queries.data(), nq, dim,
                                            slots.data(), c, c, out.data(), c);
  });
  wr(d + "/out.bin", out);
}
''',
    "topk": r'''
int main(int, char** argv) {
  std::string d = argv[1];
  auto P = rd<long long>(d + "/params.bin");
  long long row_stride = P[0], offset = P[3], col_stride = P[10];
  int n = P[1], nq = P[2], k = P[4], block = P[5], grid = P[6], has_prev = P[7], has_bias = P[8], has_excl = P[9];
  auto F = rd<float>(d + "/fparams.bin");  // key_scale, exclude_key
  auto dists = rd<float>(d + "/dists.bin");
  auto bias = rd<float>(d + "/bias.bin");
  auto excl = rd<long long>(d + "/exclude.bin");
  auto pd = rd<float>(d + "/prev_d.bin");
  auto pi = rd<long long>(d + "/prev_i.bin");
  std::vector<float> od((size_t)nq * k);
  std::vector<long long> oi((size_t)nq * k);
  emu_launch(grid, block, [&] {
    select_topk_kernel<CAP>(dists.data(), row_stride, col_stride, n, offset, F[0], has_bias ? bias.data() : nullptr,
                            has_excl ? excl.data() : nullptr, F[1], has_prev ? pd.data() : nullptr,
                            has_prev ? pi.data() : nullptr, nq, k, od.data(), oi.data());
  });
  wr(d + "/out_d.bin", od); wr(d + "/out_i.bin", oi);
}
''',
    "scatter": r'''
int main(int, char** argv) {
  std::string d = argv[1];
  auto P = rd<long long>(d + "/params.bin");
  int r = P[0], m0 = P[1], dim_pad = P[2], stride = P[3], cap = P[4], block = P[5], grid = P[6];
  auto slots = rd<unsigned>(d + "/slots.bin");
  auto degree = rd<unsigned>(d + "/degree.bin");
  auto labels = rd<unsigned long long>(d + "/labels.bin");
  auto links = rd<unsigned>(d + "/links.bin");
  auto rows = rd<float>(d + "/rows.bin");
  int q = P[7];
  auto lslots = rd<unsigned>(d + "/lslots.bin");
  auto ldegree = rd<unsigned>(d + "/ldegree.bin");
  auto lstart = rd<unsigned>(d + "/lstart.bin");
  auto lfirst = rd<unsigned>(d + "/lfirst.bin");
  auto lpacked = rd<unsigned>(d + "/lpacked.bin");
  auto l0 = rd<unsigned>(d + "/links0_before.bin");   // [cap, m0] (+1: rd never returns an empty vector)
  l0.resize((size_t)cap * m0);
  std::vector<STORAGE> vec((size_t)cap * stride);
  std::vector<unsigned> d0(cap, 0);
  std::vector<unsigned long long> lab(cap, 0);
  emu_launch(grid, block, [&] {
    scatter_rows_kernel<STORAGE>(r, slots.data(), degree.data(), labels.data(), links.data(), rows.data(), m0,
                                 dim_pad, vec.data(), stride, l0.data(), d0.data(), lab.data(), q, lslots.data(),
                                 ldegree.data(), lstart.data(), lfirst.data(), lpacked.data());
  });
  wr(d + "/vectors.bin", vec); wr(d + "/links0.bin", l0); wr(d + "/degree0.bin", d0); wr(d + "/labels.bin", lab);
}
''',
}

STORAGE_CXX = kernels.STORAGE_TYPES


# ---------------------------------------------------------------------------------------------
# building and running

@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """``build(module, **defines) -> executable``, ``run(exe, **arrays) -> {name: bytes}``."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    root = tmp_path_factory.mktemp("cuda_emulation")
    probe = root / "probe.cpp"
    probe.write_text(f'#include "{HEADER}"\nint main() {{ return emu_float_to_half(1.0f) == 0x3C00 ? 0 : 1; }}\n')
    res = subprocess.run([CXX, "-std=c++20", "-pthread", str(probe), "-o", str(root / "probe")],
                         capture_output=True, text=True)
    if res.returncode or subprocess.run([str(root / "probe")]).returncode:
        pytest.skip(f"{CXX} cannot build the CUDA emulation (needs C++20 and _Float16): {res.stderr[-500:]}")
    built = {}

    def build(module, main=None, **defines):
        src = kernels.kernel_source(module)
        for old, new in REPLACE:
            src = src.replace(old, new)
        assert "asm(" not in src and "extern __shared__" not in src, "REPLACE no longer matches the kernels"
        src = f'#include "{HEADER}"\n' + src + IO + (main or MAINS[module])
        flags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
        key = hashlib.sha1((src + " ".join(flags)).encode()).hexdigest()[:12]
        if key not in built:
            cpp, exe = root / f"{module}_{key}.cpp", root / f"{module}_{key}"
            cpp.write_text(src)
            res = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unused-variable",
                                  "-Wno-unused-function", *flags, str(cpp), "-o", str(exe)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-5000:]
            built[key] = exe
        return built[key]

    counter = iter(range(1 << 30))

    def run(exe, outputs, **arrays):
        d = root / f"run{next(counter)}"
        d.mkdir()
        for name, a in arrays.items():
            (d / f"{name}.bin").write_bytes(np.ascontiguousarray(a).tobytes())
        res = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        out = {name: np.fromfile(d / f"{name}.bin", dtype) for name, dtype in outputs.items()}
        shutil.rmtree(d)
        return out

    return build, run


def bitset(mask):
    b = np.packbits(np.asarray(mask, np.uint8), bitorder="little")
    return np.concatenate([b, np.zeros((-len(b)) % 4, np.uint8)]).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# search

def run_search(emulator, state, queries, k, ef, *, storage="float32", width=1, allowed=None, block=64, grid=3,
               hash_log2=None, upper_tail=None):
    """The kernel on `state` (device layout built as gpuhnsw.device.mirror does), its scalar arguments
    passed as the bytes of launch.SEARCH_ARGS; `upper_tail` (uint32) is what follows the last upper
    block on the device.  Returns (outputs, capacity)."""
    build, run = emulator
    g = ReferenceGraph(state)
    stride = launch.row_stride(g.dim, storage)
    vec = np.zeros((g.n, stride), np.float32)
    vec[:, :g.dim] = g.vectors
    vec = vec.astype(np.float16) if storage == "float16" else vec
    upper_start = np.full(g.n, INVALID, np.uint32)
    upper_start[g.levels > 0] = g.upper_start[g.levels > 0]
    filtered = allowed is not None or bool(g.deleted.any())
    beam = max(ef, k)
    cap = launch.beam_capacity(beam, filtered)
    team = launch.team_size(g.dim, storage)
    log2 = hash_log2 or launch.search_hash_log2(cap, width, g.M0, 13 if filtered else 8)
    exe = build("search", STORAGE=STORAGE_CXX[storage], TEAM=team, CAP=cap)
    nq = len(queries)
    args = np.zeros(1, launch.SEARCH_ARGS)
    for name, value in dict(stride=stride, metric=kernels.METRICS[g.space], m0=g.M0, m=g.M, n_slots=g.n,
                            entry_point=g.entry_point, max_level=g.max_level, nq=nq, dim=g.dim, k=k, beam=beam,
                            search_width=width, hash_log2=log2, max_iters=0).items():
        args[name] = value
    out = run(exe, {"out_slots": np.uint32, "out_dists": np.float32, "out_labels": np.uint64,
                    "out_found": np.int32, "out_status": np.int32},
              params=np.array([block, int(g.deleted.any()), int(allowed is not None), grid], np.int64),
              args=args, vectors=vec, links0=g.links0, degree0=g.degree0, upper_start=upper_start,
              upper_links=np.concatenate([g.upper, np.zeros(1, np.uint32) if upper_tail is None else upper_tail]),
              levels=g.levels,
              labels=g.labels, deleted=bitset(g.deleted),
              filter=bitset(allowed) if allowed is not None else np.zeros(1, np.uint32),
              queries=np.asarray(queries, np.float32))
    for name in ("out_slots", "out_dists", "out_labels"):
        out[name] = out[name][:nq * k].reshape(nq, k)
    return out, cap


@pytest.mark.parametrize("module, struct, dtype", [("search", "SearchArgs", launch.SEARCH_ARGS),
                                                  ("search_fixed", "SearchFixedArgs", launch.SEARCH_FIXED_ARGS)])
def test_search_args_dtype_matches_the_struct(emulator, module, struct, dtype):
    """launch.SEARCH_ARGS (SEARCH_FIXED_ARGS) has gpuhnsw::SearchArgs' (SearchFixedArgs') size and
    each field's offset and size, as g++ lays out the struct (x86-64; CUDA lays out a struct as its
    host compiler does, and test_kernels_nvrtc.py checks the sizes as NVRTC sees them)."""
    build, _ = emulator
    struct = f"gpuhnsw::{struct}"
    lines = [f'  std::printf("%zu\\n", sizeof({struct}));']
    lines += [f'  std::printf("%zu %zu\\n", offsetof({struct}, {name}), sizeof({struct}::{name}));'
              for name in dtype.names]
    exe = build(module, main="int main() {\n" + "\n".join(lines) + "\n}\n", STORAGE="float", TEAM=8, CAP=32)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    assert int(out[0]) == dtype.itemsize
    for name, line in zip(dtype.names, out[1:]):
        field, offset = dtype.fields[name]
        assert tuple(map(int, line.split())) == (offset, field.itemsize), name


def assert_matches(out, ref, labels, min_same=0.99):
    slots, dists, found = ref
    got = np.where(out["out_slots"] == INVALID, -1, out["out_slots"].astype(np.int64))
    same = np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(got, slots)])
    assert same >= min_same, f"same result sets for {same:.3f} of the queries"
    np.testing.assert_array_equal(out["out_found"], found)
    ok = np.isfinite(dists)
    np.testing.assert_array_equal(np.isfinite(out["out_dists"]), ok)
    np.testing.assert_allclose(out["out_dists"][ok], dists[ok], rtol=2e-4, atol=1e-5)
    want_labels = np.where(got >= 0, labels[np.maximum(got, 0)], np.uint64(2**64 - 1))
    np.testing.assert_array_equal(out["out_labels"], want_labels)


def build_index(space, base, M, seed=5):
    index = gpuhnsw.Index(space, base.shape[1])
    index.init_index(len(base), M=M, ef_construction=40, random_seed=seed)
    index.add_items(base, num_threads=2)
    return index


@pytest.fixture(scope="module")
def sift(datasets):
    base, queries, _, _ = datasets("siftsmall", n_base=2000, n_queries=12)
    return build_index("l2", base, 8), base, queries


@pytest.fixture(scope="module")
def minilm(datasets):
    base, queries, _, _ = datasets("minilm-debian", n_base=1500, n_queries=10)
    return base, queries


@pytest.mark.parametrize("width", [1, 2, 4])
def test_search_beam_mode(emulator, sift, width):
    index, _, queries = sift
    state = index._core.export_state()
    out, _ = run_search(emulator, state, queries, 10, 20, width=width)
    assert np.all(out["out_status"] == 0)
    assert_matches(out, beam_search_reference(state, queries, 10, 20, search_width=width),
                   np.frombuffer(state["labels"], np.uint64))


def test_search_visited_hash_resets(emulator, sift):
    """A 256-slot hash must be cleared and reseeded from the beam many times: same answer."""
    index, _, queries = sift
    state = index._core.export_state()
    out, _ = run_search(emulator, state, queries, 10, 20, hash_log2=8, block=128)
    assert_matches(out, beam_search_reference(state, queries, 10, 20), np.frombuffer(state["labels"], np.uint64))


@pytest.mark.parametrize("width", [1, 3])
def test_search_filtered_mode(emulator, sift, width):
    index, base, queries = sift
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    allowed = labels % 5 == 0
    out, cap = run_search(emulator, state, queries, 10, 20, width=width, allowed=allowed)
    ref = beam_search_reference(state, queries, 10, 20, search_width=width, allowed=allowed, pending_limit=cap)
    assert_matches(out, ref, labels)
    assert np.all(allowed[out["out_slots"][out["out_slots"] != INVALID]])


def test_search_selective_filter(emulator, sift):
    """3 allowed slots: the search walks the whole graph. Pending is capped at Capacity (C's heap is
    not): a query finds all 3 unless its status says candidates fell off the list."""
    index, _, queries = sift
    queries = queries[:4]
    state = index._core.export_state()
    allowed = np.zeros(ReferenceGraph(state).n, bool)
    allowed[[10, 500, 1999]] = True
    out, cap = run_search(emulator, state, queries, 5, 10, allowed=allowed, hash_log2=14)
    assert np.all(out["out_status"] & 1 == 0)      # the hash held the whole graph
    assert np.all((out["out_found"] == 3) | (out["out_status"] & 2 != 0))
    ref = beam_search_reference(state, queries, 5, 10, allowed=allowed, pending_limit=cap)
    assert_matches(out, ref, np.frombuffer(state["labels"], np.uint64))


@pytest.mark.parametrize("space", ["cosine", "ip"])
def test_search_metrics_and_fp16(emulator, minilm, space):
    base, queries = minilm
    state = build_index(space, base, 6)._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    out, _ = run_search(emulator, state, queries, 10, 30, block=128)
    assert_matches(out, beam_search_reference(state, queries, 10, 30), labels)
    # fp16 storage: the reference on the same fp16-rounded vectors
    rounded = dict(state, vectors=np.frombuffer(state["vectors"], np.float32).astype(np.float16)
                   .astype(np.float32).tobytes())
    out, _ = run_search(emulator, state, queries, 10, 30, storage="float16", block=96)
    assert_matches(out, beam_search_reference(rounded, queries, 10, 30), labels, min_same=0.9)


def test_search_with_deletions(emulator, minilm):
    base, queries = minilm
    index = build_index("cosine", base, 6)
    for label in range(0, len(base), 4):
        index.mark_deleted(label)
    state = index._core.export_state()
    out, cap = run_search(emulator, state, queries, 10, 30, width=2)
    ref = beam_search_reference(state, queries, 10, 30, search_width=2, pending_limit=cap)
    assert_matches(out, ref, np.frombuffer(state["labels"], np.uint64))
    assert np.all(out["out_labels"][out["out_found"] > 0] % 4 != 0)


def test_search_descent_reads_no_block_a_slot_does_not_have(emulator, sift):
    """An upper-level link to a slot below that level (the C core's reader returns no list for it)
    is a dead end: the descent must not read the words after the slot's own blocks as its list.
    Those words name a slot that only the misread could reach (it has no in-links), at the query."""
    index, _, _ = sift
    state = index._core.export_state()
    g = ReferenceGraph(state)
    top, ep = g.max_level, g.entry_point
    n = int(np.flatnonzero(g.levels > 0)[-1])              # its blocks are the last ones
    assert 1 <= g.levels[n] < top
    p = int(np.flatnonzero((g.levels == 0) & (np.arange(g.n) != n) & (np.arange(g.n) != ep))[0])
    links0, degree0 = g.links0.copy(), g.degree0.copy()
    upper = g.upper.copy()
    for s in range(g.n):                                    # p loses every in-link
        row = [x for x in links0[s, :degree0[s]] if x != p]
        links0[s] = INVALID
        links0[s, :len(row)], degree0[s] = row, len(row)
        for level in range(1, int(g.levels[s]) + 1):
            at = int(g.upper_start[s]) + (level - 1) * (1 + g.M)
            ids = [x for x in upper[at + 1:at + 1 + upper[at]] if x != p]
            upper[at:at + 1 + g.M] = [len(ids)] + ids + [INVALID] * (g.M - len(ids))
    at = int(g.upper_start[ep]) + (top - 1) * (1 + g.M)     # the entry's top list: n alone
    upper[at:at + 1 + g.M] = [1, n] + [INVALID] * (g.M - 1)
    vectors = g.vectors.copy()
    vectors[p] = vectors[n] + 1.0                           # the query's nearest, closer to n than ep is
    query = vectors[p][None]
    # where a misread of n's top-level block lands: a list naming p
    tail = np.zeros(int(g.upper_start[n]) + (top - 1) * (1 + g.M) - upper.size + 1 + g.M, np.uint32)
    tail[-1 - g.M:] = [1, p] + [INVALID] * (g.M - 1)
    crafted = dict(state, links0=links0.tobytes(), degree0=degree0.tobytes(), upper=upper.tobytes(),
                   vectors=vectors.tobytes())
    out, _ = run_search(emulator, crafted, query, 1, 1, upper_tail=tail)
    ref = beam_search_reference(crafted, query, 1, 1)
    assert ref[0][0, 0] != p
    assert_matches(out, ref, np.frombuffer(state["labels"], np.uint64))


def test_search_empty_index(emulator):
    index = gpuhnsw.Index("l2", 8)
    index.init_index(10)
    out, _ = run_search(emulator, index._core.export_state(), np.zeros((3, 8), np.float32), 4, 4)
    assert np.all(out["out_found"] == 0) and np.all(out["out_slots"] == INVALID)
    assert np.all(np.isinf(out["out_dists"])) and np.all(out["out_labels"] == np.uint64(2**64 - 1))


# ---------------------------------------------------------------------------------------------
# search_fixed_kernel (and, for several blocks per query, select_topk_kernel + gather_merged_kernel)

def stored_rows(vectors, storage):
    """float32 rows [n, dim] as the mirror stores them ([n, stride] of the storage dtype) and the
    float32 values those hold (what the reference must search)."""
    n, dim = vectors.shape
    stride = launch.row_stride(dim, storage)
    rows = np.zeros((n, stride), np.float32)
    rows[:, :dim] = vectors
    if storage == "float16":
        rows = rows.astype(np.float16)
        return rows, rows[:, :dim].astype(np.float32)
    if storage == "bfloat16":
        rows = bf16_bits(rows)
        return rows, bf16_values(rows[:, :dim])
    return rows, vectors


def run_fixed(emulator, state, queries, k, ef, *, storage="float16", width=1, allowed=None, blocks=1, graph=None,
              hash_log2=None, global_log2=None, grid=None, counts=True):
    """search_fixed_kernel on `state` (the mirror's layout), its arguments as the bytes of
    launch.SEARCH_FIXED_ARGS, then with blocks > 1 the tile through select_topk_kernel and
    gather_merged_kernel.  Returns (outputs, reference): the reference on the same stored values,
    with the kernel's hash / table sizes."""
    build, run = emulator
    g = ReferenceGraph(state)
    graph = np.ascontiguousarray(g.links0 if graph is None else graph, np.uint32)
    rows, values = stored_rows(g.vectors, storage)
    beam = launch.fixed_block_beam(max(ef, k), k, blocks)
    cap = launch.fixed_capacity(beam)
    degree = graph.shape[1]
    if blocks == 1:
        hash_log2 = hash_log2 or launch.fixed_hash_log2(beam, k, width, degree, min_log2=5)
        global_log2 = 0
    else:
        hash_log2, global_log2 = 0, global_log2 or launch.fixed_global_log2(blocks, width, degree, min_log2=12)
    upper_start = np.full(g.n, INVALID, np.uint32)
    upper_start[g.levels > 0] = g.upper_start[g.levels > 0]
    nq = len(queries)
    args = np.zeros(1, launch.SEARCH_FIXED_ARGS)
    for name, value in dict(filter_stride=0, stride=rows.shape[1], metric=kernels.METRICS[g.space], degree=degree,
                            m=g.M, n_slots=g.n, entry_point=g.entry_point, max_level=g.max_level, nq=nq, dim=g.dim,
                            k=k, beam=beam, search_width=width, hash_log2=hash_log2, blocks=blocks,
                            global_log2=global_log2).items():
        args[name] = value
    exe = build("search_fixed", STORAGE=STORAGE_CXX[storage], TEAM=launch.fixed_team_size(g.dim, storage), CAP=cap)
    ws_words = launch.workspace_words(global_log2) if blocks > 1 else 1
    grid = grid or nq * blocks
    out = run(exe, {"out_slots": np.uint32, "out_dists": np.float32, "out_labels": np.uint64, "out_found": np.int32,
                    "out_status": np.int32, "out_counts": np.int32, "workspace": np.uint32},
              params=np.array([int(g.deleted.any()), int(allowed is not None), grid, int(counts), ws_words], np.int64),
              args=args, vectors=rows, graph=graph, upper_start=upper_start,
              upper_links=np.concatenate([g.upper, np.zeros(1, np.uint32)]), levels=g.levels, labels=g.labels,
              deleted=bitset(g.deleted), filter=bitset(allowed) if allowed is not None else np.zeros(1, np.uint32),
              queries=np.asarray(queries, np.float32))
    out["out_counts"] = out["out_counts"][:len(COUNTS) * nq].reshape(nq, len(COUNTS))
    if blocks == 1:
        for name in ("out_slots", "out_dists", "out_labels"):
            out[name] = out[name][:nq * k].reshape(nq, k)
    else:
        tile_d = out["out_dists"][:nq * blocks * k].reshape(nq, blocks * k)
        tile_s = out["out_slots"][:nq * blocks * k].reshape(nq, blocks * k)
        n = blocks * k
        topk = run(build("topk", CAP=launch.topk_capacity(k)), {"out_d": np.float32, "out_i": np.int64},
                   params=np.array([n, n, nq, 0, k, 64, 2, 0, 0, 0, 1], np.int64), dists=tile_d,
                   fparams=np.array([1.0, 0.0], np.float32), bias=np.zeros(1, np.float32),
                   exclude=np.zeros(1, np.int64), prev_d=np.zeros(1, np.float32), prev_i=np.zeros(1, np.int64))
        merged = run(build("merge"), {"out_slots": np.uint32, "out_labels": np.uint64, "out_dists": np.float32,
                                      "out_found": np.int32, "out_status": np.int32},
                     params=np.array([n, nq, k, 2, 64, ws_words], np.int64), columns=topk["out_i"][:nq * k],
                     tile_slots=tile_s, labels=g.labels, workspace=out["workspace"][:nq * ws_words],
                     dists=topk["out_d"][:nq * k], found=out["out_found"][:nq])
        out.update({name: merged[name][:nq * k].reshape(nq, k) for name in ("out_slots", "out_labels", "out_dists")})
        out["out_found"], out["out_status"] = merged["out_found"][:nq], merged["out_status"][:nq]
    rounded = dict(state, vectors=np.ascontiguousarray(values).tobytes())
    ref = fixed_search_reference(rounded, queries, k, beam, search_width=width, allowed=allowed, graph=graph,
                                 hash_log2=hash_log2 if blocks == 1 else None, blocks=blocks,
                                 global_log2=global_log2 if blocks > 1 else None, return_counts=True)
    return out, ref


def assert_fixed_matches(out, ref, labels, *, min_same=0.99, counts=True):
    slots, dists, found, status, ref_counts = ref
    ref_counts = np.stack([ref_counts[c] for c in COUNTS], axis=1)
    assert_matches(out, (slots, dists, found), labels, min_same)
    np.testing.assert_array_equal(out["out_status"], status)
    if counts:   # the kernel's debug counters: the same work, step for step
        same = np.all(out["out_counts"] == ref_counts, axis=1)
        assert same.mean() >= min_same, (f"counters equal for {same.mean():.3f} of the queries; first differing "
                                         f"{COUNTS}: kernel {out['out_counts'][~same][:3]}, "
                                         f"reference {ref_counts[~same][:3]}")


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_fixed_beam(emulator, sift, width):
    """One block per query, fp16 rows, a hash small enough to be reset: the reference's slots,
    distances, found, status and work counters; at width 1 (and an exact visited set in the
    reference: tests/test_reference_fixed.py) that is the C search."""
    index, _, queries = sift
    state = index._core.export_state()
    out, ref = run_fixed(emulator, state, queries, 10, 20, width=width)
    assert np.all(out["out_status"] == 0)
    assert_fixed_matches(out, ref, np.frombuffer(state["labels"], np.uint64))


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_fixed_storages(emulator, sift, storage):
    index, _, queries = sift
    state = index._core.export_state()
    out, ref = run_fixed(emulator, state, queries, 10, 40, storage=storage, width=2, grid=5)
    assert_fixed_matches(out, ref, np.frombuffer(state["labels"], np.uint64))


@pytest.mark.parametrize("width", [1, 4])
def test_fixed_filtered(emulator, sift, width):
    """A filter: traversed like any other slot, the results the best allowed ones seen."""
    index, _, queries = sift
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    allowed = labels % 3 == 0
    out, ref = run_fixed(emulator, state, queries, 10, 30, width=width, allowed=allowed)
    assert_fixed_matches(out, ref, labels)
    assert np.all(allowed[out["out_slots"][out["out_slots"] != INVALID]])


@pytest.mark.parametrize("space", ["cosine", "ip"])
def test_fixed_deleted_and_metrics(emulator, minilm, space):
    """Deletions: the same path as without (deleted slots stay waypoints), never returned."""
    base, queries = minilm
    index = build_index(space, base, 6)
    for label in range(0, len(base), 7):
        index.mark_deleted(label)
    state = index._core.export_state()
    out, ref = run_fixed(emulator, state, queries, 10, 30, width=2)
    assert_fixed_matches(out, ref, np.frombuffer(state["labels"], np.uint64))
    assert np.all(out["out_labels"][out["out_found"] > 0] % 7 != 0)


@pytest.mark.parametrize("blocks, width", [(2, 1), (4, 2), (8, 1)])
def test_fixed_multi_block(emulator, sift, blocks, width):
    """Several blocks per query over one visited table in global memory, merged by
    select_topk_kernel and gather_merged_kernel; the blocks run one after another here, as in the
    reference (on a GPU they interleave)."""
    index, _, queries = sift
    state = index._core.export_state()
    labels = np.frombuffer(state["labels"], np.uint64)
    out, ref = run_fixed(emulator, state, queries, 10, 40, blocks=blocks, width=width)
    assert_fixed_matches(out, ref, labels)
    allowed = labels % 4 != 1
    out, ref = run_fixed(emulator, state, queries, 10, 40, blocks=blocks, width=width, allowed=allowed)
    assert_fixed_matches(out, ref, labels)


def test_fixed_multi_block_table_full(emulator, sift):
    """A shared table too small for the search: blocks stop, the status says so, what they found
    is still a valid (sorted, distinct) answer."""
    index, _, queries = sift
    state = index._core.export_state()
    out, ref = run_fixed(emulator, state, queries[:4], 10, 40, blocks=2, width=1, global_log2=8)
    assert np.all(out["out_status"] == 1)
    assert_fixed_matches(out, ref, np.frombuffer(state["labels"], np.uint64))


def test_fixed_search_graph_of_any_degree(emulator, sift, rng):
    """Any fixed-degree [n, D] adjacency (the search graph of issue 18, D up to 64): here level 0
    with its reverse edges added, padded to 48 columns, rows rotated so that padding sits anywhere."""
    index, _, queries = sift
    state = index._core.export_state()
    g = ReferenceGraph(state)
    extra = [[] for _ in range(g.n)]
    for s in range(g.n):
        for t in g.neighbors(s, 0).tolist():
            extra[t].append(s)
    graph = np.full((g.n, 48), INVALID, np.uint32)
    for s in range(g.n):
        row = list(dict.fromkeys(g.neighbors(s, 0).tolist() + extra[s]))[:48]
        graph[s, :len(row)] = row
        graph[s] = np.roll(graph[s], int(rng.integers(0, 48)))
    out, ref = run_fixed(emulator, state, queries, 10, 20, width=2, graph=graph)
    assert_fixed_matches(out, ref, np.frombuffer(state["labels"], np.uint64))


def test_fixed_bad_queries_and_empty_index(emulator, sift):
    """NaN or an infinity in a query: not searched, status bit 4, found 0, outputs padded; the
    other queries of the batch are answered. An empty index: nothing found."""
    index, _, queries = sift
    state = index._core.export_state()
    q = np.array(queries[:5])
    q[1, 3], q[3, 0] = np.nan, -np.inf
    for blocks in (1, 2):
        out, ref = run_fixed(emulator, state, q, 10, 20, blocks=blocks)
        assert out["out_status"].tolist() == [0, STATUS_BAD_QUERY, 0, STATUS_BAD_QUERY, 0]
        assert np.all(out["out_found"][[1, 3]] == 0) and np.all(out["out_slots"][[1, 3]] == INVALID)
        assert np.all(np.isinf(out["out_dists"][[1, 3]]))
        assert_fixed_matches(out, ref, np.frombuffer(state["labels"], np.uint64))
    empty = gpuhnsw.Index("l2", 8)
    empty.init_index(10)
    out, _ = run_fixed(emulator, empty._core.export_state(), np.zeros((3, 8), np.float32), 4, 4)
    assert np.all(out["out_found"] == 0) and np.all(out["out_slots"] == INVALID)
    assert np.all(out["out_labels"] == np.uint64(2**64 - 1)) and np.all(out["out_status"] == 0)


def test_fixed_rejects_a_bad_launch(emulator, sift):
    """A launch configuration that breaks an invariant (a hash too small for one iteration) gives
    found = -1 for every query instead of a hang."""
    index, _, queries = sift
    state = index._core.export_state()
    out, _ = run_fixed(emulator, state, queries[:3], 10, 20, width=4, hash_log2=6)
    assert np.all(out["out_found"] == -1)


# ---------------------------------------------------------------------------------------------
# distances, top-k, scatter

@pytest.mark.parametrize("storage, space, dim", [("float32", "l2", 37), ("float32", "ip", 128),
                                                 ("float16", "cosine", 50), ("float16", "l2", 8),
                                                 ("float32", "cosine", 300), ("bfloat16", "l2", 100)])
def test_compute_distances(emulator, rng, storage, space, dim):
    build, run = emulator
    n, nq, c = 200, 5, 70
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if space == "cosine":
        x = normalize_queries(x)
    vec, x = stored_rows(x, storage)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    slots = rng.integers(0, n, (nq, c)).astype(np.uint32)
    slots[0, 3] = INVALID
    slots[1, 5] = n + 7
    exe = build("distance", STORAGE=STORAGE_CXX[storage], TEAM=launch.team_size(dim, storage))
    params = [vec.shape[1], kernels.METRICS[space], n, nq, dim, c, 64, 2]
    out = run(exe, {"out": np.float32}, params=np.array(params, np.int64), vectors=vec, queries=q,
              slots=slots)["out"].reshape(nq, c)
    qq = normalize_queries(q) if space == "cosine" else q
    xs = x[np.minimum(slots, n - 1)]
    want = ((xs - qq[:, None]) ** 2).sum(-1) if space == "l2" else 1 - (xs * qq[:, None]).sum(-1)
    valid = slots < n
    np.testing.assert_array_equal(np.isinf(out), ~valid)
    np.testing.assert_allclose(out[valid], want[valid], rtol=1e-5, atol=1e-5)


def topk_oracle(d, k, offset=0, prev=None):
    d = np.where(np.isnan(d), np.inf, d)
    out_d = np.full((len(d), k), np.inf, np.float32)
    out_i = np.full((len(d), k), -1, np.int64)
    for r, row in enumerate(d):
        cd, ci = row, np.arange(row.size) + offset
        if prev is not None:
            keep = prev[1][r] >= 0
            cd, ci = np.concatenate([cd, prev[0][r][keep]]), np.concatenate([ci, prev[1][r][keep]])
        order = np.lexsort((ci, cd))[:k]
        out_d[r, :len(order)], out_i[r, :len(order)] = cd[order], ci[order]
    return out_d, out_i


@pytest.mark.parametrize("n, k, block", [(1000, 10, 64), (3000, 100, 128), (50, 20, 96), (5, 8, 64),
                                         (2000, 300, 64), (4000, 1000, 64)])
def test_select_topk(emulator, rng, n, k, block):
    build, run = emulator
    cap = launch.topk_capacity(k)
    exe = build("topk", CAP=cap)
    nq = 3

    def topk(d, offset=0, prev=None, scale=1.0, bias=None, exclude=None, exclude_key=0.0, transposed=False):
        # transposed: the tile is stored [n, nq] and its columns are the rows (the symmetric k-NN graph)
        strides = (1, nq) if transposed else (n, 1)
        params = [strides[0], n, nq, offset, k, block, 2, int(prev is not None), int(bias is not None),
                  int(exclude is not None), strides[1]]
        tile = np.ascontiguousarray(d.T) if transposed else d
        out = run(exe, {"out_d": np.float32, "out_i": np.int64}, params=np.array(params, np.int64), dists=tile,
                  fparams=np.array([scale, exclude_key], np.float32),
                  bias=bias if bias is not None else np.zeros(1, np.float32),
                  exclude=exclude if exclude is not None else np.zeros(1, np.int64),
                  prev_d=prev[0] if prev is not None else np.zeros(1, np.float32),
                  prev_i=prev[1] if prev is not None else np.zeros(1, np.int64))
        return out["out_d"].reshape(nq, k), out["out_i"].reshape(nq, k)

    d1 = rng.integers(0, 50, (nq, n)).astype(np.float32)   # many ties: the smaller index wins
    d1[0, min(7, n - 1)] = np.nan
    first = topk(d1)
    for got, want in zip(first, topk_oracle(d1, k)):
        np.testing.assert_array_equal(got, want)
    d2 = rng.integers(0, 50, (nq, n)).astype(np.float32)   # the next tile, merged with the running result
    for got, want in zip(topk(d2, offset=n, prev=first), topk_oracle(np.concatenate([d1, d2], 1), k)):
        np.testing.assert_array_equal(got, want)
    # keys formed in the kernel (exact search's l2 key: |x|^2 - 2 q.x), one column per row excluded,
    # against a running result from an earlier tile: equal to the keys formed beforehand
    bias = rng.integers(0, 100, n).astype(np.float32)
    exclude = (n + rng.integers(0, n, nq)).astype(np.int64)
    keys = d2 * np.float32(-2) + bias
    keys[np.arange(nq), exclude - n] = np.float32(1e30)
    for got, want in zip(topk(d2, offset=n, prev=first, scale=-2.0, bias=bias, exclude=exclude, exclude_key=1e30),
                         topk_oracle(np.concatenate([d1, keys], 1), k)):
        np.testing.assert_array_equal(got, want)
    # the same, reading a tile stored transposed (its columns are the rows)
    for got, want in zip(topk(d2, offset=n, prev=first, scale=-2.0, bias=bias, exclude=exclude, exclude_key=1e30,
                              transposed=True),
                         topk_oracle(np.concatenate([d1, keys], 1), k)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_scatter_rows(emulator, rng, storage):
    """Full rows, and link rows that ship their whole list (start 0) or only their last entries."""
    build, run = emulator
    r, q, m0, dim_pad, cap = 40, 30, 8, 12, 100
    stride = launch.row_stride(dim_pad, storage)
    slots, lslots = np.split(rng.choice(cap, r + q, replace=False).astype(np.uint32), [r])
    degree = rng.integers(0, m0, r).astype(np.uint32)
    labels = rng.integers(0, 2**63, r).astype(np.uint64)
    links = rng.integers(0, cap, (r, m0)).astype(np.uint32)
    rows = rng.standard_normal((r, dim_pad)).astype(np.float32)
    before = rng.integers(0, cap, (cap, m0)).astype(np.uint32)          # links0 on the device before
    ldegree = rng.integers(0, m0 + 1, q).astype(np.uint32)
    lstart = np.where(rng.random(q) < 0.5, 0, rng.integers(0, ldegree + 1)).astype(np.uint32)
    col = np.arange(m0)
    want = rng.integers(0, cap, (q, m0)).astype(np.uint32)              # the new lists
    kept = col < lstart[:, None]
    want[kept] = before[lslots][kept]                                   # entries before start stay
    want[col >= ldegree[:, None]] = 0xFFFFFFFF
    lpacked = want[~kept & (col < ldegree[:, None])]                    # row by row
    counts = (ldegree - lstart).astype(np.int64)
    lfirst = (np.cumsum(counts) - counts).astype(np.uint32)
    dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[storage]
    exe = build("scatter", STORAGE=STORAGE_CXX[storage])
    out = run(exe, {"vectors": dtype, "links0": np.uint32, "degree0": np.uint32, "labels": np.uint64},
              params=np.array([r, m0, dim_pad, stride, cap, 64, 7, q], np.int64), slots=slots, degree=degree,
              labels=labels, links=links, rows=rows, lslots=lslots, ldegree=ldegree, lstart=lstart, lfirst=lfirst,
              lpacked=lpacked, links0_before=before)
    vec = out["vectors"].reshape(cap, stride)
    np.testing.assert_array_equal(vec[slots, :dim_pad], stored_rows(rows, storage)[0][:, :dim_pad])
    assert np.all(vec[slots, dim_pad:] == 0)
    links0 = out["links0"].reshape(cap, m0)
    np.testing.assert_array_equal(links0[slots], links)
    np.testing.assert_array_equal(out["degree0"][slots], degree)
    np.testing.assert_array_equal(out["labels"][slots], labels)
    np.testing.assert_array_equal(links0[lslots], want)
    np.testing.assert_array_equal(out["degree0"][lslots], ldegree)
    untouched = np.setdiff1d(np.arange(cap), np.concatenate([slots, lslots]))
    np.testing.assert_array_equal(links0[untouched], before[untouched])
