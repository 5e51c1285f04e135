"""DeepBench-style GPU benchmark: rnnfast's CUDA kernels against cuDNN (torch.nn.LSTM/GRU/RNN).

Both run in the same process on the same GPU, on the same device buffers (shared through DLPack),
timed with CUDA events (median of --reps after --warmup). Four numbers per shape and backend:
forward inference, forward training, backward (after a training forward, timed alone), and
total = forward training + backward. The input projection (x W_ih^T over all steps) is inside
every number, for both backends, as DeepBench counts it. C = H, as in DeepBench.

    python bench/gpu.py                      # the whole DeepBench grid, float32 (no TF32)
    python bench/gpu.py --dtype bfloat16 --only lstm
    python bench/gpu.py --quick              # a few shapes, to check the script

Writes a JSON file (default bench/out/gpu.json) and prints a table; paste the table, the device
and the versions into bench/RESULTS.md.

On the lent GPU machine (no network; python3 there has torch, CuPy 14 for CUDA 13, nvidia-cublas,
ml_dtypes, scikit-build-core, pybind11, cmake, nvcc 13.0) only scipy-openblas32 is missing: carry
its cp312 manylinux wheel in .whl (see the device tool's README), then in one call
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    python3 -m pip install -q --no-build-isolation --no-deps --no-index .
    pytest -q tests/test_cuda.py            # pytest, not python -m pytest (the checkout shadows)
    python3 bench/gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from rnnfast import cells as rcells


@dataclass(frozen=True)
class Shape:
    cell: str
    H: int
    N: int
    T: int

    @property
    def label(self) -> str:
        return f"{self.cell} H={self.H} N={self.N} T={self.T}"


def deepbench_shapes() -> list[Shape]:
    """DeepBench's RNN shapes, as the issue lists them."""
    shapes = [Shape("lstm", H, N, 25) for H in (512, 1024, 2048) for N in (1, 4, 16, 32, 64, 128)]
    shapes += [Shape("lstm", 256, N, 150) for N in (16, 32, 64)]
    shapes += [Shape("gru", 1024, 32, 1500)]
    shapes += [Shape("rnn_tanh", 1760, 16, 50)]
    return shapes


def quick_shapes() -> list[Shape]:
    return [Shape("lstm", 256, 4, 25), Shape("gru", 512, 16, 50), Shape("rnn_tanh", 256, 8, 20)]


def time_events(fn, warmup: int, reps: int, torch) -> list[float]:
    """Milliseconds per call of fn, each between two CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_backward(forward, backward, warmup: int, reps: int, torch) -> list[float]:
    """Milliseconds of backward alone: a fresh training forward before each, outside the timing."""
    for _ in range(warmup):
        backward(forward())
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        ctx = forward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backward(ctx)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def make_torch(shape: Shape, dtype, torch):
    H, C = shape.H, shape.H
    if shape.cell == "lstm":
        m = torch.nn.LSTM(C, H)
    elif shape.cell == "gru":
        m = torch.nn.GRU(C, H)
    else:
        m = torch.nn.RNN(C, H, nonlinearity=shape.cell.removeprefix("rnn_"))
    return m.to("cuda", dtype)


def bench_shape(shape: Shape, dtype_name: str, warmup: int, reps: int, torch, cupy, rf):
    from rnnfast import cuda as rcuda

    dtype = getattr(torch, dtype_name)
    T, N, H = shape.T, shape.N, shape.H
    torch.manual_seed(0)
    model = make_torch(shape, dtype, torch)
    x = torch.randn(T, N, H, device="cuda", dtype=dtype)
    h0 = 0.5 * torch.randn(1, N, H, device="cuda", dtype=dtype)
    c0 = 0.5 * torch.randn(1, N, H, device="cuda", dtype=dtype)
    dy = torch.randn(T, N, H, device="cuda", dtype=dtype)
    lstm = shape.cell == "lstm"
    state = (h0, c0) if lstm else h0
    w = {k: getattr(model, k + "_l0").detach() for k in ("weight_ih", "weight_hh", "bias_ih",
                                                         "bias_hh")}  # fmt: skip

    # ---- cuDNN through torch
    def t_infer():
        with torch.no_grad():
            model(x, state)

    xg = x.detach().requires_grad_(True)

    def t_train():
        out, _ = model(xg, state)
        return out

    def t_bwd(out):
        torch.autograd.backward(out, dy)

    # ---- ours, on the same buffers
    cp = {k: cupy.from_dlpack(v) for k, v in w.items()}
    xc, h0c, c0c, dyc = (cupy.from_dlpack(v) for v in (x, h0[0], c0[0], dy))
    c0_ours = c0c if rcells.cell_spec(shape.cell).has_c else None

    def call(training):
        return rf.forward(shape.cell, xc, cp["weight_ih"], cp["weight_hh"], cp["bias_ih"],
                          cp["bias_hh"], h0c, c0_ours, None, training)  # fmt: skip

    def o_bwd(ctx_out):
        ctx = ctx_out[-1]
        rf.backward(shape.cell, ctx, dyc, None, None)

    def med(ts):
        return float(np.median(ts))

    row = {"shape": asdict(shape), "dtype": dtype_name}
    row["cudnn"] = {
        "fwd_infer": med(time_events(t_infer, warmup, reps, torch)),
        "fwd_train": med(time_events(t_train, warmup, reps, torch)),
        "bwd": med(time_backward(t_train, t_bwd, warmup, reps, torch)),
    }
    # cupy and torch share the legacy default stream here, so the events order both
    for mode in ("auto", "never"):
        rcuda.set_options(persistent=mode)
        row["ours" if mode == "auto" else "ours_stepped"] = {
            "fwd_infer": med(time_events(lambda: call(False), warmup, reps, torch)),
            "fwd_train": med(time_events(lambda: call(True), warmup, reps, torch)),
            "bwd": med(time_backward(lambda: call(True), o_bwd, warmup, reps, torch)),
        }
    rcuda.set_options(persistent="auto")
    row["persistent_fits"] = bool(rcuda._load().persistent_fits(shape.cell, dtype_name, N, H))
    for k in ("cudnn", "ours", "ours_stepped"):
        row[k]["total"] = row[k]["fwd_train"] + row[k]["bwd"]
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| shape | dtype | persistent | fwd infer ours / cuDNN (ms) | fwd train ours / cuDNN | "
        "bwd ours / cuDNN | total ours / cuDNN | total speedup |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        s = r["shape"]
        o, c = r["ours"], r["cudnn"]

        def pair(k, o=o, c=c):
            return f"{o[k]:.3f} / {c[k]:.3f}"

        lines.append(
            f"| {s['cell']} H={s['H']} N={s['N']} T={s['T']} | {r['dtype']} | "
            f"{'yes' if r['persistent_fits'] else 'no'} | {pair('fwd_infer')} | "
            f"{pair('fwd_train')} | {pair('bwd')} | {pair('total')} | "
            f"{c['total'] / o['total']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--only", choices=sorted(rcells.CELLS), help="one cell kind")
    p.add_argument("--quick", action="store_true", help="three small shapes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tf32", action="store_true", help="TF32 GEMMs in both backends")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "gpu.json"))
    args = p.parse_args(argv)

    import cupy
    import torch

    from rnnfast import cuda as rcuda

    if not rcuda.cuda_available():
        print(f"rnnfast's CUDA backend is not available: {rcuda.unavailable_reason()}")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    rcuda.set_options(tf32=args.tf32)
    rf = rcuda  # what rnnfast.ops routes GPU arrays to, minus one isinstance check

    shapes = quick_shapes() if args.quick else deepbench_shapes()
    if args.only:
        shapes = [s for s in shapes if s.cell == args.only]
    rows = []
    for s in shapes:
        t0 = time.perf_counter()
        rows.append(bench_shape(s, args.dtype, args.warmup, args.reps, torch, cupy, rf))
        print(f"{s.label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "cupy": cupy.__version__,
        "rnnfast_cuda": rcuda.build_info(),
        "python": platform.python_version(),
        "tf32": args.tf32,
        "note": "input projection included in both backends; C = H; median of "
        f"{args.reps} after {args.warmup} warm-up calls",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(json.dumps(info))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
