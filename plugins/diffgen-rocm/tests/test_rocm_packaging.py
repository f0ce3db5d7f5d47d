"""diffgen-rocm installs as a plugin (entry point ``rocm``), depends on no PyPI ``aiter``, and
loads on a machine without ROCm, aiter, Triton or diffgen-cuda; the conformance suite passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffgen.cli import main as cli_main

try:
    import importlib_metadata
except ImportError:
    import importlib.metadata as importlib_metadata

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_distribution_declares_the_entry_point_and_no_aiter():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == "diffgen-rocm" and project["dependencies"] == ["diffgen"]
    assert project["entry-points"]["diffgen"] == {"rocm": "diffgen_rocm.plugin"}
    assert project["entry-points"]["diffgen.fixtures"] == {"quark-mxfp4": "diffgen_rocm.quark_fixture:write_quark_mxfp4"}
    assert not any("aiter" in dep for deps in project.get("optional-dependencies", {}).values() for dep in deps)


def test_installed_entry_point():
    eps = [ep for ep in importlib_metadata.entry_points(group="diffgen") if ep.name == "rocm"]
    assert eps, "diffgen-rocm is not installed: pip install -e ./plugins/diffgen-rocm (or diffgen[rocm])"
    assert eps[0].value == "diffgen_rocm.plugin" and eps[0].dist.name == "diffgen-rocm"


def test_loads_without_aiter_triton_or_diffgen_cuda():
    """Importing the plugin and asking it about a CPU imports none of the optional libraries."""
    code = ("import sys, diffgen_rocm.plugin as p; from diffgen.platform import detect_platform; "
            "r = p.check_platform(detect_platform('cpu')); "
            "bad = [m for m in ('aiter', 'triton') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad or not r.kernels else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_diffgen_plugins_lists_it_with_each_kernel_and_reason(capsys):
    assert cli_main(["plugins", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    rocm = next(p for p in info["plugins"] if p["name"] == "rocm")
    assert rocm["hooks"] == ["check_platform", "create_linear_method", "detect_quant_config", "repack_checkpoint"]
    assert not info["failures"]
    aiter = rocm["platform"]["kernels"][0]
    assert aiter["name"].startswith("mxfp4-aiter-a4w4") and not aiter["available"] and "cpu" in aiter["reason"]

