"""diffgen-cuda: the diffgen plugin for NVIDIA GPUs.

``plugin`` holds the hooks (entry point ``cuda`` in group ``diffgen``); ``modelopt`` detects
ModelOpt checkpoints; ``sglang_names`` maps SGLang runtime names to diffusers'; ``convert`` is
``diffgen convert modelopt-fp8``. Importing this package imports neither torch kernels nor Triton.
"""

__version__ = "0.1.0"
