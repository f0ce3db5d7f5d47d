"""diffgen-int8wo: an example third-party diffgen plugin for int8 weight-only, per-channel checkpoints.

``plugin`` holds the hooks (entry point ``int8wo`` in group ``diffgen``), ``format`` the format's
definition and ``methods`` its linear methods. Published beside the hooks: ``quantize`` (the
quantizer behind ``diffgen quantize --quantization int8wo``), ``quanto`` (``diffgen convert
int8wo-from-quanto``) and ``rewrites`` (Wan's attention projections fused after loading).
"""

__version__ = "0.1.0"
