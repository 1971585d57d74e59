"""The embedded default corpus: docstrings of Python's standard library, collected at run time.

Real English technical prose that ships with every Python installation, so the default config
trains with no download. Files are read in sorted order, so the corpus is deterministic for a
given Python version.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings

_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 40:
            out.append(doc)
    return out


def python_docs(max_chars: int = 4_000_000) -> list[str]:
    """Docstrings (one document each) from the running interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    found = _docstrings(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for doc in found:
                docs.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return docs
    return docs
