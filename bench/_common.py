"""Shared pieces of the CPU benchmark: the grid, FLOP counts, seeded inputs, and machine facts.

Imported both by the driver (bench/cpu.py) and by its per-backend worker processes
(bench/_workers.py), so it must stay light: NumPy and the standard library only.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


def _cell_table() -> dict:
    """rnnfast's cell table (rnnfast/cells.py), loaded from its file: importing the package would
    load rnnfast's extension and its OpenMP runtime into the torch and onnxruntime workers too."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rnnfast",
                        "cells.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("_rnnfast_cells", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module.CELLS


CELL_TABLE = _cell_table()
CELLS = ("lstm", "gru", "rnn_tanh")  # the benchmark grid's cells
GATES = {name: spec.gates for name, spec in CELL_TABLE.items()}
# (N, T, C=H), as issue 5 lists them
SHAPES = (
    (1, 100, 256),
    (4, 200, 256),
    (16, 50, 512),
    (64, 50, 512),
    (32, 100, 1024),
    (64, 25, 128),
)
MODES = ("infer", "train")
# ours-bf16: rnnfast with the opt-in matmul_precision="bfloat16" (on AMX tiles where the CPU has
# them); torch-bf16: torch.nn under torch.autocast("cpu", dtype=torch.bfloat16) (oneDNN, AMX too)
BACKENDS = ("ours", "ours-bf16", "torch", "torch-bf16", "ort", "ref")
# the backward is two GEMMs per forward GEMM (dgates -> dh/dx, and the weight gradients)
TRAIN_FLOP_FACTOR = 3.0


@dataclass(frozen=True)
class Case:
    cell: str
    N: int
    T: int
    H: int  # C = H throughout the grid
    mode: str

    @property
    def C(self) -> int:
        return self.H

    @property
    def G(self) -> int:
        return GATES[self.cell]

    @property
    def key(self) -> str:
        return f"{self.cell}/N{self.N}-T{self.T}-H{self.H}/{self.mode}"

    @property
    def shape_label(self) -> str:
        return f"({self.N}, {self.T}, {self.H})"

    def forward_flops(self) -> float:
        """GEMM FLOPs of one forward: input projection plus recurrent product, 2*T*N*G*H*(C+H)."""
        return 2.0 * self.T * self.N * self.G * self.H * (self.C + self.H)

    def flops(self) -> float:
        f = self.forward_flops()
        return f * TRAIN_FLOP_FACTOR if self.mode == "train" else f

    def to_dict(self) -> dict:
        return asdict(self)


def case_from_dict(d: dict) -> Case:
    return Case(d["cell"], int(d["N"]), int(d["T"]), int(d["H"]), d["mode"])


def make_inputs(case: Case, dtype=np.float32) -> dict:
    """Seeded inputs for one (cell, shape): the same arrays in every worker, whatever the mode.

    Weights are uniform in +-1/sqrt(H), as torch.nn initialises them; x, the initial states and
    the upstream gradient dy are standard normal (states scaled by 0.5).
    """
    seed = zlib.crc32(f"{case.cell}/{case.N}/{case.T}/{case.H}".encode())
    rng = np.random.default_rng(seed)
    T, N, C, H, G = case.T, case.N, case.C, case.H, case.G
    k = 1.0 / np.sqrt(H)

    def u(*shape):
        return rng.uniform(-k, k, size=shape).astype(dtype)

    def n(*shape, scale=1.0):
        return (scale * rng.standard_normal(size=shape)).astype(dtype)

    return {
        "x": n(T, N, C),
        "w_ih": u(G * H, C),
        "w_hh": u(G * H, H),
        "b_ih": u(G * H),
        "b_hh": u(G * H),
        "h0": n(N, H, scale=0.5),
        "c0": n(N, H, scale=0.5) if CELL_TABLE[case.cell].has_c else None,
        "dy": n(T, N, H),
    }


def thread_env(threads: int) -> dict:
    """The environment of a worker process: every thread pool sized to ``threads``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def machine_info() -> dict:
    """What the driver knows about the machine without importing any backend."""
    cpu = lscpu()
    flags = set(cpu.get("Flags", "").split())
    return {
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpu_family_model": f"{cpu.get('Vendor ID')} family {cpu.get('CPU family')} "
        f"model {cpu.get('Model')} stepping {cpu.get('Stepping')}",
        "cpus": os.cpu_count(),
        "cores_per_socket": cpu.get("Core(s) per socket"),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "isa": sorted(f for f in flags if f.startswith(("avx512f", "amx", "avx512_bf16", "avx2"))),
        "l2": cpu.get("L2 cache"),
        "l3": cpu.get("L3 cache"),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def summarize(times: list[float]) -> dict:
    a = np.asarray(times, dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "min": float(a.min()),
        "median": float(np.median(a)),
        "max": float(a.max()),
    }


def parse_shape(s: str) -> tuple[int, int, int]:
    """A benchmark shape as the command line gives it: "N,T,H" (or NxTxH; C = H)."""
    parts = s.replace("x", ",").split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a shape is N,T,H (C = H), got {s!r}")
    return tuple(int(p) for p in parts)


def write_marked_block(path: Path, begin: str, end: str, title: str, lines: list[str]) -> None:
    """Puts ``lines`` under ``title`` between the markers begin and end in the Markdown file at
    path (replacing what was there, or appended at its end the first time)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join([begin, "", title, "", *lines, "", end])
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def min_step_ms(step, calls: int, warmup: int = 3) -> float:
    """The fastest of ``calls`` runs of ``step()`` after ``warmup`` untimed ones, in ms."""
    import time

    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def best_of_interleaved(script, cases, backends, rounds: int, calls: int, env: dict) -> dict:
    """{(case, backend): the fastest min_ms} over ``rounds`` rounds in which each case runs each
    backend in a process of its own (``script --calls C --worker BACKEND *case``, which prints
    {"min_ms": ...} last), the backends' order alternating from case to case and round to round,
    so that the machine's drift falls on both."""
    import json
    import sys

    best = {}
    for r in range(rounds):
        for i, case in enumerate(cases):
            order = backends if (r + i) % 2 == 0 else backends[::-1]
            for backend in order:
                cmd = [sys.executable, str(script), "--calls", str(calls), "--worker", backend,
                       *map(str, case)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                ms = json.loads(out.stdout.strip().splitlines()[-1])["min_ms"]
                best[(case, backend)] = min(best.get((case, backend), float("inf")), ms)
    return best
