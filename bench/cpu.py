"""CPU benchmark of rnnfast against torch.nn, onnxruntime, the NumPy reference and the GEMM ceiling.

Each backend runs in its own long-lived worker process (bench/_workers.py) with the same thread
count; the driver interleaves them: every round visits the cases in a fresh order and, per case,
every backend in a rotating order, so that this machine's slow swings hit all backends alike.
Per-call times are kept; the tables report the minimum and the median of each (backend, case).

    python bench/cpu.py                        # the whole grid, 5 rounds (about 10 minutes)
    python bench/cpu.py --quick                # a smoke run of a few seconds
    python bench/cpu.py --cells lstm --shapes 1,100,256 64,50,512 --modes infer --rounds 3
    python bench/cpu.py --write-results        # ... and update bench/RESULTS.md
    python bench/cpu.py --threads 1 --write-results   # the 1-thread block (robust when busy)
    python bench/cpu.py --from-json bench/out/cpu-latest.json --write-results   # no re-run

Results go to bench/out/cpu-<date>.json and .png (and cpu-latest.*).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BACKENDS,
    CELLS,
    MODES,
    SHAPES,
    Case,
    machine_info,
    parse_shape,
    summarize,
    thread_env,
)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_workers.py"
OUT_DIR = HERE / "out"
RESULTS_MD = HERE / "RESULTS.md"
# RESULTS.md keeps one block per thread count, between these markers
BEGIN, END = "<!-- bench/cpu.py threads={}: begin -->", "<!-- bench/cpu.py threads={}: end -->"
# above this share of the CPUs used by other processes, a run is flagged as unreliable
BUSY = 0.3

# the GEMM ceiling: big sgemms through scipy-openblas32 (the BLAS rnnfast links), the shapes of
# the largest grid case's input projection (nt) and weight gradient (tn), and a square one;
# NumPy's own BLAS on the square shape is recorded for comparison only
GEMMS = (
    {"lib": "openblas32", "op": "nn", "M": 2048, "N": 2048, "K": 2048},
    {"lib": "openblas32", "op": "nt", "M": 3200, "N": 4096, "K": 1024},
    {"lib": "openblas32", "op": "tn", "M": 4096, "N": 1024, "K": 3200},
    {"lib": "numpy", "op": "nn", "M": 2048, "N": 2048, "K": 2048},
)
QUICK_GEMMS = ({"lib": "openblas32", "op": "nn", "M": 1024, "N": 1024, "K": 1024},)
# agreement with torch.nn (max abs error over max abs value) above which a backend is flagged;
# onnxruntime is not timed at all on a case where it disagrees (the graph would be wrong)
CHECK_TOL = 1e-3
# the bfloat16 products round each operand to 8 significant bits: their error is reported, and
# flagged above this
BF16_CHECK_TOL = 3e-2

BACKEND_LABEL = {
    "ours": "rnnfast",
    "base": "rnnfast, the --baseline build",
    "ours-bf16": "rnnfast bfloat16",
    "torch-bf16": "torch.nn autocast bfloat16",
    "torch": "torch.nn",
    "ort": "onnxruntime",
    "ref": "NumPy reference",
}


# ---- workers ----------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class Worker:
    """One backend's process; request() sends a JSON line and waits for the reply."""

    def __init__(self, name: str, threads: int, log_dir: Path, baseline: Path | None = None):
        # "gemm:<core>" is the GEMM worker with OpenBLAS forced to another kernel set
        self.name = name
        backend, _, core = name.partition(":")
        env = thread_env(threads)
        if core:
            env["OPENBLAS_CORETYPE"] = core
        if backend == "base":
            env["RNNFAST_BENCH_BASELINE"] = str(baseline)
        self.log_path = log_dir / f"worker-{name.replace(':', '-')}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), backend, str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(HERE),
        )

    def request(self, **req) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.log.flush()
            tail = self.log_path.read_text()[-2000:]
            raise WorkerError(f"worker {self.name} died (rc={self.proc.poll()}):\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request(op="quit")
            except WorkerError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---- the run ----------------------------------------------------------------------------------


def build_cases(args) -> list[Case]:
    return [
        Case(cell, n, t, h, mode)
        for mode in args.modes
        for cell in args.cells
        for (n, t, h) in args.shapes
    ]


def supports(backend: str, case: Case, args) -> bool:
    if backend == "ort":
        return case.mode == "infer"
    if backend == "ref":
        return case.flops() <= args.ref_max_gflop * 1e9
    return True


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def compare(path: Path, anchor_path: Path) -> dict:
    with np.load(path) as got, np.load(anchor_path) as want:
        return {k: rel_err(got[k], want[k]) for k in want.files if k in got.files}


class CpuMeter:
    """CPU time used on the machine outside the benchmark's own processes (other users' load).

    busy = every CPU's non-idle time from /proc/stat; ours = utime + stime of the driver and its
    workers from /proc/<pid>/stat. foreign = busy - ours, as a fraction of wall time x CPUs;
    steal (time the hypervisor gave to other guests) is reported apart.
    """

    def __init__(self, pids):
        self.pids = list(pids)
        self.tick = os.sysconf("SC_CLK_TCK")
        self.last = self.snapshot()

    def snapshot(self):
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
        steal = v[7] if len(v) > 7 else 0
        ours = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return time.time(), busy, steal, ours

    def load(self, a, b) -> dict:
        """Foreign and steal fractions between two snapshots."""
        if a is None or b is None:
            return {"foreign": 0.0, "steal": 0.0}
        (t0, b0, s0, o0), (t1, b1, s1, o1) = a, b
        cap = max(t1 - t0, 1e-9) * (os.cpu_count() or 1) * self.tick
        return {"foreign": max(b1 - b0 - (o1 - o0), 0) / cap, "steal": (s1 - s0) / cap}

    def lap(self) -> dict:
        now = self.snapshot()
        d = self.load(self.last, now)
        self.last = now
        return d


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmark(args) -> dict:
    cases = build_cases(args)
    gemms = QUICK_GEMMS if args.quick else GEMMS
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    started = time.time()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:],
        "threads": args.threads,
        "rounds": args.rounds,
        "target_s": args.target,
        "settle_s": args.settle,
        "quiet": args.quiet,
        "nice": args.nice,
        "machine": machine_info(),
        "backends": {},
        "notes": [],
        "loadavg": [],
    }
    names = list(dict.fromkeys(list(args.backends) + ["gemm"]))
    if args.baseline:
        names.insert(names.index("ours") + 1 if "ours" in names else 0, "base")
    cores = args.gemm_cores
    if cores is None:
        cores = ["SkylakeX"] if "avx512f" in machine_info()["isa"] else []
    names += [f"gemm:{core}" for core in cores]
    workers: dict[str, Worker] = {}
    for name in names:
        w = Worker(name, args.threads, OUT_DIR, args.baseline)
        try:
            rep = w.request(op="init")
        except WorkerError as e:
            rep = {"ok": False, "error": str(e)}
        if rep["ok"]:
            workers[name] = w
            meta["backends"][name] = rep["info"]
            log(f"[init] {name}: {rep['info']}")
        else:
            w.close()
            meta["notes"].append(f"backend {name} unavailable: {rep['error'].splitlines()[-1]}")
            log(f"[init] {name} UNAVAILABLE: {rep['error']}")

    store = {
        b: {c.key: {"times": [], "quiet": [], "round_min": [], "foreign": []} for c in cases}
        for b in workers
    }
    errors: dict[str, dict[str, str]] = {b: {} for b in workers}
    checks: dict[str, dict[str, dict]] = {b: {} for b in workers}
    estimate: dict[tuple[str, str], float] = {}
    gemm_jobs = [
        (w, g)
        for w in workers
        if w.startswith("gemm")
        for g in gemms
        if w == "gemm" or g["lib"] == "openblas32"
    ]
    gemm_store = {(w, json.dumps(g, sort_keys=True)): [] for w, g in gemm_jobs}

    def active(b: str, c: Case) -> bool:
        return b in workers and supports(b, c, args) and c.key not in errors[b]

    last = [None]
    wait_left = [args.max_wait_total]
    meter = CpuMeter([os.getpid()] + [w.proc.pid for w in workers.values()])

    misses = [0]  # gates in a row that found no quiet

    def gate(b: str, max_wait: float | None = None) -> None:
        """Pause before timing: let the previous worker's spinning BLAS/OpenMP threads go to
        sleep, and wait (within limits) until other processes leave the CPUs alone. After 5
        fruitless waits in a row the machine is taken to be busy for good: no more waiting
        until a pause finds it quiet again."""
        max_wait = args.max_wait if max_wait is None else max_wait
        if misses[0] >= 5:
            max_wait = 0.0
        t0 = time.time()
        a = meter.snapshot()
        time.sleep(args.settle if last[0] != b else 0.1)
        last[0] = b
        while meter.load(a, meter.snapshot())["foreign"] > args.quiet:
            if time.time() - t0 > max_wait or wait_left[0] <= 0:
                misses[0] += 1
                return
            a = meter.snapshot()
            time.sleep(0.1)
            wait_left[0] -= 0.1
        misses[0] = 0

    # warm-up, and once per case a numerical check of every backend against torch.nn
    tmp = Path(tempfile.mkdtemp(prefix="rnnfast-bench-"))
    try:
        for c in cases:
            for b in [b for b in workers if not b.startswith("gemm")]:
                if not active(b, c):
                    continue
                path = tmp / f"{b}-{c.key.replace('/', '_')}.npz"
                rep = workers[b].request(op="check", case=c.to_dict(), path=str(path))
                if not rep["ok"]:
                    errors[b][c.key] = rep["error"]
                    log(f"[check] {b} {c.key}: ERROR {rep['error']}")
                    continue
                estimate[(b, c.key)] = rep["seconds"]
            anchor = tmp / f"torch-{c.key.replace('/', '_')}.npz"
            for b in workers:
                if b == "torch" or b.startswith("gemm") or not active(b, c) or not anchor.exists():
                    continue
                if args.check:
                    err = compare(tmp / f"{b}-{c.key.replace('/', '_')}.npz", anchor)
                    checks[b][c.key] = err
                    worst = max(err.values(), default=0.0)
                    tol = BF16_CHECK_TOL if b.endswith("-bf16") else CHECK_TOL
                    flag = "" if worst <= tol else "  <-- MISMATCH"
                    log(f"[check] {b:5s} {c.key:32s} max rel err vs torch {worst:.2e}{flag}")
                    if b == "ort" and worst > CHECK_TOL:
                        errors[b][c.key] = f"outputs differ from torch.nn (rel err {worst:.2e})"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for w, g in gemm_jobs:  # warm the GEMM workers once
        workers[w].request(op="time", case=g, target_s=0, min_calls=1, max_calls=1, warm=0)

    def measure(b: str, c: Case, label: str, max_wait: float | None = None) -> None:
        """One timed request: a few calls of backend b on case c, with the load around them."""
        if not active(b, c):
            return
        gate(b, max_wait)
        # one untimed call first where it is cheap: the first call after a switch of
        # process pays for cold caches and sleeping thread pools
        est = estimate.get((b, c.key), 1.0)
        if b == "ref":
            req = dict(target_s=0.0, min_calls=1, max_calls=1, warm=0)
        else:
            req = dict(
                target_s=args.target,
                min_calls=args.min_calls,
                max_calls=args.max_calls,
                warm=1 if est < 0.25 else 0,
            )
        a = meter.snapshot()
        rep = workers[b].request(op="time", case=c.to_dict(), **req)
        foreign = meter.load(a, meter.snapshot())["foreign"]
        if not rep["ok"]:
            errors[b][c.key] = rep["error"]
            log(f"[{label}] {b} {c.key}: ERROR {rep['error']}")
            return
        s = store[b][c.key]
        s["times"].extend(rep["times"])
        s["round_min"].append(min(rep["times"]))
        s["foreign"].append(round(foreign, 3))
        if foreign <= args.quiet:
            s["quiet"].extend(rep["times"])
        estimate[(b, c.key)] = min(rep["times"])

    rng = random.Random(args.seed)
    bench_backends = [b for b in workers if not b.startswith("gemm")]
    meta["cpu_load"] = []
    for r in range(args.rounds):
        t_round = time.time()
        meta["loadavg"].append(os.getloadavg()[0])
        meter.lap()
        for w, g in gemm_jobs:
            gate(w)
            rep = workers[w].request(
                op="time", case=g, target_s=args.target, min_calls=2, max_calls=20, warm=0
            )
            gemm_store[(w, json.dumps(g, sort_keys=True))].extend(rep["times"])
        order = cases[:]
        rng.shuffle(order)
        for c in order:
            k = r % max(len(bench_backends), 1)
            for b in bench_backends[k:] + bench_backends[:k]:
                measure(b, c, f"round {r + 1}")
        elapsed = time.time() - started
        load = meter.lap()
        meta["cpu_load"].append(load)
        log(
            f"[round {r + 1}/{args.rounds}] {time.time() - t_round:.0f} s "
            f"(total {elapsed:.0f} s; loadavg {meta['loadavg'][-1]:.2f}; other processes used "
            f"{100 * load.get('foreign', 0):.0f}% of the CPUs, "
            f"steal {100 * load.get('steal', 0):.0f}%; "
            f"{args.max_wait_total - wait_left[0]:.0f} s spent waiting for quiet)"
        )
        meta["rounds_done"] = r + 1
        # stop early rather than overrun the time budget (a loaded machine is slow)
        if r + 1 < args.rounds and elapsed + (time.time() - t_round) > args.time_budget:
            meta["notes"].append(
                f"stopped after {r + 1} of {args.rounds} rounds to stay within the "
                f"{args.time_budget:.0f} s time budget"
            )
            log(f"[budget] stopping after {r + 1} rounds")
            break
    meta["quiet_wait_s"] = args.max_wait_total - wait_left[0]

    # cases where some backend never got a quiet measurement: measure all their backends again
    # (so that the comparison stays local in time), waiting longer for quiet, within a budget
    t_retry, retried = time.time(), 0
    for c in cases if misses[0] < 5 else []:  # pointless while the machine stays busy
        if time.time() - t_retry > args.retry_budget or time.time() - started > args.time_budget:
            break
        if all(
            any(f <= args.quiet for f in store[b][c.key]["foreign"])
            for b in bench_backends
            if active(b, c)
        ):
            continue
        retried += 1
        wait_left[0] = max(wait_left[0], args.retry_wait)
        for b in bench_backends:
            measure(b, c, "retry", max_wait=args.retry_wait)
    meta["retried_cases"] = retried
    if retried:
        log(f"[retry] measured {retried} cases again in {time.time() - t_retry:.0f} s")

    for w in workers.values():
        w.close()
    meta["elapsed_s"] = time.time() - started

    # the ceiling: the best sgemm rate of the run through the BLAS rnnfast links
    entries = []
    default_core = meta["backends"].get("gemm", {}).get("openblas32_core", "?")
    for w, g in gemm_jobs:
        s = summarize(gemm_store[(w, json.dumps(g, sort_keys=True))])
        flops = 2.0 * g["M"] * g["N"] * g["K"]
        core = w.partition(":")[2] or default_core
        lib = g["lib"] if g["lib"] == "numpy" else f"openblas32[{core}]"
        entries.append({**g, "lib": lib, "core": core, "forced": bool(w.partition(":")[2])})
        entries[-1].update(s, gflops=flops / s["min"] / 1e9 if s["n"] else 0.0)
    # the ceiling: the best rate of scipy-openblas32, with the kernels it picks for this CPU
    # (what rnnfast gets) or with any kernel set forced through OPENBLAS_CORETYPE
    ours_blas = [e for e in entries if e["lib"].startswith("openblas32")]
    best = max(ours_blas, key=lambda e: e["gflops"])
    as_loaded = max((e for e in ours_blas if not e["forced"]), key=lambda e: e["gflops"])
    ceiling = {
        "gflops": best["gflops"],
        "source": f"scipy-openblas32 sgemm {best['op']} {best['M']}x{best['N']}x{best['K']} "
        f"with its {best['core']} kernels"
        + (" (forced by OPENBLAS_CORETYPE)" if best["forced"] else "")
        + ", called through ctypes, best of the run",
        "as_loaded_gflops": as_loaded["gflops"],
        "as_loaded_core": as_loaded["core"],
        "entries": entries,
    }

    out_cases = []
    for c in cases:
        row = {**c.to_dict(), "key": c.key, "flops": c.flops(), "backends": {}}
        for b in bench_backends:
            s = store[b][c.key]
            if not s["times"]:
                continue
            summ = summarize(s["times"])
            summ["gflops"] = c.flops() / summ["min"] / 1e9
            summ["ceiling_frac"] = summ["gflops"] / ceiling["gflops"]
            q = summarize(s["quiet"])
            summ.update(n_quiet=q["n"], min_quiet=q.get("min"), median_quiet=q.get("median"))
            summ["round_min"] = s["round_min"]
            summ["foreign"] = s["foreign"]
            summ["times"] = s["times"]
            row["backends"][b] = summ
        row["checks"] = {b: checks[b][c.key] for b in checks if c.key in checks[b]}
        row["errors"] = {b: errors[b][c.key] for b in errors if c.key in errors[b]}
        out_cases.append(row)
    return {"meta": meta, "ceiling": ceiling, "cases": out_cases}


# ---- reporting --------------------------------------------------------------------------------


def ms(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3g}" if t < 1 else f"{t * 1e3:.0f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def geomean(xs) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def stat(row: dict, b: str, what: str = "min") -> float | None:
    """A backend's min or median time on a case; the median is over the quiet measurements
    (other processes below the --quiet load) where there are at least 3 such calls."""
    s = row["backends"].get(b)
    if not s:
        return None
    if what == "median" and s.get("n_quiet", 0) >= 3:
        return s["median_quiet"]
    return s[what]


def best_anchor(row: dict) -> float | None:
    """The faster of torch.nn's and onnxruntime's minimum times on an inference case."""
    anchors = [a for a in (stat(row, "torch"), stat(row, "ort")) if a]
    return min(anchors) if anchors else None


def table_rows(res: dict, mode: str) -> list[list[str]]:
    """Rows of the per-mode table (strings), header first."""
    head = ["cell", "(N, T, C=H)", "ours min ms", "ours med ms", "torch min ms", "torch med ms"]
    if mode == "infer":
        head += ["ort min ms"]
    head += ["ref min ms", "vs torch (min)", "vs torch (med)"]
    if mode == "infer":
        head += ["vs ort (min)", "vs best anchor"]
    head += ["bf16 min ms", "torch bf16 min ms", "bf16 vs torch bf16", "bf16 vs ours f32"]
    if mode == "infer":
        head += ["bf16 vs best"]
    head += ["ours GFLOP/s", "ours % ceiling", "torch % ceiling", "check"]
    rows = [head]
    for row in res["cases"]:
        if row["mode"] != mode:
            continue
        o, t = stat(row, "ours"), stat(row, "torch")
        line = [
            row["cell"],
            f"({row['N']}, {row['T']}, {row['H']})",
            ms(o),
            ms(stat(row, "ours", "median")),
        ]
        line += [ms(t), ms(stat(row, "torch", "median"))]
        if mode == "infer":
            line += [ms(stat(row, "ort"))]
        line += [ms(stat(row, "ref"))]
        line += [
            fx(ratio(t, o)),
            fx(ratio(stat(row, "torch", "median"), stat(row, "ours", "median"))),
        ]
        best, bf16, tbf16 = best_anchor(row), stat(row, "ours-bf16"), stat(row, "torch-bf16")
        if mode == "infer":
            line += [fx(ratio(stat(row, "ort"), o)), fx(ratio(best, o))]
        line += [ms(bf16), ms(tbf16), fx(ratio(tbf16, bf16)), fx(ratio(o, bf16))]
        if mode == "infer":
            line += [fx(ratio(best, bf16))]
        so, st = row["backends"].get("ours"), row["backends"].get("torch")
        line += [f"{so['gflops']:.0f}" if so else "-"]
        line += [f"{100 * so['ceiling_frac']:.0f}%" if so else "-"]
        line += [f"{100 * st['ceiling_frac']:.0f}%" if st else "-"]
        errs = [
            f"{b} {e:.0e}" for b, d in row["checks"].items() for e in [max(d.values(), default=0)]
        ]
        bad = [f"{b}: {m.split(':')[0]}" for b, m in row["errors"].items()]
        line += [", ".join(errs + bad) or "-"]
        rows.append(line)
    return rows


def baseline_lines(res: dict) -> list[str]:
    """ours against the --baseline build, case by case (a markdown table), and the summary."""
    rows = [r for r in res["cases"] if stat(r, "base") and stat(r, "ours")]
    if not rows:
        return []
    out = ["| cell | (N, T, C=H) | mode | baseline min ms | ours min ms | baseline / ours |",
           "|---|---|---|---:|---:|---:|"]  # fmt: skip
    speedups = []
    for r in rows:
        x = ratio(stat(r, "base"), stat(r, "ours"))
        speedups.append(x)
        out.append(f"| {r['cell']} | ({r['N']}, {r['T']}, {r['H']}) | {r['mode']} | "
                   f"{ms(stat(r, 'base'))} | {ms(stat(r, 'ours'))} | {fx(x)} |")  # fmt: skip
    lo, hi = min(speedups), max(speedups)
    out.append(f"Against the baseline build: geometric mean {geomean(speedups):.3f}x, range "
               f"{lo:.3f}x-{hi:.3f}x (above 1: this build is faster).")  # fmt: skip
    return out


def summary_lines(res: dict) -> list[str]:
    out = []
    tr = [r for r in res["cases"] if r["mode"] == "train"]
    sp = [ratio(stat(r, "torch"), stat(r, "ours")) for r in tr]
    if any(sp):
        worst = min((x, r["key"]) for x, r in zip(sp, tr, strict=True) if x)
        out.append(
            "Training step, speed-up over torch.nn (min times): geometric mean "
            f"{geomean(sp):.2f}x, lowest {worst[0]:.2f}x ({worst[1]}); "
            "target >= 1.5x mean, >= 1.1x everywhere."
        )
    inf = [r for r in res["cases"] if r["mode"] == "infer"]
    best = [(ratio(best_anchor(r), stat(r, "ours")), r["key"]) for r in inf]
    if any(b for b, _ in best):
        below = [k for b, k in best if b is not None and b < 1.0]
        low = min((b, k) for b, k in best if b)
        out.append(
            f"Inference, speed-up over the best of torch.nn and onnxruntime: geometric mean "
            f"{geomean([b for b, _ in best]):.2f}x, lowest {low[0]:.2f}x ({low[1]}); "
            f"{len(below)} of {len(best)} shapes below 1x (target: none)."
        )
        small = [ratio(stat(r, "torch"), stat(r, "ours")) for r in inf if r["N"] in (1, 4)]
        if any(small):
            out.append(
                "Inference at batch 1 and 4, speed-up over torch.nn: "
                + ", ".join(f"{x:.2f}x" for x in small if x)
                + " (target >= 2x)."
            )
        large = [
            (r["key"], r["backends"]["ours"]["ceiling_frac"])
            for r in inf
            if "ours" in r["backends"] and r["N"] >= 32 and r["H"] >= 512
        ]
        if large:
            out.append(
                "Inference at the large shapes, fraction of the GEMM ceiling: "
                + ", ".join(f"{k.split('/')[0]} {k.split('/')[1]} {100 * f:.0f}%" for k, f in large)
                + " (target >= 85%)."
            )
    bf = [(ratio(best_anchor(r), stat(r, "ours-bf16")), r) for r in inf if stat(r, "ours-bf16")]
    if bf:
        low = min((x, r["key"]) for x, r in bf if x)
        small = [ratio(stat(r, "torch"), stat(r, "ours-bf16")) for _, r in bf if r["N"] in (1, 4)]
        errs = [max(r["checks"].get("ours-bf16", {}).values(), default=0.0) for _, r in bf]
        out.append(
            'Inference with matmul_precision="bfloat16" (opt-in), speed-up over the best anchor: '
            f"geometric mean {geomean([x for x, _ in bf]):.2f}x, lowest {low[0]:.2f}x ({low[1]}); "
            "over torch.nn at batch 1 and 4: "
            + ", ".join(f"{x:.2f}x" for x in small if x)
            + f"; largest error against torch.nn (max abs / max abs value) {max(errs):.1e}."
        )
    for mode in ("infer", "train"):
        pairs = [
            (
                ratio(stat(r, "torch-bf16"), stat(r, "ours-bf16")),
                ratio(stat(r, "ours"), stat(r, "ours-bf16")),
                r["key"],
            )
            for r in res["cases"]
            if r["mode"] == mode and stat(r, "ours-bf16") and stat(r, "torch-bf16")
        ]
        if pairs:
            low = min((x, k) for x, _, k in pairs)
            large = [
                f"{k.split('/')[0]} {k.split('/')[1]} {f:.2f}x"
                for _, f, k in pairs
                if "/N64-T50-H512/" in k or "/N32-T100-H1024/" in k
            ]
            out.append(
                f"bfloat16 {mode}, speed-up over torch.nn under autocast bfloat16: geometric mean "
                f"{geomean([x for x, _, _ in pairs]):.2f}x, lowest {low[0]:.2f}x ({low[1]}) "
                "(target >= 1x everywhere); over our float32 at the large shapes: "
                + ", ".join(large)
                + " (target >= 3x)."
            )
    return out


def machine_lines(res: dict) -> list[str]:
    m, b = res["meta"]["machine"], res["meta"]["backends"]
    g = b.get("gemm", {})
    lines = [
        f"- CPU: {m['cpu_model']} ({m.get('cpu_family_model')}), {m['cpus']} CPUs "
        f"({m.get('cores_per_socket')} cores/socket), "
        f"hypervisor {m.get('hypervisor')}, L2 {m.get('l2')}, L3 {m.get('l3')}; "
        f"ISA {' '.join(m.get('isa', []))}",
        f"- Python {m['python']}, Linux {m['kernel']}, "
        f"{res['meta']['threads']} threads per backend"
        + (f", run at nice {res['meta']['nice']}" if res["meta"].get("nice") else ""),
    ]
    loads = [d for d in res["meta"].get("cpu_load", []) if d]
    if loads:
        fo = [100 * d["foreign"] for d in loads]
        st = [100 * d["steal"] for d in loads]
        lines.append(
            f"- other processes' load during the rounds: {min(fo):.0f}-{max(fo):.0f}% of the CPUs "
            f"(hypervisor steal {min(st):.0f}-{max(st):.0f}%)"
        )
    if g:
        lines.append(
            f"- BLAS: scipy-openblas32 {g.get('openblas32')} (core {g.get('openblas32_core')}; "
            f"{g.get('openblas32_config')}); NumPy {g.get('numpy')} with {g.get('numpy_blas')}"
        )
    if "ours" in b:
        bi = b["ours"].get("build_info", {})
        lines.append(
            f"- rnnfast {b['ours'].get('rnnfast')}, {b['ours'].get('threads')} threads; build_info "
            + ", ".join(f"{k}={v}" for k, v in bi.items())
        )
    if "torch" in b:
        t = b["torch"]
        lines.append(f"- torch {t['torch']} ({t['threads']} threads, mkldnn {t['mkldnn']})")
    if "ort" in b:
        lines.append(f"- onnxruntime {b['ort']['onnxruntime']}, onnx {b['ort']['onnx']}")
    for n in res["meta"].get("notes", []):
        lines.append(f"- note: {n}")
    return lines


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r):
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in cells)

    return "\n".join(
        [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    )


def md_table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def ceiling_line(res: dict) -> str:
    c = res["ceiling"]
    others = "; ".join(
        f"{e['lib']} {e['op']} {e['M']}x{e['N']}x{e['K']}: {e['gflops']:.0f}" for e in c["entries"]
    )
    return (
        f"GEMM ceiling {c['gflops']:.0f} GFLOP/s: {c['source']}. "
        f"All sgemms (GFLOP/s at min time): {others}."
    )


def rounds_done(meta: dict) -> int:
    return meta.get("rounds_done", meta["rounds"])


def print_report(res: dict) -> None:
    meta = res["meta"]
    print(
        f"\nrnnfast CPU benchmark, {meta['date']}, {rounds_done(meta)} rounds, "
        f"{meta.get('elapsed_s', 0):.0f} s"
    )
    print("\n".join(busy_warning(res) + machine_lines(res)))
    print(ceiling_line(res))
    for mode in MODES:
        rows = table_rows(res, mode)
        if len(rows) > 1:
            title = "inference forward" if mode == "infer" else "training step (forward + backward)"
            print(f"\n{title}; speed-up = anchor time / our time")
            print(text_table(rows))
    print()
    print("\n".join(summary_lines(res)))
    if any(stat(r, "base") for r in res["cases"]):
        print("\n" + "\n".join(baseline_lines(res)))


def plot(res: dict, path: Path) -> None:
    """Per mode: speed-ups over each anchor (left, log scale) and % of the GEMM ceiling (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = res["meta"]
    modes = [m for m in MODES if any(r["mode"] == m for r in res["cases"])]
    fig, axes = plt.subplots(len(modes), 2, figsize=(22, 5 * len(modes)), squeeze=False)
    for (ax, ax2), mode in zip(axes, modes, strict=True):
        rows = [r for r in res["cases"] if r["mode"] == mode]
        labels = [f"{r['cell']}\n({r['N']},{r['T']},{r['H']})" for r in rows]
        xs = np.arange(len(rows))
        anchors = ["torch", "ort"] if mode == "infer" else ["torch"]
        w = 0.8 / len(anchors)
        for i, a in enumerate(anchors):
            vals = [ratio(stat(r, a), stat(r, "ours")) or 0 for r in rows]
            ax.bar(xs + (i - (len(anchors) - 1) / 2) * w, vals, w, label=f"vs {BACKEND_LABEL[a]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("speed-up (anchor min / rnnfast min)")
        ax.set_title(f"rnnfast {mode}, {meta['threads']} threads: speed-up ({meta['date']})")
        ax.legend()
        present = ("ours", "ours-bf16", "torch", "torch-bf16", "ort")
        backends = [b for b in present if any(b in r["backends"] for r in rows)]
        w = 0.8 / len(backends)
        for i, b in enumerate(backends):
            vals = [
                100 * r["backends"][b]["ceiling_frac"] if b in r["backends"] else 0 for r in rows
            ]
            ax2.bar(xs + (i - (len(backends) - 1) / 2) * w, vals, w, label=BACKEND_LABEL[b])
        ax2.set_xticks(xs, labels, fontsize=7)
        ax2.set_ylabel(f"% of the GEMM ceiling ({res['ceiling']['gflops']:.0f} GFLOP/s)")
        ax2.set_title(f"{mode}: GEMM FLOP rate at the minimum time")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def results_block(res: dict, json_name: str) -> str:
    meta = res["meta"]
    argv = " ".join(meta["argv"]) or "(defaults)"
    parts = [
        BEGIN.format(meta["threads"]),
        f"## CPU, {meta['threads']} thread{'s' if meta['threads'] > 1 else ''} ({meta['date']})",
        "",
        *busy_warning(res),
        f"`python bench/cpu.py {argv}`: {rounds_done(meta)} interleaved rounds, "
        f"{meta['threads']} threads per backend, each backend in its own process; "
        f"{meta.get('elapsed_s', 0):.0f} s in all "
        f"(raw times in bench/out/{json_name}, not in git). Times in ms, minimum and median over "
        "all calls of all rounds (the median over the calls made while other processes used under "
        f"{100 * meta.get('quiet', 0.2):.0f}% of the CPUs, where there are 3 or more); "
        "speed-up = anchor time / rnnfast time; GFLOP/s counts the GEMM "
        "FLOPs (forward 2*T*N*G*H*(C+H), training step 3x that) at the minimum time.",
        "",
        *machine_lines(res),
        f"- {ceiling_line(res)}",
        "",
    ]
    for mode in MODES:
        rows = table_rows(res, mode)
        if len(rows) > 1:
            title = (
                "Inference forward"
                if mode == "infer"
                else "Training step (forward + backward, every gradient)"
            )
            parts += [f"### {title}", "", md_table(rows), ""]
    parts += ["### Against the targets of issue 5", ""] + [f"- {s}" for s in summary_lines(res)]
    parts += ["", END.format(meta["threads"])]
    return "\n".join(parts)


def busy_warning(res: dict) -> list[str]:
    """A caution when other processes kept the CPUs busy in most rounds, a note when in some."""
    loads = [d["foreign"] for d in res["meta"].get("cpu_load", []) if d]
    busy = [x for x in loads if x > BUSY]
    if not busy:
        return []
    if len(busy) * 2 <= len(loads):
        return [
            f"Note: in {len(busy)} of {len(loads)} rounds other processes used up to "
            f"{100 * max(busy):.1f}% of the CPUs (the mark is {100 * BUSY:.0f}%); the other rounds "
            "were quiet.",
            "",
        ]
    return [
        f"**Caution: other processes used {100 * min(loads):.0f}-{100 * max(loads):.0f}% of the "
        "CPUs while this ran.** Multi-threaded code that meets a barrier every step (rnnfast, and "
        "torch even more) slows down by up to 1000x when a core is taken from it, far more than "
        "onnxruntime or a GEMM, so these times and ratios measure the contention as much as the "
        "kernels. Re-run on a quiet machine before drawing conclusions.",
        "",
    ]


def write_results(res: dict, path: Path, json_name: str) -> None:
    block = results_block(res, json_name)
    begin, end = BEGIN.format(res["meta"]["threads"]), END.format(res["meta"]["threads"])
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            pre, rest = text.split(begin, 1)
            post = rest.split(end, 1)[1]
            text = pre + block + post
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = (
            "# rnnfast benchmark results\n\n"
            "Kept current with every performance change (STYLE.md). The block between the "
            "markers is written by `python bench/cpu.py --write-results`; "
            "notes outside it are by hand.\n\n" + block + "\n"
        )
    path.write_text(text)


# ---- command line -----------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=list(SHAPES), metavar="N,T,H")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also time another build of rnnfast, interleaved with this one: a folder holding its "
        "rnnfast package (with the compiled _C), e.g. a `pip install --target` of another commit",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--time-budget",
        type=float,
        default=840.0,
        help="start no round that would end past this many seconds from the start",
    )
    p.add_argument(
        "--target", type=float, default=0.25, help="seconds of calls per case, backend and round"
    )
    p.add_argument("--min-calls", type=int, default=1)
    p.add_argument("--max-calls", type=int, default=40)
    p.add_argument("--settle", type=float, default=0.15, help="pause (s) when switching backends")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.2,
        help="a measurement is quiet when other processes use at most this fraction of the CPUs",
    )
    p.add_argument("--max-wait", type=float, default=2.0, help="longest wait (s) for quiet")
    p.add_argument(
        "--retry-budget",
        type=float,
        default=120.0,
        help="seconds to re-measure, after the rounds, cases that never had a quiet measurement",
    )
    p.add_argument(
        "--retry-wait", type=float, default=5.0, help="longest wait for quiet in a retry"
    )
    p.add_argument(
        "--max-wait-total", type=float, default=90.0, help="total wait (s) for quiet in a run"
    )
    p.add_argument(
        "--ref-max-gflop",
        type=float,
        default=1.0,
        help="run the NumPy reference only on cases of at most this many GFLOP (1 call per round)",
    )
    p.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the check against torch"
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice increment for the driver and its workers (negative, as root, to run ahead of "
        "other processes on a shared machine)",
    )
    p.add_argument(
        "--gemm-cores",
        nargs="*",
        default=None,
        help="also time scipy-openblas32 with these OPENBLAS_CORETYPE kernel sets (none: skip; "
        "default SkylakeX where the CPU has AVX-512, whose kernels raise SIGILL elsewhere)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--tag", default=None, help="name of the output files (default cpu-<date>)")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument(
        "--write-results", nargs="?", const=str(RESULTS_MD), default=None, metavar="PATH"
    )
    p.add_argument("--from-json", type=Path, default=None, help="report on an earlier run's JSON")
    args = p.parse_args(argv)

    if args.from_json:
        res = json.loads(args.from_json.read_text())
        json_path = args.from_json
    else:
        if args.quick:
            args.cells = args.cells if args.cells != list(CELLS) else ["lstm", "gru"]
            args.shapes = (
                args.shapes if args.shapes != list(SHAPES) else [(4, 20, 64), (16, 10, 128)]
            )
            args.rounds, args.target, args.max_wait = 1, 0.02, 0.1
            args.retry_budget = 0
        if args.nice:
            os.nice(args.nice)  # the workers inherit it
        res = run_benchmark(args)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        tag = args.tag or (
            "cpu-quick" if args.quick else "cpu-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        )
        json_path = OUT_DIR / f"{tag}.json"
        json_path.write_text(json.dumps(res, indent=1))
        if not args.quick:
            shutil.copyfile(json_path, OUT_DIR / "cpu-latest.json")
    print_report(res)
    print(f"\nJSON: {json_path}")
    if args.plot:
        png = json_path.with_suffix(".png")
        plot(res, png)
        print(f"plot: {png}")
    if args.write_results:
        write_results(res, Path(args.write_results), json_path.name)
        print(f"updated {args.write_results}")


if __name__ == "__main__":
    main()
