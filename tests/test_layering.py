"""Imports run in one direction (../shared/DESIGN.md "Dependency direction"), and Ray stays at the edges.

An AST walk over every module of ``tierserve/`` collects every import, at module level or inside a
function (lazy imports count), absolute or relative. Each top-level part of the package has a layer;
a module may import its own part and any lower layer, never a higher one nor a sibling of its layer
(tools and routing are siblings). Ray may be imported only by actors/, routing's Serve adapter
(serve_router.py, tree_actor.py), server/ and cli.py.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tierserve"

#: bottom to top; parts in one tuple are one layer (they may not import each other)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("paths",),
    ("data", "sampling_params", "step"),
    ("kernels",),
    ("cache",),
    ("config_fields",),
    ("config_speculative",),
    ("config",),
    ("models",),
    ("offload",),
    ("engine",),
    ("tools", "routing"),
    ("actors",),
    ("server",),
    ("cli", "__init__", "__main__"),
)
RAY_ALLOWED = ("tierserve.actors", "tierserve.routing.serve_router", "tierserve.routing.tree_actor",
               "tierserve.server", "tierserve.cli")
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out.extend((node.lineno, f"{name}.{a.name}") for a in node.names if name == "tierserve")
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[pathlib.Path, str]]:
    return [(p, _module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))]


def _violations() -> tuple[list[str], list[str]]:
    upward, ray = [], []
    for path, module in _modules():
        own = _part(module)
        for line, name in _imports(path, module):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if name == "ray" or name.startswith("ray."):
                if not module.startswith(RAY_ALLOWED):
                    ray.append(f"{where} imports {name}")
                continue
            if not name.startswith("tierserve.") or _part(name) == own or own not in LAYER_OF:
                continue  # a part with no layer fails test_every_part_has_a_layer
            if _part(name) not in LAYER_OF:
                upward.append(f"{where} imports {name}, a part with no layer")
            elif LAYER_OF[_part(name)] >= LAYER_OF[own]:
                upward.append(f"{where} ({own}) imports {name} ({_part(name)})")
    return upward, ray


def test_every_part_has_a_layer():
    parts = {_part(m) for _, m in _modules() if m != "tierserve"}
    assert parts - set(LAYER_OF) == set(), "a new top-level part of tierserve needs a layer in LAYERS"


def test_imports_point_down():
    upward, _ = _violations()
    assert upward == []


def test_ray_only_at_the_edges():
    _, ray = _violations()
    assert ray == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself can fail: a lazy upward import and a relative one are both found."""
    src = tmp_path / "tierserve" / "kernels" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from tierserve.engine import llm_engine\n    from ..server import app\n"
                   "    import ray\n")
    names = [n for _, n in _imports(src, "tierserve.kernels.x")]
    assert names == ["tierserve.engine", "tierserve.server", "ray"]


@pytest.mark.parametrize("module,expected", [("tierserve.kernels.quant.q4_0", "kernels"), ("tierserve.cli", "cli"),
                                             ("tierserve", "__init__")])
def test_part_of(module, expected):
    assert _part(module) == expected
