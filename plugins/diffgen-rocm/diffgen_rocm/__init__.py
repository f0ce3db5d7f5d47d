"""diffgen-rocm: MXFP4 (online ``--quantization mxfp4`` and AMD Quark checkpoints) and FP8 on MI300.

The hooks are in ``plugin``; nothing here imports aiter or touches a GPU at import time.
"""

__version__ = "0.1.0"
