"""diffgen-cuda installs as a plugin (entry point ``cuda``) and loads on a CPU-only machine."""

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


def test_distribution_declares_the_entry_point():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["name"] == "diffgen-cuda" and project["dependencies"] == ["diffgen"]
    assert project["entry-points"]["diffgen"] == {"cuda": "diffgen_cuda.plugin"}
    assert project["entry-points"]["diffgen.converters"] == {"modelopt-fp8": "diffgen_cuda.convert:CONVERTER",
                                                             "modelopt-nvfp4": "diffgen_cuda.convert_nvfp4:CONVERTER"}
    assert project["entry-points"]["diffgen.rewrites"] == {"flux1": "diffgen_cuda.flux1:REWRITES",
                                                           "qwen_image": "diffgen_cuda.qwen_image:REWRITES",
                                                           "wan": "diffgen_cuda.wan:REWRITES",
                                                           "flux2": "diffgen_cuda.flux2:REWRITES",
                                                           "z_image": "diffgen_cuda.z_image:REWRITES",
                                                           "hunyuan_video": "diffgen_cuda.hunyuan_video:REWRITES"}


def test_installed_entry_point():
    eps = [ep for ep in importlib_metadata.entry_points(group="diffgen") if ep.name == "cuda"]
    assert eps, "diffgen-cuda is not installed: pip install -e ./plugins/diffgen-cuda (or diffgen[cuda])"
    assert eps[0].value == "diffgen_cuda.plugin" and eps[0].dist.name == "diffgen-cuda"


def test_loads_without_triton_or_cuda():
    """Importing the plugin and asking it about a CPU imports no Triton (it may not be there)."""
    code = ("import sys, diffgen_cuda.plugin as p; from diffgen.platform import detect_platform; "
            "r = p.check_platform(detect_platform('cpu')); "
            "sys.exit(1 if 'triton' in sys.modules or not r.kernels else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_diffgen_plugins_lists_it(capsys):
    assert cli_main(["plugins", "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    cuda = next(p for p in info["plugins"] if p["name"] == "cuda")
    assert cuda["hooks"] == ["check_platform", "create_linear_method", "detect_quant_config", "repack_checkpoint"]
    assert not info["failures"]
    kernel = cuda["platform"]["kernels"][0]
    assert kernel["available"] is False and "cpu" in kernel["reason"]


@pytest.mark.parametrize("allow, listed", [(None, True), ("cuda", True), ("", False)])
def test_convert_help_lists_the_converter_exactly_while_the_plugin_is_loaded(allow, listed):
    """As a user runs it: `DIFFGEN_PLUGINS= diffgen convert --help` lists no converter."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFGEN_")}
    if allow is not None:
        env["DIFFGEN_PLUGINS"] = allow
    result = subprocess.run([sys.executable, "-m", "diffgen", "convert", "--help"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert ("modelopt-fp8 (plugin cuda)" in result.stdout) is listed
    assert ("Installed converters: none" in result.stdout) is (not listed)
