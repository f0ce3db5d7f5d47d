"""The project's shape, held to the design: no import cycle; the core names no FLUX.1 block or
attention class (plugins own model rewrites); runtime code never imports the test kit; offline
tools never import the generation pipeline."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # import name -> its directory
    "diffgen": ROOT / "core" / "diffgen",
    "diffgen_cuda": ROOT / "plugins" / "diffgen-cuda" / "diffgen_cuda",
    "diffgen_int8wo": ROOT / "examples" / "diffgen-int8wo" / "src" / "diffgen_int8wo",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = [package, *path.relative_to(directory).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in out if m in modules and m != name}


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert len(graph) > 40 and graph["diffgen.loader"]  # the scan sees the project
    assert not cycles, f"import cycles: {cycles}"


def test_the_core_names_no_flux_block_or_attention_class():
    pattern = re.compile(r"\b(FluxTransformerBlock|FluxSingleTransformerBlock|FluxAttention|FluxAttnProcessor)\b")
    core = PACKAGES["diffgen"]
    named = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in core.rglob("*.py")
             if p.parent != core / "tiny" for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not named, f"core files that name FLUX.1 block classes (rewrites belong to plugins): {named}"


def test_runtime_code_does_not_import_the_test_kit():
    modules = _modules()
    offenders = sorted(name for name, path in modules.items()
                       if not name.startswith("diffgen.testing")
                       and any(m.startswith("diffgen.testing") for m in _imports(name, path, modules)))
    assert not offenders, f"runtime modules importing diffgen.testing: {offenders}"


def test_offline_tools_do_not_import_the_generation_pipeline():
    code = ("import sys, diffgen.tools.quantize, diffgen.tools.convert, diffgen.tools.repack, "
            "diffgen.builtin.fp8; bad = [m for m in sys.modules if m.split('.')[0] == 'diffusers' "
            "or m in ('diffgen.pipeline', 'diffgen.run', 'diffgen.cli')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
