"""The extension cache of the build (csrc/build_cache.cmake): CMake configured as scikit-build-core
configures it, without compiling, against a cache folder the test fills itself."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT = sysconfig.get_config_var("EXT_SUFFIX")


@pytest.fixture(scope="module")
def tools():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake (pip install cmake, in the test extras)")
    pybind11 = pytest.importorskip("pybind11")
    return cmake, pybind11.get_cmake_dir()


def configure(tools, build: Path, cache: Path, *extra: str) -> str:
    cmake, pybind11_dir = tools
    cmd = [cmake, "-S", str(ROOT), "-B", str(build), "-DSKBUILD=2",
           "-DSKBUILD_PROJECT_VERSION=0.1.0", "-DRNNFAST_CUDA=OFF",
           f"-DRNNFAST_BUILD_CACHE_DIR={cache}", f"-Dpybind11_DIR={pybind11_dir}",
           f"-DPython_EXECUTABLE={sys.executable}", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def key_of(output: str) -> str:
    found = re.search(r"_C: not in the build cache \(key ([0-9a-f]{24})\)", output)
    assert found, output
    return found.group(1)


@pytest.mark.slow
def test_a_cached_build_is_installed_only_while_it_matches(tools, tmp_path):
    cache = tmp_path / "cache"
    key = key_of(configure(tools, tmp_path / "b1", cache))
    # what the install would store under that key
    cache.mkdir()
    entry = cache / f"_C-{key}{EXT}"
    entry.write_bytes(b"a built module")
    (cache / f"_C-{key}{EXT}.sha256").write_text(hashlib.sha256(b"a built module").hexdigest())
    out = configure(tools, tmp_path / "b2", cache)
    assert f"_C: sources and configuration unchanged since an earlier build (key {key})" in out
    cmake = tools[0]
    subprocess.run([cmake, "--install", str(tmp_path / "b2"), "--prefix", str(tmp_path / "p")],
                   check=True, capture_output=True)  # fmt: skip
    assert (tmp_path / "p" / "rnnfast" / f"_C{EXT}").read_bytes() == b"a built module"
    # other flags are another configuration: another key, compiled
    assert key_of(configure(tools, tmp_path / "b3", cache, "-DCMAKE_CXX_FLAGS=-g")) != key
    # a damaged entry is dropped and compiled again
    entry.write_bytes(b"a build cut short")
    out = configure(tools, tmp_path / "b4", cache)
    assert "is damaged: compiling" in out and not entry.exists()
    # switched off, the cache is not read
    entry.write_bytes(b"a built module")
    out = configure(tools, tmp_path / "b5", cache, "-DRNNFAST_BUILD_CACHE=OFF")
    assert "build cache" not in out
