"""Check the CUDA backend on a machine without a GPU (a developer tool, not CI).

Builds every .cu file and bindings.cpp as plain C++ (g++ with the CUDA headers) into an
emulated ``_cuda`` module: a pointwise launch runs its threads one after another on the host, a
cooperative launch runs every thread as an OS thread with real barriers for __syncthreads, the
warp shuffles and the grid barrier (emulate.h); the GEMMs are a naive loop in double and device
memory is host memory (host_support.cpp). Then runs tests/test_cuda.py with NumPy standing in for
CuPy (cupy/, which poisons every allocation with NaN so an unwritten output shows), rnnfast.cuda
and the tests unchanged. About 1100 tests; the persistent ones take minutes.

    python cuda/emulate/run.py                 # builds in a temp dir, runs the tests
    python cuda/emulate/run.py -k lstm -x      # extra arguments go to pytest

Needs g++, the CUDA headers (/usr/local/cuda/include or $CUDA_HOME/include), pybind11, and an
installed rnnfast (for its _C extension). It checks the drivers, the pointwise kernels and the
Python layer; what only a GPU shows (memory visibility between blocks, races that the host's
stronger ordering hides, cuBLAS itself, speed) it cannot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def cuda_sources() -> list[str]:
    """The .cu files of the CUDA module, as cuda/cuda.cmake lists them."""
    with open(os.path.join(ROOT, "cuda", "cuda.cmake")) as f:
        text = f.read()
    listed = text[text.index("set(_rnnfast_cuda_sources") : text.index("pybind11_add_module(_cuda")]
    found = re.findall(r"\$\{CMAKE_CURRENT_LIST_DIR\}/(\w+\.cu)\b", listed)
    return [f for f in found if f != "cublas_shim.cu"]  # host_support.cpp stands in for cuBLAS


SOURCES = cuda_sources()
# strips the editable install's import hook, so that the assembled package is the one imported
BOOT = """
import sys
sys.meta_path = [f for f in sys.meta_path
                 if "editable" not in repr(f).lower() and "skbuild" not in repr(f).lower()]
import pytest, rnnfast
assert rnnfast.__file__.startswith(sys.argv[1]), rnnfast.__file__
sys.exit(pytest.main(["-p", "no:cacheprovider", sys.argv[2]] + sys.argv[3:]))
"""


def find_c_extension() -> str:
    code = "import importlib.util as u; print(u.find_spec('rnnfast._C').origin)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    if out.returncode != 0 or not out.stdout.strip():
        sys.exit(f"cannot find an installed rnnfast._C: {out.stderr.strip()}")
    return out.stdout.strip()


def build(tmp: str) -> str:
    import pybind11

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    inc = [
        f"-I{cuda_home}/include",
        f"-I{ROOT}/csrc",
        f"-I{ROOT}/cuda",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    flags = ["g++", "-std=c++20", "-O1", "-fPIC", "-pthread", *inc]
    emulate = ["-include", os.path.join(HERE, "emulate.h")]
    jobs = [
        [*flags, "-x", "c++", *emulate, "-c", os.path.join(ROOT, "cuda", s), "-o", f"{tmp}/{s}.o"]
        for s in SOURCES
    ]
    jobs.append([*flags, *emulate, "-c", os.path.join(HERE, "host_support.cpp"),
                 "-o", f"{tmp}/host_support.o"])  # fmt: skip
    defines = ['-DRNNFAST_CUDA_ARCHS="90a"', '-DRNNFAST_CUDA_COMPILER_VERSION="host"',
               "-DRNNFAST_CUBLAS_HEADER_CHECKED=0"]  # fmt: skip
    jobs.append([*flags, *defines, "-c", os.path.join(ROOT, "cuda", "bindings.cpp"),
                 "-o", f"{tmp}/bindings.o"])  # fmt: skip
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for r in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs):
            if r.returncode != 0:
                sys.exit(f"build failed:\n{' '.join(r.args)}\n{r.stderr}")
    module = os.path.join(tmp, "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    objects = sorted(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".o"))
    subprocess.run(["g++", "-shared", "-pthread", "-o", module, *objects], check=True)
    return module


def main() -> int:
    c_ext = find_c_extension()
    with tempfile.TemporaryDirectory(prefix="rnnfast-emulate-") as tmp:
        module = build(tmp)
        pkg = os.path.join(tmp, "pkg", "rnnfast")
        shutil.copytree(os.path.join(ROOT, "rnnfast"), pkg,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))  # fmt: skip
        shutil.copy(c_ext, pkg)
        shutil.copy(module, pkg)
        # torch's CUDA tensors need a real GPU; the grid's "auto" half repeats the persistent
        # kernels, which run slowly here (an OS thread per GPU thread): test_persistent_* has them
        skip = ["torch", "auto"]
        init = os.path.join(pkg, "__init__.py")
        with open(init) as f:
            exported = "cuda_available" in f.read()
        if not exported:  # a tree whose package does not export it yet: the tests' probe needs it
            with open(init, "a") as f:
                f.write("\nfrom .cuda import cuda_available  # noqa: E402 (cuda/emulate/run.py)\n")
        # the emulated module needs no NVIDIA driver, which rnnfast.cuda probes for first
        cuda_py = os.path.join(pkg, "cuda.py")
        with open(cuda_py) as f:
            text = f.read()
        probe = "def _driver_loads() -> bool:\n"
        if probe in text:
            with open(cuda_py, "w") as f:
                f.write(text.replace(probe, probe + "    return True  # cuda/emulate/run.py\n", 1))
        with open(os.path.join(pkg, "ops.py")) as f:
            if "is_gpu_array" not in f.read():  # ops does not route GPU arrays yet
                skip.append("ops_dispatches")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(pkg)]))
        test = os.path.join(ROOT, "tests", "test_cuda.py")
        args = [sys.executable, "-c", BOOT, os.path.dirname(pkg), test, *sys.argv[1:]]
        if "-k" not in sys.argv:
            args += ["-k", " and ".join(f"not {k}" for k in skip)]
        return subprocess.run(args, env=env, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
