"""The plugin's tests run with diffgen's builtin plugins and this one, nothing else installed.

Core's tests/conftest.py blanks DIFFGEN_PLUGINS; these tests live outside tests/ and set it to
"rocm" themselves. When diffgen-rocm is not installed (no entry point), the plugin module is
registered directly, so the tests still exercise it; test_packaging checks the entry point.
"""

from __future__ import annotations

import pytest

from diffgen.plugins import reset_plugins
from diffgen.testing.host import only_plugin


@pytest.fixture(autouse=True)
def rocm_plugin_only(monkeypatch):
    yield only_plugin(monkeypatch, "rocm", "diffgen_rocm.plugin")
    reset_plugins()
