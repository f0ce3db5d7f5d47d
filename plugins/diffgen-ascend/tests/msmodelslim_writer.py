"""msmodelslim checkpoints written from the format's definition, for the tests.

Written independently of diffgen_ascend (it imports nothing from it, nor diffgen's numerics): the
quantizers follow msmodelslim's export rules as published (reference/ascend_rocm_formats.md 1.4,
2.1-2.2) with plain arithmetic and value tables, and ``Emulated`` computes a layer's forward from
the definition as the runtimes describe it. Output, like msmodelslim's MindIE saver:
``quant_model_weight_<type>.safetensors`` + ``quant_model_description_<type>.json`` (one flat
object: every tensor -> its type, FLOAT for 16-bit ones, plus ``model_quant_type``), and the
diffusers config.json so the folder is a transformer diffgen can load.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

E4M3_TABLE = torch.arange(0x7F).to(torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, ascending
E2M1_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# The layers each family keeps FLOAT (msmodelslim's Wan/FLUX configs keep embedders and the head).
KEEP_FLOAT = {
    "WanTransformer3DModel": re.compile(r"^(condition_embedder\..*|proj_out)$"),
    "FluxTransformer2DModel": re.compile(r"^(time_text_embed\..*|context_embedder|x_embedder|norm_out\.linear|proj_out)$"),
}


def nearest(table: torch.Tensor, a: torch.Tensor, ties: str) -> torch.Tensor:
    """Index of the table value nearest to each a >= 0; a tie goes up ("away") or to the even index."""
    d = (a[..., None] - table).abs()
    best = d.min(-1, keepdim=True).values
    candidates = (d == best)
    idx = torch.arange(len(table))
    lo = torch.where(candidates, idx, len(table)).min(-1).values
    hi = torch.where(candidates, idx, -1).max(-1).values
    if ties == "away":
        return hi
    return torch.where(lo % 2 == 0, lo, hi)


def e4m3_round(v: torch.Tensor, ties: str) -> torch.Tensor:
    a = v.abs().clamp(max=448.0)
    return (E4M3_TABLE[nearest(E4M3_TABLE, a, ties)] * torch.sign(v)).to(torch.float8_e4m3fn)


def e2m1_codes(v: torch.Tensor, ties: str) -> torch.Tensor:
    a = v.abs().clamp(max=6.0)
    return (nearest(E2M1_TABLE, a, ties) + torch.where(v < 0, 8, 0)).to(torch.uint8)


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    mag = E2M1_TABLE[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def log2_floor(x: float) -> int:
    return math.frexp(x)[1] - 1 if x > 0 else -127


def mx_weight(w: torch.Tensor, element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """msmodelslim's MX weight export: MXFP8 with the OCP floor scale, MXFP4 'minmax'
    (floor(log2(amax * 8/7 + 9.6e-7)) - 2); elements rounded half away from zero."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    amax = blocks.abs().amax(-1)
    if element == "e4m3":
        exps = [[log2_floor(float(a)) - 8 for a in row] for row in amax]
    else:
        exps = [[log2_floor(float(torch.tensor(float(a)) * 8 / 7 + 9.6e-7)) - 2 for a in row] for row in amax]
    exp = torch.tensor(exps, dtype=torch.int64).clamp(-127, 127)
    scaled = blocks / torch.pow(2.0, exp.double()).float()[..., None]
    if element == "e4m3":
        elements = e4m3_round(scaled, "away").reshape(n, k)
    else:
        elements = e2m1_codes(scaled, "away").reshape(n, k)
    return elements, (exp + 127).to(torch.uint8)


def quantize_layer(scheme: str, w: torch.Tensor, bias: torch.Tensor | None, x_range: float) -> dict:
    """One linear's tensors as msmodelslim writes them."""
    n, k = w.shape
    if scheme in ("W8A8", "W8A8_DYNAMIC", "W4A4_DYNAMIC"):
        qmax = 7 if scheme == "W4A4_DYNAMIC" else 127
        ws = w.abs().amax(1, keepdim=True) / qmax
        wq = torch.round(w / ws).clamp(-qmax, qmax).to(torch.int8)
        if scheme != "W8A8":
            return {"weight": wq, "weight_scale": ws.float(), "weight_offset": torch.zeros(n, 1)}
        # Static asymmetric activations over [-x_range, 0.6 x_range] (an asymmetric calibration).
        lo, hi = -x_range, 0.6 * x_range
        input_scale = torch.tensor([(hi - lo) / 255.0])
        input_offset = torch.tensor([float(round(-128 - lo / input_scale.item()))])
        deq = (input_scale * ws.reshape(-1)).float()
        b = bias if bias is not None else torch.zeros(n)
        quant_bias = torch.round(b.double() / deq.double() - input_offset.double() * wq.double().sum(1)).to(torch.int32)
        out = {"weight": wq, "quant_bias": quant_bias, "input_scale": input_scale, "input_offset": input_offset,
               "deq_scale": deq}
        return out
    if scheme == "W8A8_MXFP8":
        q, s = mx_weight(w, "e4m3")
        return {"weight": q, "weight_scale": s}
    if scheme == "W4A4_MXFP4":
        codes, s = mx_weight(w, "e2m1")
        return {"weight": pack(codes), "weight_scale": s}
    if scheme == "W4A4_MXFP4_DUALSCALE":
        blocks = -(-k // 512)
        wp = F.pad(w, (0, blocks * 512 - k)).reshape(n, blocks, 512)
        dual = wp.abs().amax(-1) / 6.0
        inner = (wp / dual[..., None]).reshape(n, -1)[:, :k]
        codes, s = mx_weight(inner, "e2m1")
        return {"weight": pack(codes), "weight_scale": s, "weight_dual_scale": dual[..., None].float()}
    raise ValueError(scheme)


def activation_ranges(model, inputs) -> dict[str, float]:
    """max |x| seen by each Linear on ``inputs``."""
    seen: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(
        name, max(seen.get(name, 0.0), float(args[0].abs().max()))))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(**inputs, return_dict=False)
    for h in hooks:
        h.remove()
    return seen


def write_msmodelslim(model, dst: Path, scheme: str | dict, *, smooth: tuple[str, ...] = (), deq_int64: bool = False,
                      rename=None, x_ranges: dict | None = None, seed: int = 0) -> dict:
    """Quantize ``model`` (a 16-bit diffusers transformer) to ``dst``. ``scheme``: one type for every
    linear msmodelslim would quantize, or {layer: type}. ``smooth``: layers written with the
    non-fusion smoothing wrapper (``<layer>.linear.*`` + ``<layer>.div.mul_scale``). ``rename``:
    maps each diffusers tensor name to the written one (Wan's originals). Returns
    {layer: (type, tensors)} of what was written, in diffusers names."""
    dst.mkdir(parents=True, exist_ok=True)
    keep = KEEP_FLOAT.get(type(model).__name__)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.float() for k, v in model.state_dict().items()}
    tensors, description, layers = {}, {}, {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in linears.items():
        kind = scheme.get(name, "FLOAT") if isinstance(scheme, dict) else scheme
        if not isinstance(scheme, dict) and (keep and keep.match(name) or
                                             (kind.startswith(("W8A8_MX", "W4A4_MX")) and module.in_features % 32)):
            kind = "FLOAT"
        if kind == "FLOAT":
            continue
        w = state.pop(f"{name}.weight")
        bias = state.pop(f"{name}.bias", None)
        prefix = name
        written = {}
        if name in smooth:
            mul = torch.rand(module.in_features, generator=generator) * 1.5 + 0.25
            w = w / mul
            written["mul_scale"] = mul
            tensors[f"{name}.div.mul_scale"], description[f"{name}.div.mul_scale"] = mul, "FLOAT"
            prefix = f"{name}.linear"
        ranges = x_ranges or {}
        x_range = ranges.get(name, 4.0) * (float(written["mul_scale"].max()) if "mul_scale" in written else 1.0)
        q = quantize_layer(kind, w, bias, x_range)
        if bias is not None:
            q["bias"] = bias
        written.update(q)
        for suffix, t in q.items():
            if suffix == "deq_scale" and deq_int64:
                t = t.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            tensors[f"{prefix}.{suffix}"] = t
            description[f"{prefix}.{suffix}"] = "FLOAT" if suffix == "bias" else kind
        layers[name] = (kind, written)
    for name, t in state.items():
        tensors[name], description[name] = t, "FLOAT"
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
        description = {rename(k): v for k, v in description.items()}
    kinds = sorted({k for k, _ in layers.values()})
    tag = kinds[0].lower() if len(kinds) == 1 else "mixed"
    description["model_quant_type"] = kinds[-1] if kinds else "FLOAT"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / f"quant_model_weight_{tag}.safetensors"))
    (dst / f"quant_model_description_{tag}.json").write_text(json.dumps(description, indent=1))
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    config["_class_name"] = type(model).__name__
    (dst / "config.json").write_text(json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in config.items()}, indent=1))
    return layers


class Emulated(torch.nn.Module):
    """A linear computing the scheme's definition from the written tensors (fp64 sums)."""

    def __init__(self, kind: str, t: dict, in_features: int):
        super().__init__()
        self.kind, self.t, self.k = kind, t, in_features

    def weight(self) -> torch.Tensor:
        t, kind = self.t, self.kind
        if kind == "W8A8_MXFP8":
            return (t["weight"].float().reshape(-1, self.k // 32, 32) * torch.pow(
                2.0, t["weight_scale"].double() - 127).float()[..., None]).reshape(-1, self.k)
        codes = torch.stack((t["weight"] & 15, t["weight"] >> 4), -1).reshape(t["weight"].shape[0], -1)
        v = e2m1_value(codes).reshape(codes.shape[0], -1, 32) * torch.pow(2.0, t["weight_scale"].double() - 127
                                                                          ).float()[..., None]
        v = v.reshape(codes.shape[0], -1)
        if kind == "W4A4_MXFP4_DUALSCALE":
            v = v * t["weight_dual_scale"][:, :, 0].repeat_interleave(512, 1)[:, : v.shape[1]]
        return v

    def forward(self, x):
        t, kind = self.t, self.kind
        shape = x.shape
        x = x.reshape(-1, shape[-1]).double()
        if "mul_scale" in t:
            x = x * t["mul_scale"].double()
        if kind == "W8A8":
            xq = torch.round(x.float() * (1 / t["input_scale"]) + t["input_offset"]).clamp(-128, 127).double()
            y = (xq @ t["weight"].double().T + t["quant_bias"].double()) * t["deq_scale"].double()
        elif kind in ("W8A8_DYNAMIC", "W4A4_DYNAMIC"):
            qmax = 7 if kind == "W4A4_DYNAMIC" else 127
            s = x.abs().amax(1, keepdim=True) / qmax
            xq = torch.round(x / torch.where(s > 0, s, 1)).clamp(-qmax, qmax)
            y = (xq @ t["weight"].double().T) * s * t["weight_scale"].double().reshape(1, -1)
            y = y + t["bias"].double() if "bias" in t else y
        else:
            y = mx_activations(kind, x.float()).double() @ self.weight().double().T
            y = y + t["bias"].double() if "bias" in t else y
        return y.float().reshape(*shape[:-1], -1)


def mx_activations(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Activations as the NPU ops quantize them (op docs): MXFP8 OCP floor + half-even; MXFP4
    scale_alg=2 (2^ceil(log2(amax / 7.25))) + half-away; dual-level 512/32."""
    m, k = x.shape
    if kind == "W4A4_MXFP4_DUALSCALE":
        out = torch.zeros_like(x)
        for j in range(0, k, 512):
            part = x[:, j:j + 512]
            l0 = part.abs().amax(1, keepdim=True) / 6.0
            t = part / torch.where(l0 > 0, l0, 1)
            out[:, j:j + 512] = mx_fake(t, "e2m1", "floor", "even") * l0
        return out
    if kind == "W8A8_MXFP8":
        return mx_fake(x, "e4m3", "floor", "even")
    return mx_fake(x, "e2m1", "ceil7.25", "away")


def mx_fake(x: torch.Tensor, element: str, rule: str, ties: str) -> torch.Tensor:
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1)
    exps = []
    for a in amax.flatten().tolist():
        if a == 0:
            exps.append(-127)
        elif rule == "floor":
            exps.append(log2_floor(a) - (8 if element == "e4m3" else 2))
        else:
            exps.append(math.ceil(math.log2(float(torch.tensor(a) / 7.25))))
    scale = torch.pow(2.0, torch.tensor(exps, dtype=torch.float64).clamp(-127, 127)).float().reshape(m, -1, 1)
    scaled = blocks / scale
    if element == "e4m3":
        values = e4m3_round(scaled, ties).float()
    else:
        values = e2m1_value(e2m1_codes(scaled, ties))
    return (values * scale).reshape(m, k)


def emulate(model, layers: dict) -> torch.nn.Module:
    """``model`` with every written quantized linear replaced by its Emulated definition."""
    for name, (kind, t) in layers.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Emulated(kind, t, getattr(owner, child).in_features))
    return model
