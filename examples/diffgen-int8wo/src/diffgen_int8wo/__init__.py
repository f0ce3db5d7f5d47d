"""diffgen-int8wo: an example third-party diffgen plugin for int8 weight-only, per-channel checkpoints.

``plugin`` holds the hooks (entry point ``int8wo`` in group ``diffgen``), ``format`` the format's
definition, ``methods`` its linear methods and ``quantize`` the offline quantizer.
"""

__version__ = "0.1.0"
