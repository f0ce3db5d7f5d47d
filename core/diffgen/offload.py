"""Offload: keep the pipeline's components, or the transformer's blocks, on the CPU until used."""

from __future__ import annotations

import torch

from .errors import DiffgenError
from .pipeline import transformer_names
from .platform import Platform


def check_offload(platform: Platform, *, dit_cpu_offload: bool = False, dit_layerwise_offload: bool = False) -> None:
    """Refuse offload settings that cannot work, before anything is loaded."""
    if dit_cpu_offload and dit_layerwise_offload:
        raise DiffgenError("--dit-cpu-offload and --dit-layerwise-offload contradict each other; choose one")
    if (dit_cpu_offload or dit_layerwise_offload) and platform.device_kind == "cpu":
        raise DiffgenError("offload moves weights between the CPU and an accelerator; this run is on the CPU")


def apply_offload(pipe, platform: Platform, *, dit_cpu_offload: bool = False,
                  dit_layerwise_offload: bool = False) -> None:
    """diffusers' model offload (whole components) or group offload (one transformer block at a
    time) on the loaded pipeline."""
    check_offload(platform, dit_cpu_offload=dit_cpu_offload, dit_layerwise_offload=dit_layerwise_offload)
    if dit_cpu_offload:
        pipe.enable_model_cpu_offload(device=platform.device)
    if dit_layerwise_offload:
        for name in transformer_names(pipe):
            pipe.components[name].enable_group_offload(
                onload_device=torch.device(platform.device), offload_device=torch.device("cpu"),
                offload_type="block_level", num_blocks_per_group=1)
