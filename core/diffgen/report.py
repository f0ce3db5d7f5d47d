"""What a loaded pipeline is made of, for ``perf.json`` and ``diffgen bench``: the method that runs
each layer group, the rewritten modules, weight bytes, peak memory."""

from __future__ import annotations

import resource
import sys

import torch

from .linear import QuantLinear
from .quant import layer_group


def layer_methods(pipe) -> dict[str, dict[str, str]]:
    """component -> layer group -> the method that runs it."""
    out: dict[str, dict[str, str]] = {}
    for name, component in pipe.components.items():
        plan = getattr(component, "diffgen_plan", None)
        if plan is not None:
            out[name] = {layer_group(d.layer.name): (d.method.name if d.method else "16-bit") for d in plan.decisions}
    return out


def rewrites(pipe) -> dict[str, dict[str, str]]:
    """component -> module -> the plugin rewrite it runs (diffgen.rewrites)."""
    return {name: dict(found) for name, component in pipe.components.items()
            if (found := getattr(component, "diffgen_rewrites", None))}


def attention(pipe) -> dict[str, dict]:
    """component -> the attention backend it runs, modules routed, calls and fallbacks (diffgen.attention)."""
    return {name: stats.to_dict() for name, component in pipe.components.items()
            if (stats := getattr(component, "diffgen_attention", None)) is not None}


def weight_bytes(pipe) -> dict[str, int]:
    out = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            total = 0
            for module in component.modules():
                if isinstance(module, QuantLinear):
                    total += module.method.weight_bytes(module)
                    continue
                for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    total += t.numel() * t.element_size()
            out[name] = total
    return out


def peak_host_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_device_bytes(platform) -> int | None:
    return torch.cuda.max_memory_allocated() if platform.device_kind == "cuda" else None


def default_kept_lines(pipe) -> list[str]:
    """One line per transformer whose online quantization kept layers 16-bit by diffgen's default."""
    from .plan import DEFAULT_KEPT

    lines = []
    for name, component in pipe.components.items():
        plan = getattr(component, "diffgen_plan", None)
        kept = [d.layer.name for d in plan.decisions if d.reason.startswith(DEFAULT_KEPT)] if plan else []
        if kept:
            groups = sorted({layer_group(n) for n in kept})
            lines.append(f"diffgen: {name}: kept {len(kept)} precision-sensitive layers 16-bit "
                         f"({', '.join(groups)}); --quantize-all-layers quantizes them too")
    return lines


def attention_fallback_lines(pipe) -> list[str]:
    """One line per component whose routed attention backend handed eager calls back to diffusers'
    attention (a backend may refuse a shape, a mask, or a length where it is slower), with the reasons:
    asking for a backend and silently getting SDPA would mislead."""
    lines = []
    for name, stats in attention(pipe).items():
        fallbacks = stats["fallbacks"]
        if not fallbacks:
            continue
        total = stats["calls"] + sum(fallbacks.values())
        reasons = "; ".join(f"{count} x {reason}" for reason, count in
                            sorted(fallbacks.items(), key=lambda item: -item[1]))
        lines.append(f"diffgen: {name}: --attention {stats['backend']} ran {stats['calls']} of {total} attention "
                     f"calls; the rest ran diffusers' attention: {reasons}")
    return lines


def pipeline_report(pipe) -> dict:
    """The parts of a run's report that describe the loaded pipeline."""
    return {"weight_bytes": weight_bytes(pipe), "methods": layer_methods(pipe), "rewrites": rewrites(pipe),
            "attention": attention(pipe)}
