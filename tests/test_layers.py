"""The package's layers, kept honest: every import of every module (top level and inside
functions) goes down a layer or stays in its own, and no set of modules imports itself round.
LAYERS below is the list of neon_scale/__init__.py and README "Layout", bottom up.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("__init__", "errors", "slurm", "fields", "dist", "console", "io", "rng", "stop", "lock",
                    "ckpt_files", "doctor")),
    ("kernels", ("kernels", "_fid_ops")),
    ("leaves", ("models", "sampling", "data", "metrics", "merge", "tracking")),
    ("specs", ("specs",)),      # the registry: specs bind the networks to the stages
    ("config", ("config",)),    # validates model args through the registry
    ("train", ("train",)),      # DeepSpeed: engine, its JSON, checkpoints, EMA
    ("stages", ("stages", "pipeline", "selection")),
    ("cli", ("cli",)),
]

# Imports allowed inside a function, each for a reason its line's comment gives: optional or slow
# packages that most commands never need (plotting, diffusers, triton, DeepSpeed's JIT ops,
# trackers), so `neon --help` and a CPU-only merge stay fast and need nothing they do not use.
LAZY_OK = {"matplotlib", "diffusers", "triton", "deepspeed", "wandb", "tensorboard", "torch.utils.tensorboard",
           "torch_fidelity", "pydantic", "scipy", "sklearn", "PIL", "torchvision", "rich"}
# cli.py is the one package module allowed to import the package lazily: each command loads only
# what it runs (torch and DeepSpeed take seconds to import; `neon --help` needs neither).
LAZY_PACKAGE_OK = {"neon_scale.cli"}
EXTENSIONS = {"neon_scale._fid_ops"}  # built from csrc/ by setup.py: no .py file to read


def layer_of(module: str, layers=LAYERS) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, heads) in enumerate(layers):
        if head in heads:
            return i
    raise KeyError(f"{module}: in no layer (add it to LAYERS in tests/test_layers.py)")


def discover(root: pathlib.Path, package: str, extra: dict[str, pathlib.Path]) -> dict[str, pathlib.Path]:
    """Module name -> file, for `package` under root and for sub-packages kept elsewhere (extra)."""
    mods = {}
    for base, prefix in [(root / package, package), *[(p, name) for name, p in extra.items()]]:
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def imports_of(module: str, path: pathlib.Path, known: set[str], package: str):
    """(target, line, inside_function, text) for each import in the file; package targets are
    resolved to the deepest module that exists (`from . import dist` -> package.dist)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src == "__future__":
                continue
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
        else:
            continue
        local = id(node) not in top and not _in_module_level_block(tree, node)
        text = ast.get_source_segment(path.read_text(), node) or ""
        for t in targets:
            out.append((t, node.lineno, local, text.splitlines()[0]))
    return out


def _in_module_level_block(tree: ast.Module, node: ast.AST) -> bool:
    """Imports under a module-level `if`/`try` (optional dependencies) count as top level."""
    for stmt in tree.body:
        if isinstance(stmt, (ast.If, ast.Try)) and any(n is node for n in ast.walk(stmt)):
            return True
    return False


def check(mods: dict[str, pathlib.Path], package: str, layers=LAYERS) -> list[str]:
    """Every violation as one line naming the file, line and import."""
    known = set(mods)
    problems, graph = [], {m: {} for m in mods}
    for mod, path in mods.items():
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for target, line, local, text in imports_of(mod, path, known, package):
            where = f"{rel}:{line}: `{text.strip()}`"
            if target == package or target.startswith(package + "."):
                if target in EXTENSIONS:
                    continue
                if target not in known:
                    problems.append(f"{where} imports {target}, which is not a module of the package")
                    continue
                if target == mod:
                    continue
                graph[mod].setdefault(target, where)
                up, down = layer_of(mod, layers), layer_of(target, layers)
                if down > up:
                    problems.append(f"{where} goes up a layer: {mod} ({layers[up][0]}) imports {target} "
                                    f"({layers[down][0]})")
                if local and mod not in LAZY_PACKAGE_OK:
                    problems.append(f"{where} imports the package inside a function (move it to the top; "
                                    f"if that makes a cycle, the layers are wrong)")
            elif local and not any(target == ok or target.startswith(ok + ".") for ok in LAZY_OK):
                problems.append(f"{where} imports {target!r} inside a function: put it at the top, "
                                f"or add it to LAZY_OK with the reason")
    problems += [f"import cycle: {c}" for c in cycles(graph)]
    return list(dict.fromkeys(problems))  # `from x import a, b` is one problem, not two


def cycles(graph: dict[str, dict[str, str]]) -> list[str]:
    """Each strongly connected component of more than one module, as one import path round it."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        members, start = set(comp), min(comp)
        path, seen, v = [start], {start}, start
        while True:  # walk inside the component back to the start, naming each import
            nxt = next((w for w in sorted(graph[v]) if w in members and (w == start or w not in seen)), None)
            if nxt is None or nxt == start:
                break
            path.append(nxt)
            seen.add(nxt)
            v = nxt
        out.append(" -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(path, path[1:] + [start])))
    return out


def package_modules() -> dict[str, pathlib.Path]:
    return discover(ROOT, "neon_scale", {"neon_scale.kernels": ROOT / "kernels"})


# ------------------------------------------------------------------------------------------ the package

def test_every_module_is_in_a_layer():
    for mod in package_modules():
        layer_of(mod)


def test_imports_go_down_and_close_no_cycle():
    problems = check(package_modules(), "neon_scale")
    assert not problems, "\n".join(problems)


def test_launchers_and_bench_use_the_package_not_each_other():
    """Shells stay shells: launchers/ import the cli, nothing imports launchers/ or bench/."""
    for path in sorted((ROOT / "neon_scale").rglob("*.py")):
        text = path.read_text()
        assert "import launchers" not in text and "from launchers" not in text, path
        assert "import bench" not in text and "from bench" not in text, path


# ------------------------------------------------------------------------------------------ the checker

def _tree(tmp_path, files: dict[str, str]) -> dict[str, pathlib.Path]:
    for name, text in files.items():
        p = tmp_path / "pkg" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return discover(tmp_path, "pkg", {})


TOY_LAYERS = [("low", ("__init__", "errors", "io")), ("mid", ("models",)), ("high", ("cli",))]


def test_the_checker_names_an_import_that_goes_up(tmp_path):
    mods = _tree(tmp_path, {"__init__.py": "", "errors.py": "", "io.py": "from .models import net\n",
                            "models/__init__.py": "", "models/net.py": "from ..errors import x\n", "cli.py": ""})
    problems = check(mods, "pkg", TOY_LAYERS)
    assert len(problems) == 1 and "io.py:1: `from .models import net` goes up a layer" in problems[0], problems


def test_the_checker_names_a_cycle_hidden_in_a_function(tmp_path):
    mods = _tree(tmp_path, {"__init__.py": "", "errors.py": "from . import io\n",
                            "io.py": "def f():\n    from .errors import E\n", "cli.py": ""})
    problems = check(mods, "pkg", TOY_LAYERS)
    assert any("inside a function" in p and "io.py:2" in p for p in problems), problems
    assert any(p.startswith("import cycle: pkg.errors") and "pkg.io" in p for p in problems), problems


def test_the_checker_lets_heavy_optional_imports_wait_and_nothing_else(tmp_path):
    mods = _tree(tmp_path, {"__init__.py": "", "errors.py": "def plot():\n    import matplotlib.pyplot\n"
                                                            "def g():\n    import json\n", "cli.py": ""})
    problems = check(mods, "pkg", TOY_LAYERS)
    assert len(problems) == 1 and "errors.py:4" in problems[0] and "'json'" in problems[0], problems


def test_the_checker_names_an_import_of_a_module_that_does_not_exist(tmp_path):
    mods = _tree(tmp_path, {"__init__.py": "", "errors.py": "def f():\n    from .vae import build\n", "cli.py": ""})
    assert any("errors.py:2" in p and "pkg.vae, which is not a module" in p for p in check(mods, "pkg", TOY_LAYERS))


@pytest.mark.parametrize("bad", ["from .cli import main\n", "import pkg.cli\n"])
def test_the_checker_sees_absolute_and_relative_imports(tmp_path, bad):
    mods = _tree(tmp_path, {"__init__.py": "", "errors.py": bad, "cli.py": ""})
    assert any("goes up a layer" in p for p in check(mods, "pkg", TOY_LAYERS))
