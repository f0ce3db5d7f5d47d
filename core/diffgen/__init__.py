"""diffgen: quantized diffusion transformers on diffusers, through plugins.

Python API: :func:`load_transformer`, :func:`load_pipeline`, :func:`inspect`,
:func:`list_plugins`, :func:`quantize`, :func:`repack`. Plugins mark their hooks with :data:`hookimpl`.
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "load_transformer", "load_pipeline", "inspect", "list_plugins", "quantize", "repack",
           "__version__"]


def __getattr__(name: str):
    # Keep `import diffgen` (and plugins importing diffgen.hookimpl) cheap: torch and diffusers
    # load only when the API is used.
    if name == "load_transformer":
        from .loader import load_transformer
        return load_transformer
    if name == "load_pipeline":
        from .pipeline import load_pipeline
        return load_pipeline
    if name in ("inspect", "list_plugins"):
        from . import api
        return getattr(api, name)
    if name == "quantize":
        from .tools.quantize import quantize
        return quantize
    if name == "repack":
        from .tools.repack import repack
        return repack
    raise AttributeError(f"module 'diffgen' has no attribute {name!r}")
