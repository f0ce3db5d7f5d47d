"""The out-of-tree example plugin (examples/diffgen-int8wo), installed as a user would install it,
seen through `diffgen plugins`. Its own behaviour is tested by examples/diffgen-int8wo/tests."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffgen.cli import main
from diffgen.plugins import importlib_metadata, reset_plugins
from tests.plugin_fixtures import GOOD_PLUGIN, IMPORT_FAILS_PLUGIN, install_distribution

try:
    EXAMPLE = importlib_metadata.distribution("diffgen-int8wo")
except importlib_metadata.PackageNotFoundError:
    EXAMPLE = None

needs_example = pytest.mark.skipif(
    EXAMPLE is None, reason="the example plugin is not installed: pip install -e ./examples/diffgen-int8wo")


def _plugins(monkeypatch, capsys, *flags: str, allow: str | None) -> tuple[str, str]:
    if allow is None:
        monkeypatch.delenv("DIFFGEN_PLUGINS", raising=False)  # load every installed plugin, as a user does
    else:
        monkeypatch.setenv("DIFFGEN_PLUGINS", allow)
    reset_plugins()
    assert main(["plugins", *flags]) == 0
    out = capsys.readouterr()
    return out.out, out.err


@needs_example
@pytest.mark.parametrize("allow", [None, "int8wo", "diffgen-int8wo"])
def test_example_is_listed_with_its_distribution_and_hooks(monkeypatch, capsys, allow):
    out, _ = _plugins(monkeypatch, capsys, "--json", allow=allow)
    listed = {p["name"]: p for p in json.loads(out)["plugins"]}
    int8wo = listed["int8wo"]
    assert (int8wo["distribution"], int8wo["version"], int8wo["module"], int8wo["builtin"]) == \
        ("diffgen-int8wo", EXAMPLE.version, "diffgen_int8wo.plugin", False)
    assert int8wo["hooks"] == ["check_platform", "create_linear_method", "detect_quant_config", "repack_checkpoint"]
    kernels = {k["name"].split()[0]: k for k in int8wo["platform"]["kernels"]}
    assert kernels["int8wo-reference"]["available"] is True
    assert "fp8" not in listed  # builtin plugins only with --all


@needs_example
def test_example_is_left_out_when_not_allowed(monkeypatch, capsys):
    out, _ = _plugins(monkeypatch, capsys, "--json", allow="")
    assert "int8wo" not in {p["name"] for p in json.loads(out)["plugins"]}


@needs_example
def test_requirements_pin_the_installed_version(monkeypatch, capsys):
    out, err = _plugins(monkeypatch, capsys, "--requirements", allow="int8wo")
    assert out.splitlines() == [f"diffgen-int8wo=={EXAMPLE.version}"]
    assert err == ""


@needs_example
def test_requirements_from_the_installed_command():
    """The console script a user runs, in a fresh process, sees the example's entry point."""
    command = Path(sys.executable).with_name("diffgen")
    argv = [str(command)] if command.exists() else [sys.executable, "-m", "diffgen.cli"]
    result = subprocess.run([*argv, "plugins", "--requirements"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DIFFGEN_PLUGINS": "int8wo"})
    assert result.returncode == 0, result.stderr
    assert f"diffgen-int8wo=={EXAMPLE.version}" in result.stdout.splitlines()


def test_requirements_stay_pip_readable_when_a_plugin_fails(tmp_path, monkeypatch, capsys):
    """A broken plugin goes to stderr with its name and a one-line reason; stdout stays a
    requirements file, one sorted line per distribution."""
    site = tmp_path / "site-packages"
    for plugin in (GOOD_PLUGIN, IMPORT_FAILS_PLUGIN):
        install_distribution(site, plugin)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        out, err = _plugins(monkeypatch, capsys, "--requirements", allow="good,import_fails")
    finally:
        for plugin in (GOOD_PLUGIN, IMPORT_FAILS_PLUGIN):
            sys.modules.pop(plugin.module, None)
    assert out.splitlines() == ["diffgen-toy-good==0.1"]
    assert err.splitlines() == ["diffgen: plugin import_fails failed at import: ImportError: libtoy.so not found"]
