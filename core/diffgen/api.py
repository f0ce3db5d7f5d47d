"""``diffgen.inspect`` and ``diffgen.list_plugins``: what diffgen would do, and with what."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import torch

from .checkpoint import open_checkpoint
from .linear import QuantLinear
from .plan import plan
from .platform import Platform, resolve
from .plugins import CONVERTERS, QUANTIZERS, REWRITES, get_plugin_host
from .quant import layer_group, quant_request


def _claim_dict(claim) -> dict:
    return {"plugin": claim.plugin, "specificity": claim.specificity, "evidence": claim.evidence,
            "config": claim.config.to_dict()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def inspect(path, *, weights_path=None, quantization: str | None = None, quantization_ignored_layers=(),
            quantize_all_layers: bool = False, quant_backend: str | None = None, device: str | Platform | None = None,
            dtype: str | torch.dtype = "auto", allow_pickle: bool = False, enable_svdquant: bool = False,
            quantization_precision: str | None = None, quantization_rank: int | None = None,
            tp_size: int = 1, attention: str | None = None) -> dict:
    """Claims with evidence, the winning config, the per-layer plan grouped by pattern, the method
    chosen per group and why, weight bytes in 16-bit versus as planned, and the rewrites installed
    plugins offer for the model's blocks. Reads no tensor data. The plan is the one a load with the
    same arguments makes (``device`` and ``dtype`` resolve as ``load_transformer`` resolves them).
    ``path`` and ``weights_path`` may be Hugging Face repo IDs, as for ``load_transformer``.
    ``tp_size`` > 1 adds ``tensor_parallel``: the bytes each of that many tensor-parallel ranks
    would hold, and the linears whose method refuses to split (``diffgen.parallel.tensor``)."""
    from .attention import describe_attention
    from .hub import resolve_component, resolve_weights

    path = resolve_component(path, weights=weights_path is None)
    if weights_path is not None:
        weights_path = resolve_weights(weights_path)
    platform, dtype = resolve(device, dtype)
    host = get_plugin_host()
    source = open_checkpoint(path, weights_path=weights_path, allow_pickle=allow_pickle)
    request = quant_request(quantization, quantization_ignored_layers, quantize_all_layers=quantize_all_layers,
                            enable_svdquant=enable_svdquant, precision=quantization_precision, rank=quantization_rank)
    planned = plan(source, platform=platform, dtype=dtype, request=request, quant_backend=quant_backend, host=host)
    model = planned.model
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    rest = _bytes(t for n, t in planned.expected().items() if n.rpartition(".")[0] not in quant)
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_16bit = rest + sum((d.layer.in_features + d.layer.bias) * d.layer.out_features * itemsize
                             for d in planned.decisions if d.action == "quantize")
    groups: Counter = Counter()
    for d in planned.decisions:
        method = d.method.name if d.method else None
        kind = d.method.kind if d.method else None
        groups[(layer_group(d.layer.name), d.action, method, kind, d.plugin, d.reason)] += 1
    classes = Counter(type(m).__name__ for m in model.modules())
    return {
        "source": source.describe(),
        "model_class": planned.model_class,
        "platform": platform.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "claims": [_claim_dict(c) for c in planned.claims],
        "winner": _claim_dict(planned.claim) if planned.claim else None,
        "groups": [{"pattern": g, "layers": n, "action": a, "method": m, "kind": k, "plugin": p, "reason": r}
                   for (g, a, m, k, p, r), n in groups.items()],
        "layers": {"quantized": len(quant), "kept_16bit": len(planned.kept())},
        "weight_bytes": {"16bit": bytes_16bit, "planned": rest + sum(m.method.weight_bytes(m) for m in quant.values())},
        # Offered, not promised: each rewrite decides per module after the weights are loaded.
        "rewrites": [{"rewrite": r.name, "block_class": r.block_class, "modules": classes[r.block_class]}
                     for r in host.rewrites() if classes[r.block_class]],
        "attention": describe_attention(platform, attention),
        "plugin_failures": [asdict(f) for f in host.failures],
        "tensor_parallel": _tensor_parallel(planned, tp_size),
    }


def _tensor_parallel(planned, tp_size: int) -> dict | None:
    if tp_size <= 1:
        return None
    from .parallel.tensor import per_rank_bytes

    return per_rank_bytes(planned.model, tp_size, planned.expected())


def list_plugins(device: str | None = None) -> dict:
    """Every loaded plugin (name, version, hooks, platform report), the converters, quantizers and
    rewrites they publish, and every load failure."""
    host = get_plugin_host()
    platform, _ = resolve(device)
    reports = host.check_platform(platform)
    extensions = {group: {name: e.plugin for name, e in host.extensions(group).items()}
                  for group in (CONVERTERS, QUANTIZERS, REWRITES)}
    return {
        "platform": platform.to_dict(),
        "plugins": [{**asdict(info), "platform": reports[name].to_dict() if name in reports else None}
                    for name, info in sorted(host.plugins.items())],
        "extensions": extensions,
        "failures": [asdict(f) for f in host.failures],
    }
