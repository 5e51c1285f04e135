"""Builds the API reference from the docstrings with pdoc: ``python docs/build_api.py [OUT]``
(default docs/api/; pdoc is the ``docs`` extra: pip install "rnnfast[docs]")."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import pdoc
except ImportError:
    sys.exit('the API reference needs pdoc: pip install "rnnfast[docs]" (or pip install pdoc)')

# the package and, through it, every public submodule (rnnfast.ops, rnnfast.layers ...)
MODULES = ["rnnfast"]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "api")
    pdoc.render.configure(docformat="markdown", show_source=False)
    pdoc.pdoc(*MODULES, output_directory=out)
    print(f"API reference in {out}/index.html")


if __name__ == "__main__":
    main()
