"""Offload: keep the transformers, the whole pipeline, or the transformer's blocks on the CPU until used.

``dit_cpu_offload`` is SGLang-Diffusion's ``--dit-cpu-offload``: only the diffusion transformer(s)
wait on the CPU; each moves to the device when its forward starts and back when the VAE decodes,
so the text encoders and the VAE stay resident. ``pipeline_cpu_offload`` is diffusers' model
offload of every component, one at a time; ``dit_layerwise_offload`` streams one transformer block
at a time (diffusers' group offload).
"""

from __future__ import annotations

import torch

from .errors import DiffgenError
from .pipeline import transformer_names
from .platform import Platform

FLAGS = {"dit_cpu_offload": "--dit-cpu-offload", "pipeline_cpu_offload": "--pipeline-cpu-offload",
         "dit_layerwise_offload": "--dit-layerwise-offload"}


def check_offload(platform: Platform, **chosen: bool) -> None:
    """Refuse offload settings that cannot work, before anything is loaded."""
    on = [FLAGS[k] for k, v in chosen.items() if v]
    if len(on) > 1:
        raise DiffgenError(f"{' and '.join(on)} contradict each other; choose one")
    if on and platform.device_kind == "cpu":
        raise DiffgenError(f"{on[0]} moves weights between the CPU and an accelerator; this run is on the CPU")


def apply_offload(pipe, platform: Platform, *, dit_cpu_offload: bool = False, pipeline_cpu_offload: bool = False,
                  dit_layerwise_offload: bool = False) -> None:
    check_offload(platform, dit_cpu_offload=dit_cpu_offload, pipeline_cpu_offload=pipeline_cpu_offload,
                  dit_layerwise_offload=dit_layerwise_offload)
    if pipeline_cpu_offload:
        pipe.enable_model_cpu_offload(device=platform.device)
    if dit_cpu_offload:
        offload_transformers(pipe, torch.device(platform.device))
    if dit_layerwise_offload:
        for name in transformer_names(pipe):
            pipe.components[name].enable_group_offload(
                onload_device=torch.device(platform.device), offload_device=torch.device("cpu"),
                offload_type="block_level", num_blocks_per_group=1)


def offload_transformers(pipe, device: torch.device) -> None:
    """Each transformer to the CPU now, onto ``device`` when its forward starts, and every one back
    to the CPU when the VAE decodes (or the next transformer starts: Wan2.2 runs two in turn)."""
    transformers = [pipe.components[n] for n in transformer_names(pipe)]
    on_device: set[int] = set()  # id() of the transformers now on ``device``

    def to_cpu(except_for=None) -> None:
        for model in transformers:
            if model is not except_for and id(model) in on_device:
                model.to("cpu")
                on_device.discard(id(model))

    def onload(model, args, kwargs):
        to_cpu(except_for=model)
        if id(model) not in on_device:
            model.to(device)
            on_device.add(id(model))

    for model in transformers:
        model.to("cpu")
        model.register_forward_pre_hook(onload, with_kwargs=True)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        decode = vae.decode

        def decode_after_offload(*args, **kwargs):
            to_cpu()
            return decode(*args, **kwargs)

        vae.decode = decode_after_offload
