"""NVRTC compile cost of the kernels, per instantiation, without a GPU.

What a fresh process pays at its first GPU query when CuPy's disk cache is cold: the loader
compiles one instantiation per program (``gpuhnsw.device.kernels.instance_source``), with CuPy's option
list (``kernels.nvrtc_options``), for the device's architecture. For comparison, the whole search
module with its 40 instantiations in one program (the loader before: one ``RawModule`` with name
expressions, which CuPy before 14.2 recompiled in every process).

Each compile runs in this process, one after another (NVRTC is single-threaded); the two kinds are
interleaved per repeat and the median is reported. Needs the ``nvrtc`` extra (cuda-python and the
nvidia-cuda-nvrtc wheel). Writes ``nvrtc_cost.json`` (machine, every raw time) and
``nvrtc_cost.md`` into ``--out``.

    python benchmarks/nvrtc_cost.py                       # sm_80, 3 repeats (a few minutes)
    python benchmarks/nvrtc_cost.py --archs sm_75,sm_90 --repeats 1 --out /tmp/nv
"""
import argparse
import json
import statistics
import time
from pathlib import Path

from gpuhnsw.device import kernels
from gpuhnsw.testing import machine_info


def whole_search_module(arch):
    """Seconds to compile the 40 search instantiations in one program (name expressions)."""
    nvrtc = kernels.nvrtc_module()
    src = kernels.kernel_source("search").encode()
    _, prog = nvrtc.nvrtcCreateProgram(src, b"search.cu", 0, [], [])
    try:
        for t, team, cap in kernels.instances("search"):
            expr = f"search_beam_kernel<{kernels.STORAGE_TYPES[t]}, {team}, {cap}>"
            nvrtc.nvrtcAddNameExpression(prog, expr.encode())
        opts = [o.encode() for o in kernels.nvrtc_options(arch)]
        t0 = time.perf_counter()
        result = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        seconds = time.perf_counter() - t0
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    err = result[0] if isinstance(result, tuple) else result
    if int(err):
        raise RuntimeError(f"whole search module failed to compile: {err}")
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="sm_80")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if kernels.nvrtc_module() is None:
        raise SystemExit("NVRTC not available: pip install '.[nvrtc]'")
    archs = args.archs.split(",")
    info = machine_info("cuda-python", "nvidia-cuda-nvrtc-cu12")
    raw = {arch: {"instances": {}, "whole_search_module": []} for arch in archs}
    for rep in range(args.repeats):
        for arch in archs:
            for name in kernels.MODULES:
                for inst in kernels.instances(name):
                    ok, log, seconds = kernels.nvrtc_compile(name, inst, arch)
                    if not ok:
                        raise RuntimeError(f"{name} {inst} {arch}:\n{log}")
                    raw[arch]["instances"].setdefault(f"{name} {inst}", []).append(seconds)
            raw[arch]["whole_search_module"].append(whole_search_module(arch))
            print(f"repeat {rep + 1}/{args.repeats} {arch} done", flush=True)

    rows = []
    for arch in archs:
        per = {key: statistics.median(v) for key, v in raw[arch]["instances"].items()}
        for name in kernels.MODULES:
            times = [t for key, t in per.items() if key.startswith(name + " ")]
            rows.append((arch, name, len(times), min(times), statistics.median(times), max(times)))
        rows.append((arch, "search, all 40 in one program", 1, *[statistics.median(raw[arch]["whole_search_module"])] * 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nvrtc_cost.json").write_text(json.dumps({"machine": info, "repeats": args.repeats, "raw": raw}, indent=1))
    lines = [
        "# NVRTC compile cost per instantiation (no GPU)",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, load at start {info['load_average_at_start']} "
        "(shared with other jobs: times are noisy); NVRTC from nvidia-cuda-nvrtc-cu12 "
        f"{info['nvidia-cuda-nvrtc-cu12']}. Median of {args.repeats} per instantiation, seconds.",
        "",
        "| arch | kernel | instantiations | min | median | max |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {n} | {c} | {lo:.2f} | {med:.2f} | {hi:.2f} |" for a, n, c, lo, med, hi in rows]
    lines += ["", "A first query compiles one search instantiation (plus the scatter kernel of its first sync); "
              "with CuPy's disk cache warm it compiles nothing."]
    (out / "nvrtc_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
