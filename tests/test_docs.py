"""docs/plugins.md is held to the code: every hook documented with its exact arguments, and every
DIFFGEN_* environment variable the core reads listed (as datasette's test_docs does)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from diffgen import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
CORE = ROOT / "core" / "diffgen"
HOOK_HEADING = re.compile(r"^### ([a-z_][a-z0-9_]*)\((.*)\)\s*$", re.M)


def _spec_hooks() -> dict[str, list[str]]:
    """Hook name -> argument names, from the specs pluggy registered."""
    specs = {}
    for name in dir(hookspecs):
        fn = getattr(hookspecs, name)
        if callable(fn) and getattr(fn, f"{hookspecs.PROJECT}_spec", None) is not None:
            specs[name] = list(inspect.signature(fn).parameters)
    return specs


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/plugins.md has no '## {title}' section"
    return match.group(1)


@pytest.fixture(scope="module")
def docs() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_the_specs_are_the_hooks_the_host_knows():
    assert sorted(_spec_hooks()) == sorted(hookspecs.HOOK_NAMES)


def test_every_hook_is_documented_with_its_signature(docs):
    documented = {name: [a.strip() for a in args.split(",") if a.strip()]
                  for name, args in HOOK_HEADING.findall(_section(docs, "Hooks"))}
    specs = _spec_hooks()
    missing = sorted(set(specs) - set(documented))
    assert not missing, f"hooks missing from docs/plugins.md (add '### name(args)'): {missing}"
    unknown = sorted(set(documented) - set(specs))
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {unknown}"
    for name, args in specs.items():
        assert documented[name] == args, \
            f"docs/plugins.md documents {name}({', '.join(documented[name])}), the spec is {name}({', '.join(args)})"


def test_every_hook_section_says_what_it_returns(docs):
    sections = re.split(r"^### ", _section(docs, "Hooks"), flags=re.M)[1:]
    for section in sections:
        name = section.split("(", 1)[0]
        assert "Returns" in section, f"the section of {name} does not say what the hook returns"


def _env_vars_read_by_core() -> set[str]:
    """String constants that are exactly a DIFFGEN_* name, in every module of core/diffgen."""
    found = set()
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"DIFFGEN_[A-Z0-9_]+", node.value):
                found.add(node.value)
    return found


def test_every_environment_variable_is_documented(docs):
    read = _env_vars_read_by_core()
    assert {"DIFFGEN_PLUGINS", "DIFFGEN_STRICT_PLUGINS"} <= read  # the scan finds what it should
    table = _section(docs, "Environment variables")
    documented = set(re.findall(r"^\| `(DIFFGEN_[A-Z0-9_]+)` \|", table, re.M))
    missing = sorted(read - documented)
    assert not missing, f"DIFFGEN_* variables read in core/diffgen but not in docs/plugins.md: {missing}"


def test_the_example_entry_point_is_the_documented_shape():
    pyproject = (ROOT / "examples" / "diffgen-int8wo" / "pyproject.toml").read_text(encoding="utf-8")
    assert '[project.entry-points.diffgen]\nint8wo = "diffgen_int8wo.plugin"' in pyproject
    assert '[project.entry-points."diffgen.fixtures"]' in pyproject


def _signature(fn) -> str:
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    return f"{fn.__name__}({', '.join(params)})"


def test_every_extension_group_is_documented(docs):
    from diffgen import plugins

    section = _section(docs, "Extensions")
    flat = " ".join(section.split())  # a spelled name may wrap across lines
    from diffgen.attention import ATTENTION

    groups = {plugins.CONVERTERS, plugins.QUANTIZERS, plugins.REWRITES, ATTENTION}
    documented = set(re.findall(r"^### (diffgen\.[a-z_]+)\s*$", section, re.M))
    assert documented == groups, f"documented {sorted(documented)}, published {sorted(groups)}"
    from dataclasses import fields

    from diffgen.tools.convert import Converter
    from diffgen.tools.quantize import Quantizer

    for cls in (Converter, Quantizer):
        spelled = f"{cls.__name__}({', '.join(f.name for f in fields(cls))})"
        assert spelled in flat, f"docs/plugins.md does not spell {spelled}"
    from diffgen.rewrites import BlockRewrite

    for part in ("`name`", "`block_class`", "`forward_mixin`", f"`{_signature(BlockRewrite.rewrite)}`"):
        assert part in flat, f"the rewrites section does not describe {part}"


def test_the_prepared_input_contract_is_documented_method_by_method(docs):
    from diffgen.linear import PreparedInputMethod, gelu_concat, norm_modulate

    section = " ".join(_section(docs, "Prepared inputs").split())
    methods = [getattr(PreparedInputMethod, n) for n in vars(PreparedInputMethod)
               if not n.startswith("_") and callable(getattr(PreparedInputMethod, n))]
    assert len(methods) == 5
    for fn in [*methods, norm_modulate, gelu_concat]:
        assert f"`{_signature(fn)}`" in section, f"docs/plugins.md's Prepared inputs do not document {_signature(fn)}"
