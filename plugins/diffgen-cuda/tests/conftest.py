"""The plugin's tests run with diffgen's builtin plugins and this one, nothing else installed.

Core's tests/conftest.py blanks DIFFGEN_PLUGINS; these tests live outside tests/ and set it to
"cuda" themselves. When diffgen-cuda is not installed (no entry point), the plugin module is
registered directly, so the tests still exercise it; test_packaging checks the entry point.
"""

from __future__ import annotations

import pytest

import diffgen.plugins
from diffgen.plugins import PluginHost, reset_plugins


@pytest.fixture(autouse=True)
def cuda_plugin_only(monkeypatch):
    monkeypatch.setenv("DIFFGEN_PLUGINS", "cuda")
    for var in ("DIFFGEN_DISABLE_PLUGINS", "DIFFGEN_STRICT_PLUGINS", "DIFFGEN_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugins()
    host = PluginHost().load()
    if "cuda" not in host.plugins:
        import diffgen_cuda.plugin

        host.failures = [f for f in host.failures if f.plugin != "cuda"]
        host.register(diffgen_cuda.plugin, "cuda", module="diffgen_cuda.plugin")
    monkeypatch.setattr(diffgen.plugins, "_host", host)
    yield host
    reset_plugins()
