"""The int8wo tests run against the installed plugin, as a user's diffgen would load it.

DIFFGEN_PLUGINS=int8wo keeps any other installed plugin out, so a failure here is this plugin's.
"""

from __future__ import annotations

import pytest

from diffgen.plugins import reset_plugins


@pytest.fixture(autouse=True)
def only_this_plugin(monkeypatch):
    monkeypatch.setenv("DIFFGEN_PLUGINS", "int8wo")
    for var in ("DIFFGEN_DISABLE_PLUGINS", "DIFFGEN_STRICT_PLUGINS", "DIFFGEN_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugins()
    yield
    reset_plugins()
