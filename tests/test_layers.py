"""Every import inside bigjax/ runs one way along the data flow (DESIGN.md): a module imports only
modules of its own layer or lower ones, and no chain of imports comes back to where it started.
Imports inside functions count too: a cycle "broken" by a late import is still a cycle."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "bigjax")

# lowest first; a module belongs to the longest prefix listed (`hf.convert` before `hf`)
LAYERS = [
    ("errors", "paths", "config", "registry", "host_memory", "xla_cpu", "kernels"),
    ("distributed", "resume"),
    ("mesh",),
    ("models", "tasks", "tasks_image", "optim"),
    ("state", "perf", "compile_cache"),
    ("hf",),
    ("data",),
    ("step", "predict"),
    ("resolve", "build"),
    ("plan", "bench", "generate"),
    ("checkpoint", "init_from", "report", "finetune", "distill", "compress"),
    ("trainer", "hf.convert"),
    ("cli", "__init__"),
]


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, f"bigjax.{module} is in no layer of tests/test_layers.py: add it"
    return best


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "__init__" else rel] = os.path.join(dirpath, f)
    return out


def imports(path: str, known: set[str]) -> set[str]:
    """bigjax modules imported anywhere in the file (`from bigjax.x import y` counts y when it is
    a module itself)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("bigjax."):
                mod = name[len("bigjax."):]
                if mod in known:
                    found.add(mod)
        if isinstance(node, ast.ImportFrom) and node.module == "bigjax":
            found.update(a.name for a in node.names if a.name in known)
    return found


GRAPH = {m: imports(p, set(modules())) - {m} for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_its_own_layer_or_lower(module):
    upward = [m for m in GRAPH[module] if layer_of(m) > layer_of(module)
              and not module.startswith(m + ".") and not m.startswith(module + ".")]
    assert not upward, (f"bigjax.{module} (layer {layer_of(module)}) imports higher layers: "
                        f"{', '.join(f'{m} ({layer_of(m)})' for m in sorted(upward))}")


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if m.startswith(n + "."):  # a submodule runs its package's __init__ first: not a cycle
                continue
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(f"bigjax.{c}" for c in cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_data_layer_reads_no_checkpoints():
    for m in GRAPH:
        if m == "data" or m.startswith("data."):
            assert not GRAPH[m] & {"checkpoint", "init_from", "trainer"}, m
