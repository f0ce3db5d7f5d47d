"""diffgen's tools: ``compare`` (trajectory similarity of two runs), ``bench`` (a baseline against a
candidate, stage by stage) and ``quantize`` (write an fp8 checkpoint).

``compare`` and ``bench`` are imported here, not bound lazily: each shares its name with its
module, and importing a submodule rebinds the package attribute to the module, so a lazy binding
would turn ``diffgen.tools.compare`` into a module as soon as anything imported
``diffgen.tools.compare`` directly (the CLI does). Importing them costs torch, which any use of a
tool needs anyway; ``import diffgen`` and ``diffgen --help`` do not import this package.
"""

from ..generate import SamplingArgs
from .bench import BenchConfig, ConfigMismatchError, bench
from .compare import compare
from .sides import PipelineConfig, PipelineFactory

__all__ = ["compare", "bench", "BenchConfig", "ConfigMismatchError", "PipelineConfig", "PipelineFactory",
           "SamplingArgs"]
