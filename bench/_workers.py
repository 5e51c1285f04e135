"""One benchmark backend in its own process, driven by bench/cpu.py over a line-based JSON protocol.

Usage (by the driver, not by hand): python bench/_workers.py BACKEND THREADS
BACKEND is ours, torch, ort, ref (rnnfast.reference) or gemm (the GEMM ceiling). Each worker
imports only its own library, so thread pools never share a process. Requests on stdin, one JSON
object a line; one JSON reply a line on the original stdout (fd 1 is pointed at stderr, so that a
library that prints cannot break the protocol).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time
import traceback

import numpy as np
from _common import Case, case_from_dict, make_inputs


def time_calls(fn, target_s: float, min_calls: int, max_calls: int, warm: int) -> list[float]:
    """Per-call wall times: at least min_calls, then more until target_s has passed."""
    for _ in range(warm):
        fn()
    gc.collect()
    gc.disable()
    try:
        times = []
        start = time.perf_counter()
        while len(times) < min_calls or (
            time.perf_counter() - start < target_s and len(times) < max_calls
        ):
            t0 = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t0) * 1e-9)
    finally:
        gc.enable()
    return times


# ---- rnnfast.ops and rnnfast.reference share one signature -------------------------------------


class RnnfastBackend:
    """rnnfast.ops (the kernels) or rnnfast.reference (NumPy): the same functional API."""

    def __init__(self, threads: int, reference: bool, matmul_precision: str = "float32",
                 package_root: str | None = None):  # fmt: skip
        if package_root:  # another build (bench/cpu.py --baseline): its rnnfast, not this one's
            sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                                and "skbuild" not in repr(f).lower()]  # fmt: skip
            sys.path.insert(0, package_root)
        import rnnfast

        if package_root and not os.path.abspath(rnnfast.__file__).startswith(
            os.path.abspath(package_root)
        ):
            raise RuntimeError(f"--baseline {package_root} has no rnnfast package")

        if not reference:
            rnnfast.set_num_threads(threads)
        self.rnnfast = rnnfast
        self.api = rnnfast.reference if reference else rnnfast.ops
        if not hasattr(self.api, "forward"):  # a baseline from before the uniform pair
            self.api = _UniformPair(self.api)
        self.reference = reference
        bf16 = matmul_precision != "float32"
        self.precision = {"matmul_precision": matmul_precision} if bf16 else {}

    def info(self) -> dict:
        rf = self.rnnfast
        if self.reference:
            return {"numpy": np.__version__, "numpy_blas": numpy_blas()}
        return {
            "rnnfast": getattr(rf, "__version__", "?"),
            "threads": rf.get_num_threads(),
            "build_info": {k: str(v) for k, v in rf.build_info().items()},
        }

    def _forward(self, case: Case, d: dict, training: bool):
        return self.api.forward(case.cell, d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                                d["h0"], d["c0"], training=training, **self.precision)  # fmt: skip

    def _backward(self, case: Case, ctx, dy):
        return self.api.backward(ctx, dy)

    def prepare(self, case: Case):
        d = make_inputs(case)
        if case.mode == "infer":

            def run():
                return self._forward(case, d, False)

        else:

            def run():
                *_, ctx = self._forward(case, d, True)
                return self._backward(case, ctx, d["dy"])

        def outputs():
            y, h_n, c_n, ctx = self._forward(case, d, case.mode == "train")
            out = {"y": y, "h_n": h_n, "c_n": c_n}
            if case.mode == "train":
                out.update(self._backward(case, ctx, d["dy"]))
            return out

        return run, outputs


# ---- torch.nn on the CPU --------------------------------------------------------------------


class TorchBackend:
    """torch.nn; with bf16, under torch.autocast("cpu", dtype=torch.bfloat16), which runs the
    LSTM, GRU and RNN in bfloat16 on oneDNN (float32 master weights, as rnnfast's bfloat16)."""

    def __init__(self, threads: int, bf16: bool = False):
        import contextlib

        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.precision = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            if bf16
            else contextlib.nullcontext
        )

    def info(self) -> dict:
        t = self.torch
        return {
            "torch": t.__version__,
            "threads": t.get_num_threads(),
            "mkldnn": bool(t.backends.mkldnn.is_available()),
            "openmp": bool(t.backends.openmp.is_available()),
        }

    def prepare(self, case: Case):
        torch = self.torch
        d = make_inputs(case)
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(case.cell)
        if cls is not None:
            mod = cls(case.C, case.H)
        else:
            mod = torch.nn.RNN(case.C, case.H, nonlinearity=case.cell.split("_", 1)[1])
        with torch.no_grad():
            for name in ("w_ih", "w_hh", "b_ih", "b_hh"):
                getattr(mod, name.replace("w_", "weight_").replace("b_", "bias_") + "_l0").copy_(
                    torch.from_numpy(d[name])
                )
        x = torch.from_numpy(d["x"])
        h0 = torch.from_numpy(d["h0"])[None]
        c0 = torch.from_numpy(d["c0"])[None] if case.cell == "lstm" else None
        dy = torch.from_numpy(d["dy"])
        params = [mod.weight_ih_l0, mod.weight_hh_l0, mod.bias_ih_l0, mod.bias_hh_l0]
        leaves = {"x": x.clone().requires_grad_(), "h0": h0.clone().requires_grad_()}
        if c0 is not None:
            leaves["c0"] = c0.clone().requires_grad_()

        def call(xx, hh, cc):
            with self.precision():
                if cc is None:
                    y, h_n = mod(xx, hh)
                    return y.float(), h_n.float(), None
                y, (h_n, c_n) = mod(xx, (hh, cc))
                return y.float(), h_n.float(), c_n.float()

        def infer():
            with torch.inference_mode():
                return call(x, h0, c0)

        def train():
            for t in (*params, *leaves.values()):
                t.grad = None
            y, h_n, c_n = call(leaves["x"], leaves["h0"], leaves.get("c0"))
            (y * dy).sum().backward()
            return y

        def outputs():
            def np_(t):
                return None if t is None else t.detach().numpy().copy()

            if case.mode == "infer":
                y, h_n, c_n = infer()
                return {
                    "y": np_(y),
                    "h_n": np_(h_n[0]),
                    "c_n": None if c_n is None else np_(c_n[0]),
                }
            for t in (*params, *leaves.values()):
                t.grad = None
            y, h_n, c_n = call(leaves["x"], leaves["h0"], leaves.get("c0"))
            (y * dy).sum().backward()
            out = {"y": np_(y), "h_n": np_(h_n[0]), "c_n": None if c_n is None else np_(c_n[0])}
            out.update(
                dx=np_(leaves["x"].grad),
                dh0=np_(leaves["h0"].grad[0]),
                dw_ih=np_(mod.weight_ih_l0.grad),
                dw_hh=np_(mod.weight_hh_l0.grad),
                db_ih=np_(mod.bias_ih_l0.grad),
                db_hh=np_(mod.bias_hh_l0.grad),
            )
            if "c0" in leaves:
                out["dc0"] = np_(leaves["c0"].grad[0])
            return out

        return (infer if case.mode == "infer" else train), outputs


# ---- onnxruntime, inference only --------------------------------------------------------------

# torch gate blocks -> ONNX gate blocks: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h
ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn_tanh": (0,), "rnn_relu": (0,)}
ONNX_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}


def onnx_model(case: Case, d: dict):
    """A one-node ONNX graph equivalent to torch.nn.<cell> with the weights as initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    G, H, N, T, C = case.G, case.H, case.N, case.T, case.C
    order = list(ONNX_GATE_ORDER[case.cell])

    def reorder(a):
        return np.ascontiguousarray(a.reshape(G, H, -1)[order].reshape(G * H, -1))

    W = reorder(d["w_ih"])[None]
    R = reorder(d["w_hh"])[None]
    B = np.concatenate([reorder(d["b_ih"]).ravel(), reorder(d["b_hh"]).ravel()])[None]
    ins = ["X", "W", "R", "B", "", "initial_h"]
    outs = ["Y", "Y_h"]
    feeds = [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, N, C]),
        helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, [1, N, H]),
    ]
    results = [
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, [T, 1, N, H]),
        helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, N, H]),
    ]
    attrs = {"hidden_size": H}
    if case.cell == "lstm":
        ins.append("initial_c")
        outs.append("Y_c")
        feeds.append(helper.make_tensor_value_info("initial_c", TensorProto.FLOAT, [1, N, H]))
        results.append(helper.make_tensor_value_info("Y_c", TensorProto.FLOAT, [1, N, H]))
    elif case.cell == "gru":
        attrs["linear_before_reset"] = 1  # reset gate after the recurrent product, as torch
    else:
        attrs["activations"] = [case.cell.split("_", 1)[1].capitalize()]
    node = helper.make_node(ONNX_OPS[case.cell], ins, outs, **attrs)
    inits = [numpy_helper.from_array(a, name) for a, name in ((W, "W"), (R, "R"), (B, "B"))]
    graph = helper.make_graph([node], f"rnnfast_bench_{case.cell}", feeds, results, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class OrtBackend:
    def __init__(self, threads: int):
        import onnx
        import onnxruntime as ort

        self.ort, self.onnx, self.threads = ort, onnx, threads

    def info(self) -> dict:
        return {
            "onnxruntime": self.ort.__version__,
            "onnx": self.onnx.__version__,
            "intra_op_threads": self.threads,
        }

    def prepare(self, case: Case):
        if case.mode != "infer":
            raise NotImplementedError("onnxruntime is benchmarked for inference only")
        ort = self.ort
        d = make_inputs(case)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = onnx_model(case, d).SerializeToString()
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        feeds = {"X": d["x"], "initial_h": d["h0"][None]}
        if case.cell == "lstm":
            feeds["initial_c"] = d["c0"][None]

        def run():
            return sess.run(None, feeds)

        def outputs():
            res = run()
            return {
                "y": res[0][:, 0],
                "h_n": res[1][0],
                "c_n": res[2][0] if case.cell == "lstm" else None,
            }

        return run, outputs


# ---- the GEMM ceiling -------------------------------------------------------------------------

CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


def openblas32():
    """The scipy-openblas32 library that rnnfast links against, through ctypes."""
    import scipy_openblas32 as so

    lib = ctypes.CDLL(os.path.join(so.get_lib_dir(), so.get_library(True)), mode=ctypes.RTLD_GLOBAL)
    lib.scipy_openblas_get_config.restype = ctypes.c_char_p
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    lib.scipy_cblas_sgemm.restype = None
    lib.scipy_cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    return so, lib


def numpy_blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:  # older NumPy: the config is only printed
        return "unknown"


class GemmBackend:
    """sgemm through scipy-openblas32 (ctypes; the ceiling) and NumPy's own BLAS (for reference).

    A "case" here is a dict {lib, op, M, N, K}: op "nn" C = A B, "nt" C = A B^T, "tn" C = A^T B.
    """

    def __init__(self, threads: int):
        self.so, self.lib = openblas32()
        self.lib.scipy_openblas_set_num_threads(threads)

    def info(self) -> dict:
        return {
            "openblas32": self.so.__version__,
            "openblas32_config": self.lib.scipy_openblas_get_config().decode(),
            "openblas32_core": self.lib.scipy_openblas_get_corename().decode(),
            "openblas32_threads": self.lib.scipy_openblas_get_num_threads(),
            "numpy": np.__version__,
            "numpy_blas": numpy_blas(),
        }

    def prepare_gemm(self, g: dict):
        M, N, K, op = g["M"], g["N"], g["K"], g["op"]
        rng = np.random.default_rng(0)
        a = rng.standard_normal((K, M) if op == "tn" else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if op == "nt" else (K, N)).astype(np.float32)
        c = np.empty((M, N), np.float32)
        if g["lib"] == "numpy":
            aa = a.T if op == "tn" else a
            bb = b.T if op == "nt" else b
            return lambda: np.matmul(aa, bb, out=c)
        ta = CBLAS_TRANS if op == "tn" else CBLAS_NO_TRANS
        tb = CBLAS_TRANS if op == "nt" else CBLAS_NO_TRANS
        args = (CBLAS_ROW_MAJOR, ta, tb, M, N, K, 1.0, a.ctypes.data, a.shape[1])
        args += (b.ctypes.data, b.shape[1], 0.0, c.ctypes.data, N)
        sgemm = self.lib.scipy_cblas_sgemm
        keep = (a, b, c)  # the closure keeps the buffers alive

        def run():
            sgemm(*args)
            return keep

        return run


class _UniformPair:
    """forward(cell, ...) and backward(ctx, ...) over the per-cell functions of an rnnfast from
    before ops.forward existed, so that --baseline can time such a build."""

    def __init__(self, api):
        self.api = api

    def forward(self, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, **kw):
        if cell == "lstm":
            return self.api.lstm_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, **kw)
        if cell == "gru":
            y, h_n, ctx = self.api.gru_forward(x, w_ih, w_hh, b_ih, b_hh, h0, **kw)
        else:
            act = cell.split("_", 1)[1]
            y, h_n, ctx = self.api.rnn_forward(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity=act,
                                               **kw)  # fmt: skip
        return y, h_n, None, ctx

    def backward(self, ctx, dy):
        name = {"lstm": "lstm_backward", "gru": "gru_backward"}.get(ctx.cell, "rnn_backward")
        return getattr(self.api, name)(ctx, dy)


def make_backend(name: str, threads: int):
    if name == "ours":
        return RnnfastBackend(threads, reference=False)
    if name == "base":
        return RnnfastBackend(threads, reference=False,
                              package_root=os.environ["RNNFAST_BENCH_BASELINE"])  # fmt: skip
    if name == "ours-bf16":
        return RnnfastBackend(threads, reference=False, matmul_precision="bfloat16")
    if name == "ref":
        return RnnfastBackend(threads, reference=True)
    if name == "torch":
        return TorchBackend(threads)
    if name == "torch-bf16":
        return TorchBackend(threads, bf16=True)
    if name == "ort":
        return OrtBackend(threads)
    if name == "gemm":
        return GemmBackend(threads)
    raise ValueError(f"unknown backend {name!r}")


def save_outputs(path: str, out: dict) -> None:
    np.savez(path, **{k: np.asarray(v) for k, v in out.items() if v is not None})


def main() -> None:
    name, threads = sys.argv[1], int(sys.argv[2])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**kw):
        proto.write(json.dumps(kw) + "\n")
        proto.flush()

    backend, prepared = None, {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                reply(ok=True)
                break
            if op == "init":
                backend = make_backend(name, threads)
                reply(ok=True, info=backend.info(), pid=os.getpid())
                continue
            key = json.dumps(req["case"], sort_keys=True)
            if key not in prepared:
                if name == "gemm":
                    prepared[key] = (backend.prepare_gemm(req["case"]), None)
                else:
                    prepared[key] = backend.prepare(case_from_dict(req["case"]))
            run, outputs = prepared[key]
            if op == "check":
                t0 = time.perf_counter()
                save_outputs(req["path"], outputs())
                reply(ok=True, seconds=time.perf_counter() - t0)
            elif op == "time":
                times = time_calls(
                    run, req["target_s"], req["min_calls"], req["max_calls"], req["warm"]
                )
                reply(ok=True, times=times)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:
            reply(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())


if __name__ == "__main__":
    main()
