"""diffgen's tools, one module each: ``compare`` (trajectory similarity of two runs), ``bench`` (a
baseline against a candidate, stage by stage), ``quantize`` (write a quantized checkpoint with an
installed quantizer), ``convert`` (run an installed converter) and ``repack`` (rewrite a checkpoint
in the runtime layout). The last three never import the generation pipeline; nothing is imported
here, so a plugin that imports ``diffgen.tools.quantize`` pays for that module alone.
"""
