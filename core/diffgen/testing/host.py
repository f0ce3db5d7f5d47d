"""A plugin's own test suite, with the builtin plugins and that plugin only.

``only_plugin(monkeypatch, "rocm", "diffgen_rocm.plugin")`` in an autouse fixture: DIFFGEN_PLUGINS
names the plugin, the other plugin variables are cleared, and the host is built afresh. When the
distribution is not installed (no entry point: a checkout run without ``pip install -e``), the
module is registered directly, so the tests still exercise it; a packaging test checks the entry
point itself.
"""

from __future__ import annotations

import importlib

from .. import plugins
from ..plugins import PluginHost, reset_plugins


def only_plugin(monkeypatch, name: str, module: str) -> PluginHost:
    monkeypatch.setenv("DIFFGEN_PLUGINS", name)
    for var in ("DIFFGEN_DISABLE_PLUGINS", "DIFFGEN_STRICT_PLUGINS", "DIFFGEN_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugins()
    host = PluginHost().load()
    if name not in host.plugins:
        host.failures = [f for f in host.failures if f.plugin != name]
        host.register(importlib.import_module(module), name, module=module)
    monkeypatch.setattr(plugins, "_host", host)
    return host
