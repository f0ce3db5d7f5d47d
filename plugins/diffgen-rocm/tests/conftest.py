"""The plugin's tests run with diffgen's builtin plugins and this one, nothing else installed.

Core's tests/conftest.py blanks DIFFGEN_PLUGINS; these tests live outside tests/ and set it to
"rocm" themselves. When diffgen-rocm is not installed (no entry point), the plugin module is
registered directly, so the tests still exercise it; test_packaging checks the entry point.
"""

from __future__ import annotations

import pytest

import diffgen.plugins
from diffgen.plugins import PluginHost, reset_plugins


@pytest.fixture(autouse=True)
def rocm_plugin_only(monkeypatch):
    monkeypatch.setenv("DIFFGEN_PLUGINS", "rocm")
    for var in ("DIFFGEN_DISABLE_PLUGINS", "DIFFGEN_STRICT_PLUGINS", "DIFFGEN_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugins()
    host = PluginHost().load()
    if "rocm" not in host.plugins:
        import diffgen_rocm.plugin

        host.failures = [f for f in host.failures if f.plugin != "rocm"]
        host.register(diffgen_rocm.plugin, "rocm", module="diffgen_rocm.plugin")
    monkeypatch.setattr(diffgen.plugins, "_host", host)
    yield host
    reset_plugins()
