"""diffgen-cuda: the diffgen plugin for NVIDIA GPUs.

``plugin`` holds the hooks (entry point ``cuda`` in group ``diffgen``); ``modelopt`` detects
ModelOpt checkpoints; ``sglang_names`` maps SGLang runtime names to diffusers'; ``fused`` is the
Triton FP8 linear method; ``flux1`` the FLUX.1 rewrites (group ``diffgen.rewrites``); ``convert`` is
``diffgen convert modelopt-fp8`` (group ``diffgen.converters``). Importing this package imports
neither torch kernels nor Triton.
"""

__version__ = "0.1.0"
