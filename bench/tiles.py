"""The recurrent step product's micro-kernels alone, one core, against the core's register peak.

Each row times rnnfast._C.step_product, the product the kernels run every step (C[N, M] = A[N, K]
W^T with W packed once), on the calling thread: float32 on the AVX-512 (or AVX2) tile, bfloat16 on
AMX tiles where the CPU has them and with AVX512_BF16 otherwise (RNNFAST_ISA=avx512 forces that).
The peaks are register-only loops of independent multiply-adds (no memory operand), measured in
the same process: the FMA peak for float32, vdpbf16ps's or the AMX tiles' for bfloat16.

    python bench/tiles.py                 # the default shapes, fastest of 5 x 50 calls each
    python bench/tiles.py --shapes 64,1024,512 256,256,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

import rnnfast  # noqa: E402
from rnnfast import _C  # noqa: E402

# (N, M, K): a step of LSTM H = 512 on one of 2 threads (M = 4 * 512 / 2) at batch 1 to 256, the
# x product of a chunk of steps (N = T*N rows), and small in-cache shapes
SHAPES = (
    (1, 1024, 512),
    (4, 1024, 512),
    (16, 1024, 512),
    (64, 1024, 512),
    (256, 1024, 512),
    (64, 128, 256),
    (1024, 1024, 512),
)


def time_product(N: int, M: int, K: int, bf16: bool, calls: int, rounds: int) -> float:
    rng = np.random.default_rng([N, M, K])
    a = rng.standard_normal((N, K)).astype(np.float32)
    w = rng.standard_normal((M, K)).astype(np.float32)
    out = np.empty((N, M), np.float32)
    # rows: the rows the call's kernels would put through W, so that float32 packs it as they do
    return min(
        _C.step_product(a, w, out, bf16=bf16, rows=max(N, 4096), repeats=calls)[1]
        for _ in range(rounds)
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=None, metavar="N,M,K")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    rnnfast.set_num_threads(1)
    info = rnnfast.build_info()
    m = machine_info()
    print(f"CPU: {m['cpu_model']} ({m.get('cpu_family_model')}); ISA {' '.join(m.get('isa', []))}")
    print(f"rnnfast {info['version']}: {info['recurrent_kernel']}")
    peaks = {"float32": _C.register_peak_flops("avx512_fma") if info["cpu_avx512f"] else None}
    kinds = ["float32"]
    if info["cpu_avx512_bf16"]:
        kinds.append("bfloat16")
        amx = info.get("cpu_amx_bf16", False)
        peaks["bfloat16"] = _C.register_peak_flops("amx_bf16" if amx else "avx512_bf16")
        bf16_kernel = "AMX tiles" if amx else "AVX512_BF16"
    for k, v in peaks.items():
        if v:
            print(f"register peak, one core, {k}: {v / 1e9:.0f} GFLOP/s")
    print()
    head = "| (N, M, K) | float32 GFLOP/s | % FMA peak |"
    if "bfloat16" in kinds:
        head += f" bfloat16 ({bf16_kernel}) GFLOP/s | % of its peak | bfloat16 / float32 |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for N, M, K in shapes:
        flops = 2.0 * N * M * K
        row, rates = [f"({N}, {M}, {K})"], {}
        for kind in kinds:
            s = time_product(N, M, K, kind == "bfloat16", args.calls, args.rounds)
            rates[kind] = flops / s
            peak = peaks.get(kind)
            row += [f"{rates[kind] / 1e9:.0f}", f"{100 * rates[kind] / peak:.0f}%" if peak else "-"]
        if "bfloat16" in kinds:
            row += [f"{rates['bfloat16'] / rates['float32']:.2f}x"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
