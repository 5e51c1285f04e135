"""Layer norm, recurrent dropout and zoneout inside the fused step: what each costs against the
plain cell, and against torch.

Cases: the LSTM, the GRU and the tanh RNN, each plain, with layer norm (LSTM and GRU: both
products and the LSTM's c), with zoneout 0.1, with recurrent dropout 0.25 on the candidate
(Semeniuta; LSTM and GRU), and with variational recurrent dropout 0.25 (Gal and Ghahramani), at
every shape, training step (forward + every gradient) and inference. The anchor is the same
computation written with torch the way its users must (torch.nn has none of them in its fused
cells): matmuls, torch.nn.functional.layer_norm and the gate math in a Python loop over time,
masks drawn per step, autograd for the backward, 2 threads; timed for training at batch <= 16.

Each backend runs in its own worker process; every round visits the cases in a fresh order and
each case's backends in a rotating order; the tables report minimum times.

    python bench/cell_options.py                  # the grid, 3 rounds (several minutes)
    python bench/cell_options.py --shapes 16,50,512 --rounds 2 --options plain layer_norm
    python bench/cell_options.py --write-results  # ... and update bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, parse_shape, thread_env, write_marked_block  # noqa: E402

OUT_DIR = HERE / "out"
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench/cell_options.py: begin -->", "<!-- bench/cell_options.py: end -->"
SHAPES = ((1, 100, 256), (4, 200, 256), (16, 50, 512), (64, 50, 512), (64, 25, 128))
CELLS = {"lstm": 4, "gru": 3, "rnn_tanh": 1}
OPTIONS = {
    "plain": {},
    "layer_norm": {"layer_norm": True},
    "zoneout": {"zoneout": 0.1},
    "semeniuta": {"recurrent_dropout": 0.25, "recurrent_dropout_mode": "semeniuta"},
    "variational": {"recurrent_dropout": 0.25, "recurrent_dropout_mode": "variational"},
}
TORCH_MAX_BATCH = 16


@dataclass(frozen=True)
class Case:
    cell: str
    option: str
    N: int
    T: int
    H: int
    mode: str

    @property
    def key(self) -> str:
        return f"{self.cell}-{self.option}/N{self.N}-T{self.T}-H{self.H}/{self.mode}"

    def flops(self) -> float:
        f = 2.0 * self.T * self.N * CELLS[self.cell] * self.H * 2 * self.H
        return 3 * f if self.mode == "train" else f


def make_inputs(case: Case) -> dict:
    rng = np.random.default_rng(zlib.crc32(f"{case.cell}{case.N}{case.T}{case.H}".encode()))
    G, H, N, T, k = CELLS[case.cell], case.H, case.N, case.T, 1 / np.sqrt(case.H)

    def u(*shape):
        return rng.uniform(-k, k, shape).astype(np.float32)

    def near(center, *shape):  # layer norm's gains and bias, near where training starts them
        return (center + rng.uniform(-0.1, 0.1, shape)).astype(np.float32)

    return {"x": rng.standard_normal((T, N, H)).astype(np.float32), "w_ih": u(G * H, H),
            "w_hh": u(G * H, H), "b_ih": u(G * H), "b_hh": u(G * H),
            "dy": rng.standard_normal((T, N, H)).astype(np.float32),
            "ln_gamma_ih": near(1, G * H), "ln_gamma_hh": near(1, G * H),
            "ln_gamma_c": near(1, H), "ln_beta_c": near(0, H)}  # fmt: skip


def kernel_options(case: Case, d: dict) -> dict:
    """What ops.forward takes for the case's option."""
    opt = dict(OPTIONS[case.option])
    if opt.pop("layer_norm", False):
        names = ("ln_gamma_ih", "ln_gamma_hh") + (("ln_gamma_c", "ln_beta_c")
                                                   if case.cell == "lstm" else ())  # fmt: skip
        return {k: d[k] for k in names}
    return dict(opt, seed=1) if opt else {}


# ---- the workers ------------------------------------------------------------------------------


class Ours:
    def __init__(self, threads):
        import rnnfast

        rnnfast.set_num_threads(threads)
        self.ops = rnnfast.ops
        build = {k: str(v) for k, v in rnnfast.build_info().items()}
        self.info = {"rnnfast": rnnfast.__version__, "build_info": build}

    def prepare(self, case: Case):
        d, ops, training = make_inputs(case), self.ops, case.mode == "train"
        options = kernel_options(case, d)

        def run():
            *_, ctx = ops.forward(case.cell, d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                                  training=training, **options)  # fmt: skip
            if training:
                ops.backward(ctx, d["dy"])

        return run


class TorchLoop:
    """The computation in torch, as a user writes it without a fused kernel."""

    def __init__(self, threads):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.info = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    def prepare(self, case: Case):
        if case.mode != "train" or case.N > TORCH_MAX_BATCH:
            raise NotImplementedError("the torch loop is timed for training at batch <= 16")
        torch, d = self.torch, make_inputs(case)
        w = {k: torch.from_numpy(d[k]).requires_grad_(True) for k in
             ("w_ih", "w_hh", "b_ih", "b_hh", "ln_gamma_ih", "ln_gamma_hh", "ln_gamma_c",
              "ln_beta_c")}  # fmt: skip
        x, dy = torch.from_numpy(d["x"]).requires_grad_(True), torch.from_numpy(d["dy"])
        opt = OPTIONS[case.option]
        p_drop, p_zone = opt.get("recurrent_dropout", 0.0), opt.get("zoneout", 0.0)
        mode = opt.get("recurrent_dropout_mode")
        ln = opt.get("layer_norm", False)
        F = torch.nn.functional
        T, N, H, cell = case.T, case.N, case.H, case.cell
        gen = torch.Generator().manual_seed(0)

        def keep(p):
            return (torch.rand((N, H), generator=gen) >= p).float() / (1 - p)

        def run():
            h = torch.zeros(N, H)
            c = torch.zeros(N, H)
            v = keep(p_drop) if mode == "variational" else None
            gx = x @ w["w_ih"].T  # every step's input projection at once
            if ln:
                gx = F.layer_norm(gx, gx.shape[-1:], w["ln_gamma_ih"], eps=1e-5)
            gx = gx + w["b_ih"]
            ys = []
            for t in range(T):
                gh = (h if v is None else h * v) @ w["w_hh"].T
                if ln:
                    gh = F.layer_norm(gh, gh.shape[-1:], w["ln_gamma_hh"], eps=1e-5)
                gh = gh + w["b_hh"]
                d_c = keep(p_drop) if mode == "semeniuta" else 1.0
                if cell == "lstm":
                    i, f, g, o = (gx[t] + gh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g) * d_c
                    c_out = c
                    if ln:
                        c_out = F.layer_norm(c, (H,), w["ln_gamma_c"], w["ln_beta_c"], eps=1e-5)
                    new = torch.sigmoid(o) * torch.tanh(c_out)
                elif cell == "gru":
                    xr, xz, xn = gx[t].chunk(3, 1)
                    hr, hz, hn = gh.chunk(3, 1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    new = (1 - z) * torch.tanh(xn + r * hn) * d_c + z * h
                else:
                    new = torch.tanh(gx[t] + gh)
                if p_zone:
                    take = torch.rand((N, H), generator=gen) >= p_zone
                    new = torch.where(take, new, h)
                h = new
                ys.append(h)
            y = torch.stack(ys)
            for t in (x, *w.values()):
                t.grad = None
            y.backward(dy)

        return run


BACKENDS = {"ours": Ours, "torch": TorchLoop}


def time_calls(fn, target_s, max_calls=40):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 2 or (time.perf_counter() - start < target_s and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def worker(name, threads, conn):
    backend = BACKENDS[name](threads)
    conn.send(backend.info)
    prepared = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        case, target = msg
        try:
            if case.key not in prepared:
                prepared[case.key] = backend.prepare(case)
            conn.send(time_calls(prepared[case.key], target))
        except NotImplementedError:
            conn.send(None)


# ---- the driver -------------------------------------------------------------------------------


def run(args) -> dict:
    cases = [Case(cell, option, N, T, H, mode)
             for cell in args.cells for option in OPTIONS for (N, T, H) in args.shapes
             for mode in args.modes
             if (option in args.options or option == "plain")  # the ratios' denominator
             and not (cell == "rnn_tanh" and option in ("semeniuta", "layer_norm"))]  # fmt: skip
    ctx = mp.get_context("spawn")
    workers, info = {}, {}
    saved = dict(os.environ)
    os.environ.update(thread_env(args.threads))  # the spawned workers inherit it
    try:
        for name in BACKENDS:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(name, args.threads, child), daemon=True)
            proc.start()
            workers[name] = (proc, parent)
            info[name] = parent.recv()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    times: dict = {}
    rng = random.Random(0)
    try:
        for r in range(args.rounds):
            t0 = time.time()
            order = cases[:]
            rng.shuffle(order)
            for i, case in enumerate(order):
                names = list(BACKENDS)
                names = names[i % len(names) :] + names[: i % len(names)]
                for name in names:
                    if name == "torch" and (case.mode != "train" or case.N > TORCH_MAX_BATCH):
                        continue
                    workers[name][1].send((case, args.target))
                    got = workers[name][1].recv()
                    if got is not None:
                        times.setdefault(name, {}).setdefault(case.key, []).extend(got)
            print(f"[round {r + 1}/{args.rounds}] {time.time() - t0:.0f} s", flush=True)
    finally:
        for proc, conn in workers.values():
            conn.send(None)
            proc.join(timeout=10)
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
            "threads": args.threads, "rounds": args.rounds, "info": info,
            "cases": [case.__dict__ for case in cases],
            "min_s": {n: {k: min(v) for k, v in t.items()} for n, t in times.items()}}  # fmt: skip


def tables(res: dict) -> list[str]:
    m = res["machine"]
    ours, torch = res["min_s"].get("ours", {}), res["min_s"].get("torch", {})
    head = (
        f'{res["when"]}, `lscpu` model name "{m.get("cpu_model", "?")}" '
        f"({m.get('cpu_family_model', '?')}), {res['threads']} threads, {res['rounds']} "
        "rounds, minimum times. Option / plain: the option's time over the plain cell's in "
        "the same run (targets: layer norm <= 1.35x, the others <= 1.10x); torch loop / ours: "
        "the same computation in a torch Python loop with autograd, over ours (target >= 5x at "
        "batch <= 16, training)."
    )
    lines = [head, "",
             "| cell | option | (N, T, H) | mode | ours ms | plain ms | option / plain | "
             "GFLOP/s | torch loop ms | torch loop / ours |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for c in res["cases"]:
        case = Case(**c)
        t = ours.get(case.key)
        if t is None:
            continue
        plain = ours.get(Case(case.cell, "plain", case.N, case.T, case.H, case.mode).key)
        anchor = torch.get(case.key)
        gflops = case.flops() / t / 1e9
        lines.append(
            f"| {case.cell} | {case.option} | ({case.N}, {case.T}, {case.H}) | {case.mode} | "
            f"{t * 1e3:.3g} | {plain * 1e3:.3g} | {t / plain:.2f}x | {gflops:.0f} | "
            + (f"{anchor * 1e3:.3g} | {anchor / t:.1f}x |" if anchor else "- | - |")
        )
    return lines


def write_results(res: dict) -> None:
    write_marked_block(
        RESULTS_MD,
        BEGIN,
        END,
        "### bench/cell_options.py: layer norm, recurrent dropout and zoneout",
        tables(res),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES))
    p.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["train", "infer"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target", type=float, default=0.25, help="seconds of calls per case/round")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--from-json", type=Path)
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        res = run(args)
        OUT_DIR.mkdir(exist_ok=True)
        (OUT_DIR / "cell_options-latest.json").write_text(json.dumps(res, indent=1))
    print("\n".join(tables(res)))
    if args.write_results:
        write_results(res)


if __name__ == "__main__":
    main()
