"""The cell variants against their plain cells and their anchors, on the CPU.

Variants: the peephole LSTM, the coupled-gate LSTM (CIFG), the projected LSTM (P = H/4) and the
reset-before GRU, each beside the plain cell of the same shape; anchors in the same run:
torch.nn.LSTM(proj_size) (inference and training) for the projection, onnxruntime's LSTM and GRU
nodes (P, input_forget, linear_before_reset=0; inference) for the others. Each backend runs in
its own worker process; every round visits the cases in a fresh order and each case's backends
in a rotating order; the tables report minimum times. The sgemm ceiling of the BLAS rnnfast
links is measured in the same run.

    python bench/variants.py                          # the grid, 3 rounds (a few minutes)
    python bench/variants.py --shapes 1,100,256 --rounds 2 --quick
    python bench/variants.py --write-results          # ... and update bench/RESULTS.md

Results go to bench/out/variants-latest.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, parse_shape, thread_env, write_marked_block  # noqa: E402

OUT_DIR = HERE / "out"
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench/variants.py: begin -->", "<!-- bench/variants.py: end -->"
SHAPES = ((1, 100, 256), (4, 200, 256), (16, 50, 512), (64, 50, 512), (32, 100, 1024),
          (64, 25, 128))  # fmt: skip
# variant -> (the rnnfast cell, the plain cell it is compared with)
VARIANTS = {
    "lstm": ("lstm", "lstm"),
    "lstm-peephole": ("lstm", "lstm"),
    "lstm-cifg": ("lstm_cifg", "lstm"),
    "lstm-proj": ("lstm", "lstm"),
    "gru": ("gru", "gru"),
    "gru-reset-before": ("gru_reset_before", "gru"),
}
GATES = {"lstm": 4, "lstm_cifg": 3, "gru": 3, "gru_reset_before": 3}
# which anchor times each variant: torch has the projection and the plain cells, onnxruntime
# the plain cells, peepholes, CIFG and the reset-before GRU (inference only)
ANCHORS = {
    "torch": {"lstm", "lstm-proj", "gru"},
    "ort": {"lstm", "lstm-peephole", "lstm-cifg", "gru", "gru-reset-before"},
}
CHECK_TOL = 1e-3  # max abs error over max abs value against the float64 reference


@dataclass(frozen=True)
class Case:
    variant: str
    N: int
    T: int
    H: int  # C = H
    mode: str

    @property
    def cell(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def P(self) -> int:
        return self.H // 4 if self.variant == "lstm-proj" else 0

    @property
    def key(self) -> str:
        return f"{self.variant}/N{self.N}-T{self.T}-H{self.H}/{self.mode}"

    def flops(self) -> float:
        """GEMM FLOPs: input projection, recurrent product (and projection), x3 for training."""
        G, H, R = GATES[self.cell], self.H, self.P or self.H
        f = 2.0 * self.T * self.N * (G * H * (self.H + R) + (self.P * H if self.P else 0))
        return 3 * f if self.mode == "train" else f


def make_inputs(case: Case) -> dict:
    """float32 inputs: the same arrays in every worker. Weights U(+-1/sqrt(H)) as torch, x and
    dy standard normal, states N(0, 0.25), peepholes U(-0.5, 0.5)."""
    rng = np.random.default_rng(zlib.crc32(case.key.rsplit("/", 1)[0].encode()))
    G, H, N, T, P = GATES[case.cell], case.H, case.N, case.T, case.P
    R, k = P or H, 1 / np.sqrt(H)

    def u(*shape, scale=k):
        return rng.uniform(-scale, scale, shape).astype(np.float32)

    def n(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    lstm = case.cell.startswith("lstm")
    return {
        "x": n(T, N, H), "w_ih": u(G * H, H), "w_hh": u(G * H, R), "b_ih": u(G * H),
        "b_hh": u(G * H), "h0": n(N, R, scale=0.5), "c0": n(N, H, scale=0.5) if lstm else None,
        "w_peephole": u(3, H, scale=0.5) if case.variant == "lstm-peephole" else None,
        "w_hr": u(P, H) if P else None, "dy": n(T, N, R),
    }  # fmt: skip


# ---- the workers ------------------------------------------------------------------------------


class Ours:
    def __init__(self, threads, reference=False):
        import rnnfast

        rnnfast.set_num_threads(threads)
        self.api = rnnfast.reference if reference else rnnfast.ops
        build = {k: str(v) for k, v in rnnfast.build_info().items()}
        self.info = {"rnnfast": rnnfast.__version__, "build_info": build}

    def prepare(self, case: Case, dtype=np.float32):
        d = {k: None if v is None else v.astype(dtype) for k, v in make_inputs(case).items()}
        api, training = self.api, case.mode == "train"

        def forward():
            return api.forward(case.cell, d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                               d["h0"], d["c0"], training=training, w_peephole=d["w_peephole"],
                               w_hr=d["w_hr"])  # fmt: skip

        def run():
            *_, ctx = forward()
            if training:
                api.backward(ctx, d["dy"])

        def outputs():
            y, h_n, c_n, ctx = forward()
            out = {"y": y, "h_n": h_n, "c_n": c_n}
            if training:
                out |= {k: v for k, v in api.backward(ctx, d["dy"]).items() if k != "dx"}
                out["dx"] = api.backward(forward()[3], d["dy"])["dx"]
            return out

        return run, outputs


class Reference(Ours):
    def __init__(self, threads):
        super().__init__(threads, reference=True)

    def prepare(self, case: Case, dtype=np.float64):
        return super().prepare(case, dtype)


class Torch:
    def __init__(self, threads):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.info = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def prepare(self, case: Case):
        torch, d = self.torch, make_inputs(case)
        cls = torch.nn.GRU if case.cell == "gru" else torch.nn.LSTM
        kw = {"proj_size": case.P} if case.P else {}
        mod = cls(case.H, case.H, **kw)
        names = {"weight_ih_l0": "w_ih", "weight_hh_l0": "w_hh", "bias_ih_l0": "b_ih",
                 "bias_hh_l0": "b_hh", "weight_hr_l0": "w_hr"}  # fmt: skip
        with torch.no_grad():
            for p, k in names.items():
                if hasattr(mod, p):
                    getattr(mod, p).copy_(torch.from_numpy(d[k]))
        x = torch.from_numpy(d["x"])
        state = torch.from_numpy(d["h0"])[None]
        if case.cell == "lstm":
            state = (state, torch.from_numpy(d["c0"])[None])
        dy = torch.from_numpy(d["dy"])
        training = case.mode == "train"
        if training:
            x.requires_grad_(True)

        def forward():
            with torch.set_grad_enabled(training):
                return mod(x, state)

        def run():
            y, _ = forward()
            if training:
                mod.zero_grad(set_to_none=True)
                x.grad = None
                y.backward(dy)

        def outputs():
            y, s = forward()
            h, c = s if case.cell == "lstm" else (s, None)
            out = {"y": y.detach().numpy(), "h_n": h[0].detach().numpy(),
                   "c_n": None if c is None else c[0].detach().numpy()}  # fmt: skip
            if training:
                mod.zero_grad(set_to_none=True)
                x.grad = None
                y.backward(dy)
                out["dx"] = x.grad.numpy()
                out |= {"d" + k: getattr(mod, p).grad.numpy() for p, k in names.items()
                        if hasattr(mod, p)}  # fmt: skip
            return out

        return run, outputs


class Ort:
    # ONNX gate order: LSTM i, o, f, c (ours i, f, g, o; coupled i, g, o), GRU z, r, h
    BLOCKS = {"lstm": [0, 3, 1, 2], "lstm_cifg": [0, 2, 1, 1], "gru": [1, 0, 2],
              "gru_reset_before": [1, 0, 2]}  # fmt: skip

    def __init__(self, threads):
        import onnx
        import onnxruntime

        self.ort, self.onnx, self.threads = onnxruntime, onnx, threads
        self.info = {"onnxruntime": onnxruntime.__version__, "intra_op_threads": threads}

    def prepare(self, case: Case):
        if case.mode != "infer":
            raise NotImplementedError("onnxruntime is timed for inference only")
        from onnx import TensorProto, helper, numpy_helper

        d, H, cell = make_inputs(case), case.H, case.cell

        def onnx_order(a):  # CIFG: the unused f block is a copy of g, which input_forget ignores
            return np.concatenate([a[b * H : (b + 1) * H] for b in self.BLOCKS[cell]])[None]

        bias = np.concatenate([onnx_order(d["b_ih"]), onnx_order(d["b_hh"])], axis=1)
        inits = {"W": onnx_order(d["w_ih"]), "R": onnx_order(d["w_hh"]), "B": bias}
        lstm = cell.startswith("lstm")
        attrs = {"hidden_size": H}
        ins = ["X", "W", "R", "B", "", "initial_h"]
        outs = ["Y", "Y_h"]
        feeds = {"X": d["x"], "initial_h": d["h0"][None]}
        if lstm:
            ins += ["initial_c", "P" if d["w_peephole"] is not None else ""]
            outs.append("Y_c")
            feeds["initial_c"] = d["c0"][None]
            attrs["input_forget"] = int(cell == "lstm_cifg")
            if d["w_peephole"] is not None:
                inits["P"] = d["w_peephole"][[0, 2, 1]].reshape(1, -1)
        else:
            attrs["linear_before_reset"] = int(cell == "gru")
        node = helper.make_node("LSTM" if lstm else "GRU", ins, outs, **attrs)
        f32 = TensorProto.FLOAT
        graph = helper.make_graph(
            [node], "variant",
            [helper.make_tensor_value_info(k, f32, v.shape) for k, v in feeds.items()],
            [helper.make_tensor_value_info(k, f32, None) for k in outs],
            [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        so = self.ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        sess = self.ort.InferenceSession(model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])  # fmt: skip

        def run():
            return sess.run(None, feeds)

        def outputs():
            res = run()
            return {"y": res[0][:, 0], "h_n": res[1][0], "c_n": res[2][0] if lstm else None}

        return run, outputs


class Gemm:
    """The sgemm ceiling of scipy-openblas32, the BLAS rnnfast links (bench/_workers.py)."""

    def __init__(self, threads):
        from _workers import GemmBackend

        self.backend = GemmBackend(threads)
        self.info = self.backend.info()

    def prepare(self, case):
        return self.backend.prepare_gemm({"lib": "openblas32", "op": "nn", "M": 2048, "N": 2048,
                                          "K": 2048}), None  # fmt: skip


BACKENDS = {"ours": Ours, "torch": Torch, "ort": Ort, "ref": Reference, "gemm": Gemm}


def time_calls(fn, target_s, max_calls=40):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < target_s and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def worker(name: str, threads: int) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    backend, prepared = BACKENDS[name](threads), {}
    proto.write(json.dumps({"info": backend.info}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            case = Case(**req["case"]) if req["case"] else None
            key = json.dumps(req["case"])
            if key not in prepared:
                prepared[key] = backend.prepare(case)
            run, outputs = prepared[key]
            if req["op"] == "time":
                reply = {"times": time_calls(run, req["target_s"])}
            else:
                np.savez(req["path"], **{k: v for k, v in outputs().items() if v is not None})
                reply = {"saved": req["path"]}
        except Exception as e:  # the driver reports it and goes on
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")


class Worker:
    def __init__(self, name: str, threads: int):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=thread_env(threads),
        )  # fmt: skip
        self.info = self._read()["info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (rc {self.proc.poll()})")
        return json.loads(line)

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---- the driver -------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) if a.shape == b.shape \
        else math.inf  # fmt: skip


def backends_of(case: Case) -> list[str]:
    names = ["ours"]
    if case.variant in ANCHORS["torch"]:
        names.append("torch")
    if case.variant in ANCHORS["ort"] and case.mode == "infer":
        names.append("ort")
    return names


def run(args) -> dict:
    cases = [Case(v, n, t, h, m) for m in args.modes for v in args.variants
             for (n, t, h) in args.shapes]  # fmt: skip
    names = sorted({b for c in cases for b in backends_of(c)}) + ["gemm"]
    workers = {b: Worker(b, args.threads) for b in names}
    check_dir = OUT_DIR / "variants-check"
    check_dir.mkdir(parents=True, exist_ok=True)
    checks = {}
    if args.check:
        ref = Worker("ref", args.threads)
        for c in cases:
            if c.flops() > 2e9:
                continue
            want = check_dir / f"{c.key.replace('/', '_')}-ref.npz"
            ref.request(op="save", case=asdict(c), path=str(want))
            for b in backends_of(c):
                got = check_dir / f"{c.key.replace('/', '_')}-{b}.npz"
                r = workers[b].request(op="save", case=asdict(c), path=str(got))
                if "error" in r:
                    checks[(c.key, b)] = r["error"]
                    continue
                with np.load(got) as g, np.load(want) as w:
                    checks[(c.key, b)] = max(rel_err(g[k], w[k]) for k in g.files if k in w.files)
        ref.close()
    times: dict = {}
    rng = random.Random(0)
    start = time.time()
    for r in range(args.rounds):
        order = cases[:]
        rng.shuffle(order)
        for i, c in enumerate(order):
            bs = backends_of(c)
            bs = bs[i % len(bs) :] + bs[: i % len(bs)]  # rotate who goes first
            for b in bs:
                reply = workers[b].request(op="time", case=asdict(c), target_s=args.target)
                if "error" in reply:
                    times.setdefault((c.key, b), []).append(math.nan)
                    print(f"{c.key} {b}: {reply['error']}", file=sys.stderr)
                else:
                    times.setdefault((c.key, b), []).extend(reply["times"])
        gemm = workers["gemm"].request(op="time", case=None, target_s=0.5)["times"]
        times.setdefault(("gemm", "gemm"), []).extend(gemm)
        print(f"round {r + 1}/{args.rounds} done at {time.time() - start:.0f} s", file=sys.stderr)
    info = {b: w.info for b, w in workers.items()}
    for w in workers.values():
        w.close()
    ceiling = 2 * 2048**3 / min(times[("gemm", "gemm")]) / 1e9
    rows = []
    for c in cases:
        row = {"case": asdict(c), "key": c.key, "gflop": c.flops() / 1e9}
        for b in backends_of(c):
            t = [x for x in times.get((c.key, b), []) if not math.isnan(x)]
            row[b] = {"min_ms": 1e3 * min(t), "median_ms": 1e3 * float(np.median(t)),
                      "n": len(t)} if t else None  # fmt: skip
            if (c.key, b) in checks:
                row[b + "_check"] = checks[(c.key, b)]
        rows.append(row)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "threads": args.threads, "rounds": args.rounds,
            "ceiling_gflops": ceiling, "backends": info, "rows": rows}  # fmt: skip


def tables(res: dict) -> list[str]:
    by_key = {r["key"]: r for r in res["rows"]}
    ceiling = res["ceiling_gflops"]
    m = res["machine"]
    out = [f"{res['date']}, `lscpu` model name \"{m['cpu_model']}\" ({m['cpu_family_model']}), "
           f"{res['threads']} threads, {res['rounds']} rounds, minimum times; sgemm ceiling "
           f"{ceiling:.0f} GFLOP/s (scipy-openblas32 2048^3, same run).", ""]  # fmt: skip
    out += ["| variant | (N, T, C=H) | mode | variant ms | plain cell ms | variant / plain | "
            "% of ceiling | anchor | anchor ms | anchor / ours |",
            "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for r in res["rows"]:
        c = r["case"]
        if r.get("ours") is None:
            continue
        plain_variant = "lstm" if c["variant"].startswith("lstm") else "gru"
        plain = by_key.get(r["key"].replace(c["variant"], plain_variant, 1))
        ours = r["ours"]["min_ms"]
        pct = 100 * r["gflop"] / (ours / 1e3) / ceiling
        base = plain["ours"]["min_ms"] if plain and plain.get("ours") else math.nan
        for anchor in [b for b in ("torch", "ort") if r.get(b)] or [None]:
            a = r[anchor]["min_ms"] if anchor else math.nan
            label = {"torch": "torch.nn", "ort": "onnxruntime", None: "-"}[anchor]
            flag = ""
            if anchor and isinstance(r.get(anchor + "_check"), float) and \
                    r[anchor + "_check"] > CHECK_TOL:  # fmt: skip
                flag = " (disagrees)"
            out.append(f"| {c['variant']} | ({c['N']}, {c['T']}, {c['H']}) | {c['mode']} | "
                       f"{ours:.3g} | {base:.3g} | {ours / base:.2f}x | {pct:.0f}% | {label}{flag}"
                       f" | {a:.3g} | {a / ours:.2f}x |")  # fmt: skip
    bad = [f"{k} {b}: {v}" for r in res["rows"] for b in ("ours", "torch", "ort")
           for k, v in [(r["key"], r.get(b + "_check"))]
           if v is not None and (not isinstance(v, float) or v > CHECK_TOL)]  # fmt: skip
    out += ["", "Every backend's outputs and gradients agree with the float64 NumPy reference "
            f"to {CHECK_TOL:g} (max abs error over max abs value) on the cases checked"
            + (": except " + "; ".join(bad) if bad else ".")]  # fmt: skip
    return out


def write_results(res: dict) -> None:
    write_marked_block(
        RESULTS_MD, BEGIN, END, "### bench/variants.py: the cell variants", tables(res)
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES))
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target", type=float, default=0.25, help="seconds of calls per case/round")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--from-json", type=Path)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.threads)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        res = run(args)
        OUT_DIR.mkdir(exist_ok=True)
        (OUT_DIR / "variants-latest.json").write_text(json.dumps(res, indent=1))
    print("\n".join(tables(res)))
    if args.write_results:
        write_results(res)


if __name__ == "__main__":
    main()
