"""``diffgen.inspect`` and ``diffgen.list_plugins``: what diffgen would do, and with what."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import torch

from .checkpoint import open_checkpoint
from .linear import QuantLinear
from .loader import apply_plan, build_meta_model, expected_tensors, plan_model
from .platform import detect_platform
from .plugins import get_plugin_host
from .quant import QuantRequest, layer_group


def _claim_dict(claim) -> dict:
    return {"plugin": claim.plugin, "specificity": claim.specificity, "evidence": claim.evidence,
            "config": claim.config.to_dict()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def inspect(path, *, weights_path=None, quantization: str | None = None, quantization_ignored_layers=(),
            quant_backend: str | None = None, device: str | None = None,
            dtype: torch.dtype = torch.bfloat16, allow_pickle: bool = False) -> dict:
    """Claims with evidence, the winning config, the per-layer plan grouped by pattern, the method
    chosen per group and why, and weight bytes in 16-bit versus as planned. Reads no tensor data."""
    source = open_checkpoint(path, weights_path=weights_path, allow_pickle=allow_pickle)
    request = QuantRequest(quantization, tuple(quantization_ignored_layers)) if quantization else None
    model = build_meta_model(source)
    plan = plan_model(model, source, request=request, quant_backend=quant_backend, device=device, dtype=dtype)
    bytes_16bit = _bytes(expected_tensors(model, dtype).values())
    apply_plan(model, plan)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    planned = sum(m.method.weight_bytes(m) for m in quant.values()) + _bytes(
        t for n, t in expected_tensors(model, dtype).items() if n.rpartition(".")[0] not in quant)
    groups: Counter = Counter()
    for d in plan.decisions:
        method = d.method.name if d.method else None
        kind = d.method.kind if d.method else None
        groups[(layer_group(d.layer.name), d.action, method, kind, d.plugin, d.reason)] += 1
    return {
        "source": source.describe(),
        "model_class": plan.model_class,
        "platform": plan.platform.to_dict(),
        "claims": [_claim_dict(c) for c in plan.claims],
        "winner": _claim_dict(plan.claim) if plan.claim else None,
        "groups": [{"pattern": g, "layers": n, "action": a, "method": m, "kind": k, "plugin": p, "reason": r}
                   for (g, a, m, k, p, r), n in groups.items()],
        "layers": {"quantized": sum(d.action == "quantize" for d in plan.decisions),
                   "kept_16bit": sum(d.action == "keep" for d in plan.decisions)},
        "weight_bytes": {"16bit": bytes_16bit, "planned": planned},
        "plugin_failures": [asdict(f) for f in plan.plugin_failures],
    }


def list_plugins(device: str | None = None) -> dict:
    """Every loaded plugin (name, version, hooks, platform report) and every load failure."""
    host = get_plugin_host()
    platform = detect_platform(device)
    reports = host.check_platform(platform)
    return {
        "platform": platform.to_dict(),
        "plugins": [{**asdict(info), "platform": reports[name].to_dict() if name in reports else None}
                    for name, info in sorted(host.plugins.items())],
        "failures": [asdict(f) for f in host.failures],
    }
