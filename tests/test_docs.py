"""Every Python block in README.md and docs/ runs (each file's blocks in order, in one fresh
interpreter, from a scratch directory), every `python -m rnnfast` line in their shell blocks
parses against the command line, each script in examples/ runs, and the API reference builds."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(path: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def _run(args, tmp_path, timeout=300):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path):
    script = "\n\n".join(_blocks(path, "python"))
    (tmp_path / "blocks.py").write_text(script)
    r = _run([sys.executable, "blocks.py"], tmp_path)
    assert r.returncode == 0, f"{path.name}'s Python blocks fail:\n{r.stderr[-3000:]}"


def test_shell_blocks_name_real_commands():
    from rnnfast.__main__ import _parser

    seen = 0
    for path in DOCS:
        for block in _blocks(path, "bash"):
            for line in block.splitlines():
                command = line.split("#", 1)[0].strip()
                if not command.startswith("python -m rnnfast "):
                    continue
                args = shlex.split(command)[3:]
                _parser().parse_args(args)  # SystemExit on an option that does not exist
                seen += 1
    assert seen >= 3


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(script, tmp_path):
    r = _run([sys.executable, str(script)], tmp_path)
    assert r.returncode == 0, f"{script.name} fails:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"{script.name} printed nothing"


def test_api_reference_builds(tmp_path):
    pytest.importorskip("pdoc")
    r = _run([sys.executable, str(ROOT / "docs" / "build_api.py"), str(tmp_path / "api")],
             tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("rnnfast.html", "rnnfast/ops.html", "rnnfast/layers.html",
                 "rnnfast/training.html"):  # fmt: skip
        assert (tmp_path / "api" / page).stat().st_size > 2000, page
    assert "LSTMCell" in (tmp_path / "api" / "rnnfast" / "layers.html").read_text()
