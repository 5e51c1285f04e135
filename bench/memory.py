"""Memory benchmark of rnnfast against torch.nn on the CPU: issue 5's two memory targets.

    python bench/memory.py                  # everything, 2-3 minutes; prints markdown tables
    python bench/memory.py --write-results  # ... and updates its block in bench/RESULTS.md
    python bench/memory.py --parts reserve --cells lstm --shapes 4,200,256   # a quick look

Every measurement runs in a worker process (this file with --worker) that imports only one of
rnnfast and torch. float32 throughout; MiB = 2^20 bytes.

(a) Training: what a training forward keeps for backward beyond the caller's own inputs and the
    outputs y, h_n, c_n, on the grid of bench/_common.py (one worker per backend).
    - rnnfast: the arrays that the context of ops.<cell>_forward(training=True) holds
      (ctx.reserve and the arrays in ctx.inputs), each taken up to the buffer it is a view of:
      the bytes of their union of address ranges less the ranges of x, h0, c0, the weights and
      y, h_n, c_n (y is a view into the reserve). Checked against the reserve's layout in
      csrc/rnnfast/cell.h, and that no input was copied.
    - torch.nn.LSTM/GRU/RNN, with x, h0, c0 and the parameters requiring grad: every tensor that
      autograd saves, caught with torch.autograd.graph.saved_tensors_hooks and taken up to its
      whole storage. "all saved": the bytes of the distinct storages; "beyond": the same less the
      address ranges of the inputs, the parameters and the outputs.
    - "resident": "beyond" less the pages wholly inside the kept buffers that were never written
      (not resident, by mincore). torch's oneDNN LSTM allocates a workspace it mostly leaves
      untouched, so for it the two differ.
    - Cross-check at one shape, a fresh worker per (backend, cell): resident memory
      (/proc/self/statm) after a training forward less before it, less the outputs' bytes. Freed
      memory is handed back first (rnnfast.empty_cache, malloc_trim), so that only what is held
      counts, and a forward of the same shape beforehand keeps the libraries' one-time set-up out.
(b) Inference against T: in a fresh worker per case, the peak resident memory during one
    inference forward (VmHWM in /proc/self/status, reset just before the call through
    /proc/self/clear_refs) less the resident memory just before it, less the outputs' bytes.
    Beforehand: a forward of min(T, 100) steps at the same (N, H), then rnnfast's scratch cache
    emptied (it would lend the call memory counted before it) and malloc_trim. The cache's size
    after the call (rnnfast.scratch_cache_bytes(): freed scratch kept for the next call, part of
    the peak) is shown too. torch runs under torch.inference_mode().

The workers run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so that
every large block is its own mapping and resident memory shows what the code holds rather than
freed pages glibc keeps; and at a lower priority (--nice): memory does not depend on speed, and
anything else running on the machine is disturbed less.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CELLS, GATES, SHAPES, Case, machine_info, make_inputs, thread_env  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench/memory.py: begin -->", "<!-- bench/memory.py: end -->"
BACKENDS = ("ours", "torch")
LABEL = {"ours": "rnnfast", "torch": "torch.nn"}
PARTS = ("reserve", "rss", "infer")
RSS_SHAPE = (32, 100, 1024)  # the cross-check's shape: the grid's largest reserve
INFER_CELLS = ("lstm", "gru")
INFER_NH = ((32, 1024), (1, 256))
INFER_T = (100, 1000, 4000)
# before a measurement, a forward at the same (N, H) with T (training) or min(T, WARM_T)
# (inference) steps, so that the libraries' one-time set-up (thread pools, BLAS buffers) stays out
# of it: a first forward at (32, 100, 1024) leaves up to 10 MiB more resident than a second
WARM_T = 100
MiB = 1 << 20


# ---- measuring, in the workers ----------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_reset() -> None:
    # "5" resets VmHWM to the current resident size (Linux 4.0+)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def release_freed() -> None:
    """Hand freed heap memory back to the OS, so that resident memory counts only live blocks."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


Range = tuple[int, int]


def merged(ranges: list[Range]) -> list[list[int]]:
    out = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def union_bytes(ranges: list[Range], minus: list[Range] = ()) -> int:
    """Bytes covered by the union of the half-open address ranges, less those covered by minus."""
    held, cut = merged(ranges), merged(minus)
    total = sum(hi - lo for lo, hi in held)
    for lo, hi in held:
        for clo, chi in cut:
            total -= max(0, min(hi, chi) - max(lo, clo))
    return total


def untouched_bytes(ranges: list[Range]) -> int:
    """Bytes of the pages wholly inside the ranges that are not resident (mincore): allocated
    but never written. Such pages cannot hold an input or an output, which are all written."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for lo, hi in merged(ranges):
        a, b = -(-lo // page) * page, hi // page * page
        if b <= a:
            continue
        vec = (ctypes.c_ubyte * ((b - a) // page))()
        if libc.mincore(ctypes.c_void_p(a), ctypes.c_size_t(b - a), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        total += page * sum(1 for v in vec if not v & 1)
    return total


def np_range(a: np.ndarray, whole: bool) -> Range:
    """The addresses of a, or (whole) of the buffer that keeps it alive (its last ndarray base)."""
    if whole:
        while isinstance(a.base, np.ndarray):
            a = a.base
    lo, hi = np.lib.array_utils.byte_bounds(a)
    return lo, hi


def torch_range(t) -> Range:
    """The addresses a strided tensor spans (its own elements, not its whole storage)."""
    if t.numel() == 0:
        return 0, 0
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def reserve_expected(cell: str, N: int, T: int, H: int, itemsize: int = 4) -> int:
    """rnnfast's reserve as csrc/rnnfast/cell.h lays it out: hs [T+1,N,H], LSTM cs [T+1,N,H],
    LSTM/GRU gates [T,N,G*H], GRU ghn [T,N,H]."""
    state = (T + 1) * N * H
    n = state
    n += state if cell == "lstm" else 0
    n += T * N * GATES[cell] * H if cell in ("lstm", "gru") else 0
    n += T * N * H if cell == "gru" else 0
    return n * itemsize


# rnnfast.ops and torch.nn called the same way: ``forward(training) -> (y, h_n, c_n, keep)``, with
# ``keep`` what holds the backward's data (rnnfast's context; None for torch, whose graph hangs
# off y) and c_n None except for LSTM.


def ours_setup(threads: int):
    import rnnfast

    rnnfast.set_num_threads(threads)
    info = {
        "rnnfast": rnnfast.__version__,
        "threads": rnnfast.get_num_threads(),
        "scratch_cache_limit": int(rnnfast._C.scratch_cache_limit()),
    }
    return rnnfast, info


def ours_forward(rnnfast, cell: str, d: dict):
    def forward(training: bool):
        return rnnfast.ops.forward(cell, d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                                   d["h0"], d["c0"], training=training)  # fmt: skip

    return forward


def torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }
    return torch, info


def torch_forward(torch, cell: str, d: dict, C: int, H: int):
    """A torch.nn module with rnnfast's weights; in training x, h0, c0 and the weights need grad."""
    if cell in ("lstm", "gru"):
        mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](C, H)
    else:
        mod = torch.nn.RNN(C, H, nonlinearity=cell[4:])
    with torch.no_grad():
        for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
            attr = name.replace("w_", "weight_").replace("b_", "bias_") + "_l0"
            getattr(mod, attr).copy_(torch.from_numpy(d[name]))
    x = torch.from_numpy(d["x"])
    h0 = None if d["h0"] is None else torch.from_numpy(d["h0"])[None]
    c0 = None if d.get("c0") is None else torch.from_numpy(d["c0"])[None]

    def forward(training: bool):
        xx, hh, cc = x, h0, c0
        if training:
            xx, hh, cc = (None if t is None else t.requires_grad_() for t in (x, h0, c0))
        if cell == "lstm":
            y, (h_n, c_n) = mod(xx, None if hh is None else (hh, cc))
        else:
            (y, h_n), c_n = mod(xx, hh), None
        return y, h_n, c_n, None

    inputs = [t for t in (x, h0, c0) if t is not None] + list(mod.parameters())
    return forward, inputs


def out_bytes(outs) -> int:
    return sum(int(o.nbytes) for o in outs if o is not None)


# ---- the workers: one job each, in a fresh process ----------------------------------------------


def job_reserve(backend: str, threads: int, cells, shapes) -> dict:
    """(a) by accounting: the reserve of every (cell, shape), in one process."""
    if backend == "ours":
        rnnfast, info = ours_setup(threads)
    else:
        torch, info = torch_setup(threads)
    rows = []
    for cell in cells:
        for N, T, H in shapes:
            d = make_inputs(Case(cell, N, T, H, "train"))
            row = {"cell": cell, "N": N, "T": T, "H": H}
            if backend == "ours":
                y, h_n, c_n, ctx = ours_forward(rnnfast, cell, d)(True)
                user = [d[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")]
                outs = [y, h_n, c_n]
                held = [ctx.reserve] + [getattr(ctx.inputs, f.name) for f in fields(ctx.inputs)]
                held = [a for a in held if isinstance(a, np.ndarray)]
                # inputs that are not the caller's own arrays would be copies kept for backward
                row["copied_inputs"] = [
                    f
                    for f in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")
                    if getattr(ctx.inputs, f) is not None and getattr(ctx.inputs, f) is not d[f]
                ]
                minus = [np_range(a, False) for a in user + outs if a is not None]
                row["reserve"] = int(ctx.reserve.nbytes)
                row["all"] = union_bytes([np_range(a, True) for a in held])
                row["beyond"] = union_bytes([np_range(a, True) for a in held], minus)
                row["expected"] = reserve_expected(cell, N, T, H)
                row["y_in_reserve"] = bool(np.shares_memory(y, ctx.reserve))
                row["resident"] = row["beyond"] - untouched_bytes([np_range(a, True) for a in held])
                del y, h_n, c_n, ctx
            else:
                forward, inputs = torch_forward(torch, cell, d, H, H)
                saved = {}  # storage address -> bytes

                def pack(t, saved=saved):
                    st = t.untyped_storage()
                    saved[st.data_ptr()] = st.nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    y, h_n, c_n, _ = forward(True)
                ranges = [(p, p + n) for p, n in saved.items()]
                minus = [torch_range(t) for t in [*inputs, y, h_n, c_n] if t is not None]
                row["tensors_saved"] = len(saved)
                row["all"] = union_bytes(ranges)
                row["beyond"] = union_bytes(ranges, minus)
                row["resident"] = row["beyond"] - untouched_bytes(ranges)
                del y, h_n, c_n
            rows.append(row)
    return {"info": info, "rows": rows}


def light_inputs(cell: str, N: int, T: int, H: int) -> dict:
    """Inputs for the inference runs: x is up to 0.5 GB, so float32 straight from the generator
    (make_inputs goes through float64 and also makes dy). Values do not matter here."""
    rng = np.random.default_rng(0)
    G, k = GATES[cell], 1.0 / np.sqrt(H)
    shapes = {"w_ih": (G * H, H), "w_hh": (G * H, H), "b_ih": (G * H,), "b_hh": (G * H,)}
    d = {k_: rng.uniform(-k, k, size=s).astype(np.float32) for k_, s in shapes.items()}
    d["x"] = rng.standard_normal((T, N, H), dtype=np.float32)
    d["h0"] = d["c0"] = None
    return d


def job_peak(backend: str, threads: int, part: str, cell: str, N: int, T: int, H: int) -> dict:
    """(b) peak during an inference forward, or (part "rss") the cross-check of (a): resident
    memory held after a training forward."""
    training = part == "rss"
    if backend == "ours":
        rnnfast, info = ours_setup(threads)
    else:
        torch, info = torch_setup(threads)

    def make(T_):
        if training:
            d = make_inputs(Case(cell, N, T_, H, "train"))
            d.pop("dy")
        else:
            d = light_inputs(cell, N, T_, H)
        if backend == "ours":
            return ours_forward(rnnfast, cell, d)
        return torch_forward(torch, cell, d, H, H)[0]

    def run(forward):
        if backend == "torch" and not training:
            with torch.inference_mode():
                return forward(False)
        return forward(training)

    warm = make(T if training else min(T, WARM_T))
    run(warm)
    forward = make(T)
    del warm
    if backend == "ours":
        rnnfast.empty_cache()
    release_freed()
    row = {"cell": cell, "N": N, "T": T, "H": H}
    before = rss_bytes()
    peak_reset()
    t0 = time.perf_counter()
    y, h_n, c_n, keep = run(forward)
    row["seconds"] = time.perf_counter() - t0
    row["peak_growth"] = peak_bytes() - before
    row["outputs"] = out_bytes([y, h_n, c_n])
    if backend == "ours":
        row["cache_after"] = rnnfast.scratch_cache_bytes()
    if training:
        if backend == "ours":
            rnnfast.empty_cache()
        release_freed()
        row["held"] = rss_bytes() - before
    del y, h_n, c_n, keep
    return {"info": info, "rows": [row]}


def worker(req: dict) -> None:
    # only the reply goes to stdout: a library that prints must not break it
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    if req["job"] == "reserve":
        out = job_reserve(req["backend"], req["threads"], req["cells"], req["shapes"])
    else:
        out = job_peak(req["backend"], req["threads"], req["job"], *req["case"])
    out["info"]["numpy"] = np.__version__
    os.write(reply_fd, (json.dumps(out) + "\n").encode())


# ---- the driver ---------------------------------------------------------------------------------


def worker_env(threads: int) -> dict:
    env = thread_env(threads)
    # glibc's mmap threshold fixed (not raised after the first large free): every block of
    # 128 KiB or more is its own mapping, so resident memory and mincore see only the pages a
    # block's owner wrote, not freed pages glibc kept for reuse
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    return env


def call_worker(req: dict, args) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(req)],
        capture_output=True,
        text=True,
        env=worker_env(args.threads),
        cwd=str(HERE),
        preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"worker {req} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(args) -> dict:
    res = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv[1:],
            "threads": args.threads,
            "machine": machine_info(),
            "info": {},
        },
        "reserve": {},
        "rss": {},
        "infer": {},
    }
    start = time.perf_counter()

    def collect(part, backend, out):
        res["meta"]["info"].setdefault(backend, {}).update(out["info"])
        res[part].setdefault(backend, []).extend(out["rows"])

    for backend in BACKENDS:
        if "reserve" in args.parts:
            req = {"job": "reserve", "backend": backend, "threads": args.threads}
            req.update(cells=args.cells, shapes=args.shapes)
            collect("reserve", backend, call_worker(req, args))
        if "rss" in args.parts:
            for cell in args.cells:
                case = [cell, *args.rss_shape]
                req = {"job": "rss", "backend": backend, "threads": args.threads, "case": case}
                collect("rss", backend, call_worker(req, args))
        if "infer" in args.parts:
            for cell in args.infer_cells:
                for N, H in args.infer_nh:
                    for T in args.infer_t:
                        req = {"job": "infer", "backend": backend, "threads": args.threads}
                        req["case"] = [cell, N, T, H]
                        collect("infer", backend, call_worker(req, args))
    res["meta"]["elapsed_s"] = time.perf_counter() - start
    return res


# ---- the report ---------------------------------------------------------------------------------


def mib(b: float) -> str:
    v = b / MiB
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.2g}"


def md_table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def keyed(rows: list[dict]) -> dict:
    return {(r["cell"], r["N"], r["T"], r["H"]): r for r in rows}


def reserve_section(res: dict) -> tuple[list[str], list[str]]:
    ours, torch = keyed(res["reserve"].get("ours", [])), keyed(res["reserve"].get("torch", []))
    rows = [
        ["cell", "(N, T, H)", "rnnfast reserve", "rnnfast beyond", "torch all saved"]
        + ["torch beyond", "torch beyond, resident", "torch / rnnfast", "same, resident"]
    ]
    margins, bad, unwritten = {}, [], []
    for key, o in ours.items():
        t = torch.get(key)
        row = [o["cell"], shape_str(key), mib(o["reserve"]), mib(o["beyond"])]
        if t:
            r, rr = t["beyond"] / max(o["beyond"], 1), t["resident"] / max(o["resident"], 1)
            row += [mib(t["all"]), mib(t["beyond"]), mib(t["resident"]), times(r), times(rr)]
            margins.setdefault(o["cell"], []).append((r, rr, shape_str(key)))
        rows.append(row + ["-"] * (len(rows[0]) - len(row)))
        if o["reserve"] != o["expected"] or o["copied_inputs"] or not o["y_in_reserve"]:
            bad.append(f"{o['cell']} {shape_str(key)}")
        if o["resident"] < o["beyond"]:
            unwritten.append(f"{o['cell']} {shape_str(key)}: {mib(o['beyond'] - o['resident'])}")
    out = ["### (a) Training: kept for backward beyond the inputs and outputs (MiB)", ""]
    out += [md_table(rows), ""]
    verdicts = []
    if margins:
        flat = [m for ms in margins.values() for m in ms]
        for i, what in ((0, "bytes of storage"), (1, "resident bytes")):
            held = sum(m[i] >= 1 for m in flat)
            least = "; ".join(
                f"{c} {times(min(m[i] for m in ms))} at {min(ms, key=lambda m: m[i])[2]}"
                for c, ms in margins.items()
            )
            verdicts.append(
                f"(a) training reserve no larger than torch keeps, in {what}: "
                f"**{'holds' if held == len(flat) else 'FAILS'}** at {held} of {len(flat)} "
                f"(cell, shape); smallest ratio torch / rnnfast per cell: {least}."
            )
    if ours:
        verdicts.append(
            "rnnfast's reserve is exactly the layout of csrc/rnnfast/cell.h at every shape (hs and "
            "LSTM cs [T+1, N, H], LSTM/GRU gates [T, N, G*H], GRU ghn [T, N, H]); y is a view "
            "into it and no input is copied, so beyond the outputs it keeps the reserve less y"
            + (
                ", all of it written (resident)."
                if not unwritten
                else f"; not all resident: {'; '.join(unwritten)}."
            )
            if not bad
            else f"rnnfast's reserve differs from cell.h's layout, or inputs are copied, at: {bad}"
        )
    if res["rss"]:
        rows = [["cell", "(N, T, H)", "backend", "RSS held - outputs", "accounted, resident"]]
        rows[0].append("rnnfast scratch cache after the forward")
        gaps = []
        for b, rs in res["rss"].items():
            acc = keyed(res["reserve"].get(b, []))
            for key, r in keyed(rs).items():
                a = acc.get(key)
                if a:
                    gaps.append(
                        (abs(r["held"] - r["outputs"] - a["resident"]), LABEL[b], r["cell"])
                    )
                rows.append(
                    [r["cell"], shape_str(key), LABEL[b], mib(r["held"] - r["outputs"])]
                    + [mib(a["resident"]) if a else "-"]
                    + [mib(r["cache_after"]) if b == "ours" else "-"]
                )
        out += ["Cross-check by resident memory, a fresh process per row:", ""]
        out += [md_table(rows), ""]
        if gaps:
            gap = max(gaps)
            verdicts.append(
                f"The resident-memory cross-check agrees with the resident accounting within "
                f"{mib(gap[0])} MiB (largest gap: {gap[1]} {gap[2]}; resident memory also counts "
                "the page that heads each mapping and, for torch, the autograd graph's nodes)."
            )
    return out, verdicts


def infer_section(res: dict) -> tuple[list[str], list[str]]:
    ours, torch = keyed(res["infer"].get("ours", [])), keyed(res["infer"].get("torch", []))
    rows = [["cell", "(N, H)", "T", "outputs", "rnnfast peak - outputs"]]
    rows[0] += ["rnnfast scratch cache after", "torch peak - outputs"]
    for (cell, N, T, H), o in ours.items():
        t = torch.get((cell, N, T, H))
        rows.append(
            [cell, f"({N}, {H})", str(T), mib(o["outputs"]), mib(extra(o)), mib(o["cache_after"])]
            + [mib(extra(t)) if t else "-"]
        )
    out = ["### (b) Inference: peak resident growth during one forward, less the outputs (MiB)", ""]
    out += [md_table(rows), ""]
    verdicts = []
    for name, by_key in (("rnnfast", ours), ("torch.nn", torch)):
        groups = {}
        for (cell, N, T, H), r in by_key.items():
            groups.setdefault((cell, N, H), []).append((T, extra(r)))
        flat, parts, nh_max, act_max = [], [], 0.0, 0.0
        for (cell, N, H), pts in groups.items():
            pts.sort()
            ts = "/".join(str(T) for T, _ in pts)
            es = " / ".join(mib(e) for _, e in pts)
            nh = max(e for _, e in pts) / (4 * N * H)  # the target's unit: N*H floats
            nh_max = max(nh_max, nh)
            # less one float32 copy of the weights (C = H here), which rnnfast packs per call
            weights = 4 * GATES[cell] * H * (H + H)
            act = max(max(e for _, e in pts) - weights, 0) / (4 * N * H)
            act_max = max(act_max, act)
            parts.append(f"{cell} ({N}, {H}): {es} MiB at T = {ts} (at most {nh:.0f} x N*H)")
            if len(pts) > 1:
                (_, e1), (_, e2) = pts[-2:]
                flat.append(e2 <= e1 * 1.05 + MiB)
        line = f"{name}'s extra peak: " + "; ".join(parts) + "."
        if name == "rnnfast" and flat:
            ok = all(flat)
            cache = max(r["cache_after"] for r in by_key.values())
            line += (
                f" After the call, rnnfast's scratch cache still holds up to {mib(cache)} MiB "
                "(for the next call; rnnfast.empty_cache() frees it)."
            )
            line = (
                f"(b) inference memory beyond the outputs stops growing with T: "
                f"**{'holds' if ok else 'FAILS'}** at {sum(flat)} of {len(flat)} (cell, N, H) "
                f"(the extra at the two largest T within 5% + 1 MiB). It is at most "
                f"{nh_max:.0f} x N*H floats; less one packed copy of the weights (G*H*(C+H) "
                f"floats, made per call), at most {act_max:.0f} x N*H floats: O(N*H) beyond the "
                "outputs and that copy. " + line
            )
        verdicts.append(line)
    return out, verdicts


def times(r: float) -> str:
    return f"{r:.3f}x" if r < 1.1 else f"{r:.2f}x"  # three places where it is a close call


def extra(r: dict) -> int:
    return r["peak_growth"] - r["outputs"]


def shape_str(key) -> str:
    return f"({key[1]}, {key[2]}, {key[3]})"


def machine_lines(res: dict) -> list[str]:
    m, info = res["meta"]["machine"], res["meta"]["info"]
    o, t = info.get("ours", {}), info.get("torch", {})
    numpy_v = o.get("numpy") or t.get("numpy")
    return [
        f"- CPU: {m['cpu_model']}, {m['cpus']} CPUs; Linux {m['kernel']}",
        f"- Python {m['python']}, NumPy {numpy_v}, rnnfast {o.get('rnnfast')} "
        f"({o.get('threads')} threads, scratch cache limit "
        f"{o.get('scratch_cache_limit', 0) / MiB:.0f} MiB), torch {t.get('torch')} "
        f"({t.get('threads')} threads, mkldnn {t.get('mkldnn')})",
    ]


def shown_argv(argv: list[str]) -> list[str]:
    """The command line less the options that only say where results go."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a in ("--json", "--from-json"):
            skip = True
        elif a == "--write-results":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        elif not a.startswith(("--json=", "--from-json=", "--write-results=")):
            out.append(a)
    return out


def report(res: dict) -> str:
    meta = res["meta"]
    command = " ".join(["python bench/memory.py", *shown_argv(meta["argv"])])
    parts = [
        BEGIN,
        f"## Memory ({meta['date']})",
        "",
        f"`{command}`: {meta['elapsed_s']:.0f} s; float32; "
        "how each figure is measured: the docstring of bench/memory.py. MiB = 2^20 bytes.",
        "",
        *machine_lines(res),
        "",
    ]
    verdicts = []
    if res["reserve"] or res["rss"]:
        sec, v = reserve_section(res)
        parts += sec
        verdicts += v
    if res["infer"]:
        sec, v = infer_section(res)
        parts += sec
        verdicts += v
    parts += ["### Against the targets of issue 5", ""] + [f"- {v}" for v in verdicts]
    parts += ["", END]
    return "\n".join(parts)


def write_results(block: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# rnnfast benchmark results\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# ---- command line -------------------------------------------------------------------------------


def ints(n: int):
    def parse(s: str) -> tuple[int, ...]:
        v = tuple(int(p) for p in s.replace("x", ",").split(","))
        if len(v) != n:
            raise argparse.ArgumentTypeError(f"expected {n} integers, got {s!r}")
        return v

    return parse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    p.add_argument("--shapes", nargs="+", type=ints(3), default=list(SHAPES), metavar="N,T,H")
    p.add_argument("--rss-shape", type=ints(3), default=RSS_SHAPE, metavar="N,T,H")
    p.add_argument("--infer-cells", nargs="+", choices=CELLS, default=list(INFER_CELLS))
    p.add_argument("--infer-nh", nargs="+", type=ints(2), default=list(INFER_NH), metavar="N,H")
    p.add_argument("--infer-t", nargs="+", type=int, default=list(INFER_T), metavar="T")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nice", type=int, default=10, help="nice increment of the workers")
    p.add_argument(
        "--write-results", nargs="?", const=str(RESULTS_MD), default=None, metavar="PATH"
    )
    p.add_argument("--json", type=Path, default=None, help="also save the raw results here")
    p.add_argument("--from-json", type=Path, default=None, help="report on saved results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    res = json.loads(args.from_json.read_text()) if args.from_json else run_all(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    block = report(res)
    print(block)
    if args.write_results:
        write_results(block, Path(args.write_results))
        print(f"\nupdated {args.write_results}")


if __name__ == "__main__":
    main()
