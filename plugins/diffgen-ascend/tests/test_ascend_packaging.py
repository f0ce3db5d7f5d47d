"""diffgen-ascend installs as a plugin (entry point ``ascend``), publishes the ``wan`` converter,
and depends on nothing that could break ``import torch`` (torch_npu is found at run time)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffgen.cli import main

try:
    import importlib_metadata
except ImportError:
    import importlib.metadata as importlib_metadata

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_distribution_declares_the_entry_points():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == "diffgen-ascend" and project["dependencies"] == ["diffgen"]
    assert project["entry-points"]["diffgen"] == {"ascend": "diffgen_ascend.plugin"}
    assert project["entry-points"]["diffgen.converters"] == {"wan": "diffgen_ascend.repack_wan:CONVERTER"}


def test_installed_entry_points():
    eps = [ep for ep in importlib_metadata.entry_points(group="diffgen") if ep.name == "ascend"]
    assert eps, "diffgen-ascend is not installed: pip install -e ./plugins/diffgen-ascend (or diffgen[ascend])"
    assert eps[0].value == "diffgen_ascend.plugin" and eps[0].dist.name == "diffgen-ascend"


def test_plugins_lists_kernels_and_the_converter(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "ascend (diffgen-ascend" in out and "converters: wan" in out
    assert "msmodelslim-reference (PyTorch, every scheme): available" in out
    assert "msmodelslim-npu MXFP8/MXFP4/dual-scale (torch_npu, A5): unavailable: this device is cpu" in out


def test_repack_help_lists_the_converter(capsys):
    with pytest.raises(SystemExit):
        main(["repack", "--help"])
    assert "wan (plugin ascend): msmodelslim Wan2.2 output -> diffusers layout" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["repack", "wan", "--help"])
    out = capsys.readouterr().out
    assert "--model-type" in out and "--input-path" in out and "--quant-path" in out
