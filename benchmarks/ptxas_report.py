"""What ptxas reports for each kernel instantiation, without a GPU: registers, spills, stack frame,
static shared memory, and the blocks per multiprocessor the registers and launch size allow.

Each instantiation is compiled as the loader compiles it (``kernels.nvrtc_compile``: CuPy's option
list plus ``-Xptxas=-v``), in worker processes.  The CI check (tests/test_kernels_nvrtc.py) asserts
the limits; this writes the numbers down (``ptxas_report.json`` and ``ptxas_report.md`` in ``--out``).
Needs the ``nvrtc`` extra.

    python benchmarks/ptxas_report.py                                   # search + search_fixed, sm_80 and sm_90
    python benchmarks/ptxas_report.py --modules search_fixed --archs sm_90 --out /tmp/p
"""
import argparse
import json
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from gpuhnsw.device import kernels
from gpuhnsw.testing import machine_info

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) "
                    r"registers(?:.*?(\d+) bytes smem)?", re.S)
REGISTERS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 32   # sm_80 / sm_90 resident blocks per multiprocessor


def compile_one(job):
    name, inst, arch = job
    ok, log, seconds = kernels.nvrtc_compile(name, inst, arch, ("-Xptxas=-v",))
    m = _PTXAS.search(log)
    if not ok or m is None:
        raise RuntimeError(f"{name} {inst} {arch}:\n{log}")
    stack, st, ld, regs, smem = (int(g or 0) for g in m.groups())
    threads = kernels.block_size(name, inst)
    return {"module": name, "instance": list(inst), "arch": arch, "registers": regs, "spill_bytes": st + ld,
            "stack_bytes": stack, "static_smem": smem, "threads": threads, "seconds": seconds,
            "blocks_by_registers": min(MAX_BLOCKS_PER_SM, REGISTERS_PER_SM // (regs * threads))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default="search,search_fixed")
    ap.add_argument("--archs", default="sm_80,sm_90")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    jobs = [(m, inst, a) for a in args.archs.split(",") for m in args.modules.split(",") for inst in kernels.instances(m)]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(compile_one, jobs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info("cuda-python", "nvidia-cuda-nvrtc-cu12")
    (out / "ptxas_report.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = ["# ptxas per instantiation (no GPU)", "",
             f"NVRTC from nvidia-cuda-nvrtc-cu12 {info['nvidia-cuda-nvrtc-cu12']}, CuPy's option list plus "
             "`-Xptxas=-v`. Blocks by registers: resident blocks per multiprocessor the register file allows "
             f"({REGISTERS_PER_SM} registers, at most {MAX_BLOCKS_PER_SM} blocks); shared memory and the launch "
             "decide the rest.", "",
             "| arch | module | T | Team | Capacity | threads | registers | spill B | stack B | static smem B | "
             "blocks by registers | NVRTC s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, team, cap = r["instance"]
        lines.append(f"| {r['arch']} | {r['module']} | {t} | {team} | {cap} | {r['threads']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['stack_bytes']} | {r['static_smem']} | {r['blocks_by_registers']} | "
                     f"{r['seconds']:.1f} |")
    (out / "ptxas_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
