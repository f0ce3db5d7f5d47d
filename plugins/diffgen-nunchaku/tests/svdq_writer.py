"""Tiny SVDQuant checkpoints in nunchaku's layout, written from the format's definition.

Independent of diffgen_nunchaku on purpose: the packers below compute each element's storage
position with index arithmetic from the documented layout (shared/reference/nunchaku.md 2.3-2.4),
where the plugin reshapes and permutes. ``quantize_model`` turns a 16-bit diffusers transformer
into nunchaku's tensors and keeps, per diffusers linear, the logical values (``Record``) that a
test computes its expected outputs from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

SHIFT = 0.171875
E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


# -- packers ----------------------------------------------------------------------------------
def _words_to_bytes(words: torch.Tensor, dtype) -> torch.Tensor:
    return torch.from_numpy(words.numpy().astype(dtype).view("int8").copy())


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] nibbles 0..15 -> int8 [N, K/2]."""
    n_, k_ = codes.shape
    n, k = torch.meshgrid(torch.arange(n_), torch.arange(k_), indexing="ij")
    nt, np_, nps, nl = n // 128, (n % 128) // 16, (n % 16) // 8, n % 8
    kt, kps, kl, r = k // 64, (k % 64) // 32, (k % 32) // 8, k % 8
    word = (((((nt * (k_ // 64) + kt) * 8 + np_) * 8 + nl) * 4 + kl) * 2 + nps) * 2 + kps
    nibbles = torch.zeros(n_ * k_ // 8, 8, dtype=torch.int64)
    nibbles[word.flatten(), r.flatten()] = codes.long().flatten()
    words = (nibbles << torch.arange(0, 32, 4)).sum(-1)  # nibble r at bits 4r
    return _words_to_bytes(words, "<u4").reshape(n_, k_ // 2)


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [G, N] with n = nt*128 + a*16 + b*8 + c*2 + d stored [nt][g][a][c][b][d]."""
    n_, g_ = s.shape
    n, g = torch.meshgrid(torch.arange(n_), torch.arange(g_), indexing="ij")
    nt, a, b, c, d = n // 128, (n % 128) // 16, (n % 16) // 8, (n % 8) // 2, n % 2
    flat = ((((nt * g_ + g) * 8 + a) * 4 + c) * 2 + b) * 2 + d
    out = torch.empty(n_ * g_, dtype=s.dtype)
    out[flat.flatten()] = s.flatten()
    return out.reshape(g_, n_)


def pack_fp4_scales(s: torch.Tensor) -> torch.Tensor:
    """fp8 [N, K/16] -> [K/16, N] stored [nt][kb][y][x][sp][g4], n = nt*128 + sp*32 + x*8 + y."""
    n_, g_ = s.shape
    n, g = torch.meshgrid(torch.arange(n_), torch.arange(g_), indexing="ij")
    nt, sp, x, y, kb, g4 = n // 128, (n % 128) // 32, (n % 32) // 8, n % 8, g // 4, g % 4
    flat = ((((nt * (g_ // 4) + kb) * 8 + y) * 4 + x) * 4 + sp) * 4 + g4
    out = torch.empty(n_ * g_, dtype=torch.uint8)
    out[flat.flatten()] = s.view(torch.uint8).flatten()
    return out.view(torch.float8_e4m3fn).reshape(g_, n_)


def pack_lowrank(m: torch.Tensor, down: bool) -> torch.Tensor:
    """down: [r, K] -> stored [K, r], tiles (K tile, r tile); up: [N, r] stored as is, tiles (N, r)."""
    rows_, cols_ = m.shape
    row, col = torch.meshgrid(torch.arange(rows_), torch.arange(cols_), indexing="ij")
    rt, ct = row // 16, col // 16
    nps, nl, kps, kl, rk = (row % 16) // 8, row % 8, (col % 16) // 8, (col % 8) // 2, col % 2
    tile = ct * (rows_ // 16) + rt if down else rt * (cols_ // 16) + ct
    flat = tile * 256 + (((nl * 4 + kl) * 2 + nps) * 2 + kps) * 2 + rk
    out = torch.empty(rows_ * cols_, dtype=m.dtype)
    out[flat.flatten()] = m.flatten()
    return out.reshape(cols_, rows_) if down else out.reshape(rows_, cols_)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """unsigned codes [N, K] -> int32 [N/4, K/2] (TinyChat: int16 words of k = j, j+8, j+16, j+24)."""
    n_, k_ = codes.shape
    n, k = torch.meshgrid(torch.arange(n_), torch.arange(k_), indexing="ij")
    w16 = ((k % 64) // 32) * 8 + (k % 32) % 8
    flat = ((n // 4 * (k_ // 64) + k // 64) * 4 + n % 4) * 16 + w16
    words = torch.zeros(n_ * k_ // 4, dtype=torch.int64)
    words.index_put_((flat.flatten(),), (codes.long() << (4 * ((k % 32) // 8))).flatten(), accumulate=True)
    return _words_to_bytes(words, "<u2").view(torch.int32).reshape(n_ // 4, k_ // 2)


def to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (ties need no care: random data)."""
    return (x.unsqueeze(-1) - E2M1).abs().argmin(-1)


# -- quantizer --------------------------------------------------------------------------------
@dataclass
class Record:
    """The logical values of one diffusers linear (rows of a fused one; parts of proj_out)."""

    codes: torch.Tensor  # [N, K] int (signed int4 values or E2M1 codes); AWQ: unsigned
    scales: torch.Tensor  # [N, K/G] float (fp4: already times wtscale)
    smooth: torch.Tensor | None = None
    down: torch.Tensor | None = None  # [r, K] = L2 / smooth
    up: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # the bias nunchaku stores (shift taken out)
    unsigned: list = field(default_factory=list)  # per part: (k0, k1, unsigned)
    zeros: torch.Tensor | None = None  # AWQ


def quantize_svdq(w: torch.Tensor, b: torch.Tensor | None, rank: int, precision: str, unsigned: bool,
                  gen: torch.Generator, wtscale_dtype: torch.dtype = torch.float32) -> tuple[dict, Record]:
    """One SVDQ W4A4 linear: nunchaku tensors (python leaf names) and its logical record; the
    nvfp4 per-tensor scale is stored (and so first rounded) in ``wtscale_dtype``."""
    n, k = w.shape
    w = w.double()
    smooth = (w.abs().amax(0).clamp(min=1e-3) ** 0.5 * (0.5 + torch.rand(k, generator=gen, dtype=torch.float64)))
    smooth = smooth.to(torch.bfloat16).double()
    what = w * smooth
    # any rank-r factors define a valid checkpoint (R is what they leave); a fast approximate SVD will do
    u, s, v = torch.svd_lowrank(what.float(), q=rank + 4, niter=1, M=None)
    up = (u[:, :rank] * s[:rank]).to(torch.bfloat16).double()
    l2 = v[:, :rank].t().to(torch.bfloat16).double()
    res = what - up @ l2
    if precision == "int4":
        blocks = res.reshape(n, k // 64, 64)
        scales = (blocks.abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
        codes = torch.round(blocks / scales.double()[..., None]).clamp(-8, 7).reshape(n, k)
        deq = (codes.reshape(n, k // 64, 64) * scales.double()[..., None]).reshape(n, k)
        tensors = {"qweight": pack_qweight(codes.long() & 0xF), "wscales": pack_scales(scales)}
        logical_scales = scales.double()
    else:
        wtscale = float(torch.tensor(float(res.abs().max() / (6 * 448))).to(wtscale_dtype))
        blocks = res.reshape(n, k // 16, 16)
        fp8 = (blocks.abs().amax(-1) / 6 / wtscale).clamp(max=448).to(torch.float8_e4m3fn)
        denom = fp8.double().clamp(min=1e-12)[..., None] * wtscale
        codes = to_e2m1(blocks / denom).reshape(n, k)
        logical_scales = fp8.double() * wtscale
        deq = (E2M1.double()[codes].reshape(n, k // 16, 16) * logical_scales[..., None]).reshape(n, k)
        tensors = {"qweight": pack_qweight(codes), "wscales": pack_fp4_scales(fp8),
                   "wcscales": torch.ones(n, dtype=torch.bfloat16), "wtscale": torch.tensor([wtscale], dtype=wtscale_dtype)}
    bias = torch.zeros(n, dtype=torch.float64) if b is None else b.double()
    if unsigned:
        bias = bias - SHIFT * (deq / smooth).sum(1)
    bias = bias.to(torch.bfloat16)
    down = (l2 / smooth).to(torch.bfloat16)
    tensors.update({"bias": pack_scales(bias[:, None]).reshape(-1), "smooth_factor": pack_scales(smooth.to(torch.bfloat16)[:, None]).reshape(-1),
                    "smooth_factor_orig": pack_scales(smooth.to(torch.bfloat16)[:, None]).reshape(-1),
                    "proj_down": pack_lowrank(down, down=True), "proj_up": pack_lowrank(up.to(torch.bfloat16), down=False)})
    if "wcscales" in tensors:
        tensors["wcscales"] = pack_scales(tensors["wcscales"][:, None]).reshape(-1)
    record = Record(codes.long(), logical_scales, smooth, down.double(), up, bias.double(), [(0, k, unsigned)])
    return tensors, record


def quantize_awq(w: torch.Tensor, b: torch.Tensor, chunks: int) -> tuple[dict, Record]:
    """An AWQ W4A16 modulation linear: uint4 with zero point 7, rows interleaved, +1 in the scale chunks."""
    n, k = w.shape
    blocks = w.double().reshape(n, k // 64, 64)
    scales = (blocks.abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
    codes = (torch.round(blocks / scales.double()[..., None]) + 7).clamp(0, 15).reshape(n, k).long()
    zeros = (-7 * scales.double()).to(torch.bfloat16)
    dim = n // chunks
    stored_row = torch.arange(n).reshape(chunks, dim).t().reshape(-1)  # stored row d*chunks + c <- row c*dim + d
    bias = b.double().clone()
    for c in {1, chunks - 2}:
        bias[c * dim:(c + 1) * dim] += 1
    stored_bias = bias.to(torch.bfloat16)
    tensors = {"qweight": pack_awq(codes[stored_row]), "wscales": scales[stored_row].t().contiguous(),
               "wzeros": zeros[stored_row].t().contiguous(), "bias": stored_bias[stored_row]}
    bias = stored_bias.double()  # what the file says, "+1" taken out again
    for c in {1, chunks - 2}:
        bias[c * dim:(c + 1) * dim] -= 1
    return tensors, Record(codes, scales.double(), bias=bias, zeros=zeros.double())


def write(path, tensors: dict, metadata: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})


# -- whole models -----------------------------------------------------------------------------
CPP_LEAVES = {"smooth_factor": "smooth", "smooth_factor_orig": "smooth_orig", "proj_down": "lora_down",
              "proj_up": "lora_up"}
NUNCHAKU_CLASS = {"FluxTransformer2DModel": "NunchakuFluxTransformer2dModel",
                  "QwenImageTransformer2DModel": "NunchakuQwenImageTransformer2DModel",
                  "ZImageTransformer2DModel": "NunchakuZImageTransformer2DModel"}


def _entries(model) -> list[tuple]:
    """(kind, nunchaku module, diffusers sources, extra) for every quantized nunchaku linear."""
    cls, cfg, out = type(model).__name__, model.config, []
    qkv = [f"attn.to_{x}" for x in "qkv"]
    add = [f"attn.add_{x}_proj" for x in "qkv"]
    if cls == "FluxTransformer2DModel":  # the C++ names of deepcompressor's FLUX.1 export
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        for i in range(cfg.num_layers):
            p = f"transformer_blocks.{i}"
            for name, src, u in [("qkv_proj", qkv, 0), ("qkv_proj_context", add, 0), ("out_proj", ["attn.to_out.0"], 0),
                                 ("out_proj_context", ["attn.to_add_out"], 0), ("mlp_fc1", ["ff.net.0.proj"], 0),
                                 ("mlp_fc2", ["ff.net.2"], 1), ("mlp_context_fc1", ["ff_context.net.0.proj"], 0),
                                 ("mlp_context_fc2", ["ff_context.net.2"], 1)]:
                out.append(("svdq", f"{p}.{name}", [f"{p}.{s}" for s in src], u))
            out += [("awq", f"{p}.norm1.linear", [f"{p}.norm1.linear"], 6),
                    ("awq", f"{p}.norm1_context.linear", [f"{p}.norm1_context.linear"], 6)]
            out += [("rename", f"{p}.{n}", [f"{p}.attn.{n}"], 0) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
        for i in range(cfg.num_single_layers):
            p = f"single_transformer_blocks.{i}"
            out += [("svdq", f"{p}.qkv_proj", [f"{p}.{s}" for s in qkv], 0), ("svdq", f"{p}.mlp_fc1", [f"{p}.proj_mlp"], 0),
                    ("part", f"{p}.out_proj", [f"{p}.proj_out"], (0, inner, 0)),
                    ("part", f"{p}.mlp_fc2", [f"{p}.proj_out"], (inner, None, 1)),
                    ("awq", f"{p}.norm.linear", [f"{p}.norm.linear"], 3)]
            out += [("rename", f"{p}.{n}", [f"{p}.attn.{n}"], 0) for n in ("norm_q", "norm_k")]
    elif cls == "QwenImageTransformer2DModel":
        for i in range(cfg.num_layers):
            p = f"transformer_blocks.{i}"
            out += [("svdq", f"{p}.attn.to_qkv", [f"{p}.{s}" for s in qkv], 0),
                    ("svdq", f"{p}.attn.add_qkv_proj", [f"{p}.{s}" for s in add], 0)]
            out += [("svdq", f"{p}.{n}", [f"{p}.{n}"], n.endswith("net.2")) for n in
                    ("attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                     "txt_mlp.net.0.proj", "txt_mlp.net.2")]
            out += [("awq", f"{p}.{m}.1", [f"{p}.{m}.1"], 6) for m in ("img_mod", "txt_mod")]
    elif cls == "ZImageTransformer2DModel":
        blocks = [f"layers.{i}" for i in range(cfg.n_layers)] + \
                 [f"{r}.{i}" for r in ("noise_refiner", "context_refiner") for i in range(cfg.n_refiner_layers)]
        for p in blocks:
            out += [("svdq", f"{p}.attention.to_qkv", [f"{p}.attention.to_{x}" for x in "qkv"], 0),
                    ("svdq", f"{p}.attention.to_out.0", [f"{p}.attention.to_out.0"], 0),
                    ("svdq", f"{p}.feed_forward.net.0.proj", [f"{p}.feed_forward.w3", f"{p}.feed_forward.w1"], 0),
                    ("svdq", f"{p}.feed_forward.net.2", [f"{p}.feed_forward.w2"], 0)]
    return out


def quantize_model(model, precision: str = "int4", rank: int = 16, seed: int = 0, cpp_names: bool | None = None):
    """nunchaku's tensors for ``model`` and the logical Record of every quantized diffusers linear."""
    gen = torch.Generator().manual_seed(seed)
    cls = type(model).__name__
    cpp = cls == "FluxTransformer2DModel" if cpp_names is None else cpp_names
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    used, tensors, records = set(), {}, {}
    halves: dict[str, list] = {}
    for kind, name, sources, extra in _entries(model):
        if kind == "rename":
            tensors[f"{name}.weight"] = state[f"{sources[0]}.weight"].to(torch.bfloat16)
            used.add(f"{sources[0]}.weight")
            continue
        w = torch.cat([state[f"{s}.weight"] for s in sources])
        has_bias = f"{sources[0]}.bias" in state
        b = torch.cat([state[f"{s}.bias"] for s in sources]) if has_bias else None
        used.update(f"{s}.{leaf}" for s in sources for leaf in ("weight", "bias"))
        if kind == "awq":
            t, rec = quantize_awq(w, b, extra)
            records[sources[0]] = rec
        else:
            if kind == "part":
                lo, hi, u = extra
                w, u = w[:, lo:hi], bool(u) and precision == "int4"
                b = b if lo == 0 else None
            else:
                u = bool(extra) and precision == "int4"
            t, rec = quantize_svdq(w, b, rank, precision, u, gen)
            if kind == "part":
                halves.setdefault(sources[0], []).append((lo, rec))
            else:
                rows = [state[f"{s}.weight"].shape[0] for s in sources]
                for s, r0, r1 in zip(sources, [0, *torch.tensor(rows).cumsum(0)[:-1].tolist()], torch.tensor(rows).cumsum(0).tolist()):
                    records[s] = Record(rec.codes[r0:r1], rec.scales[r0:r1], rec.smooth, rec.down, rec.up[r0:r1],
                                        rec.bias[r0:r1] if has_bias else None, rec.unsigned)
            if cpp:
                t = {CPP_LEAVES.get(k, k): v for k, v in t.items()}
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    for target, parts in halves.items():
        (_, a), (lo, b) = sorted(parts, key=lambda p: p[0])
        down = torch.block_diag(a.down, b.down)
        records[target] = Record(torch.cat([a.codes, b.codes], 1), torch.cat([a.scales, b.scales], 1),
                                 torch.cat([a.smooth, b.smooth]), down, torch.cat([a.up, b.up], 1), a.bias + b.bias,
                                 [(0, lo, a.unsigned[0][2]), (lo, lo + b.codes.shape[1], b.unsigned[0][2])])
    for k, v in state.items():
        if k not in used:
            tensors[k] = v.to(torch.bfloat16)
    return tensors, records


def quantize_model_lite(model, precision: str = "int4", rank: int = 16, seed: int = 0):
    """diffusers' nunchaku_lite form of ``model``: nunchaku's packed tensors per diffusers linear
    (SVDQ W4A4 for the blocks' linears whose sizes nunchaku's packer takes, AWQ W4A16 for the
    modulation linears; no unsigned activations), the quantization_config diffusers reads, and the
    logical Record of every quantized linear. Tensors as diffusers' SVDQW4A4Linear and
    AWQW4A16Linear hold them: no smooth_factor_orig, wcscales [N] and wtscale [1] in bf16."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors, records, targets = {}, {}, {"svdq": [], "awq": []}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "blocks" not in name:
            continue
        w, b = state[f"{name}.weight"], state.get(f"{name}.bias")
        n, k = w.shape
        if name.endswith("norm.linear") or name.endswith(("norm1.linear", "norm1_context.linear")):
            if n % 4 or k % 64:
                continue
            t, rec = quantize_awq(w, b, 1)
            targets["awq"].append(name)
        elif n % 128 == 0 and k % 128 == 0:
            t, rec = quantize_svdq(w, b, rank, precision, False, gen, wtscale_dtype=torch.bfloat16)
            t.pop("smooth_factor_orig")
            if b is None:
                t.pop("bias")
            targets["svdq"].append(name)
        else:
            continue
        records[name] = rec
        tensors.update({f"{name}.{leaf}": v for leaf, v in t.items()})
    for k, v in state.items():
        if k.rpartition(".")[0] not in records:
            tensors[k] = v.to(torch.bfloat16)
    config = {"quant_method": "nunchaku_lite", "compute_dtype": "bfloat16",
              "svdq_w4a4": {"precision": precision, "group_size": 64 if precision == "int4" else 16, "rank": rank,
                            "targets": targets["svdq"]},
              "awq_w4a16": {"precision": "int4", "group_size": 64, "targets": targets["awq"]}}
    return tensors, config, records


def metadata(model, precision: str, rank: int) -> dict:
    dtype = "int4" if precision == "int4" else "fp4_e2m1_all"
    group = 64 if precision == "int4" else 16
    return {"quantization_config": {"method": "svdquant", "weight": {"dtype": dtype, "group_size": group},
                                    "activation": {"dtype": dtype, "group_size": group}, "rank": rank},
            "model_class": NUNCHAKU_CLASS[type(model).__name__],
            "config": dict(model.config, _class_name=type(model).__name__)}


# -- the independent computation ---------------------------------------------------------------
def dequantized(rec: Record, precision: str) -> torch.Tensor:
    g = 64 if precision == "int4" else 16
    values = rec.codes.double() if precision == "int4" else E2M1.double()[rec.codes]
    return values * rec.scales.repeat_interleave(g, dim=1)


def dense_weight(rec: Record, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_eff and b_eff of a linear, with no activation quantization (reference.md 2.4's formula)."""
    if rec.zeros is not None:
        return rec.codes.double() * rec.scales.repeat_interleave(64, 1) + rec.zeros.repeat_interleave(64, 1), rec.bias
    r = dequantized(rec, precision) / rec.smooth
    bias = rec.bias.clone() if rec.bias is not None else torch.zeros(r.shape[0], dtype=torch.float64)
    for k0, k1, u in rec.unsigned:
        if u:
            bias += SHIFT * r[:, k0:k1].sum(1)
    return r + rec.up @ rec.down, bias


def quantized_forward(rec: Record, precision: str, x: torch.Tensor) -> torch.Tensor:
    """The W4A4 forward with activation quantization, from the format's definition."""
    x = x.double()
    deq = dequantized(rec, precision)
    y = (x @ rec.down.t()) @ rec.up.t()
    g = 64 if precision == "int4" else 16
    for k0, k1, u in rec.unsigned:
        xp = (x[:, k0:k1] + (SHIFT if u else 0)) / rec.smooth[k0:k1]
        blocks = xp.reshape(x.shape[0], -1, g)
        amax = blocks.abs().amax(-1, keepdim=True)
        if precision == "int4":
            scale = amax / (15 if u else 7)
            q = torch.round(blocks / torch.where(scale > 0, scale, 1)).clamp(0 if u else -8, 15 if u else 7) * scale
        else:
            scale = (amax / 6).clamp(max=448).float().to(torch.float8_e4m3fn).double()
            q = E2M1.double()[to_e2m1(blocks / torch.where(scale > 0, scale, 1))] * scale
        y = y + q.reshape(xp.shape) @ deq[:, k0:k1].t()
    return y + (rec.bias if rec.bias is not None else 0)


def assert_layers_follow_the_records(loaded, records: dict, precision: str) -> None:
    """Every quantized linear of a loaded model against its Record's forward (AWQ: the dense
    weight; SVDQ: with its activations quantized), relative error <= 1e-4 (the same 4-bit values,
    fp32 against fp64 arithmetic)."""
    from diffgen.linear import QuantLinear

    gen = torch.Generator().manual_seed(1)
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert set(quantized) == set(records)
    for name, layer in quantized.items():
        rec = records[name]
        x = torch.randn(6, layer.in_features, generator=gen)
        if rec.zeros is not None:
            w, b = dense_weight(rec, precision)
            expected = x.double() @ w.t() + b
        else:
            expected = quantized_forward(rec, precision, x)
        err = (layer(x).double() - expected).abs().max() / expected.abs().max()
        assert err < 1e-4, (name, float(err))


# -- inverses by the same index arithmetic (for stand-ins of nunchaku's ops) --------------------
def unpack_by_index(stored: torch.Tensor, shape, pack) -> torch.Tensor:
    """Invert a permutation packer: pack the element indices, then gather."""
    index = pack(torch.arange(shape[0] * shape[1], dtype=torch.float64).reshape(shape)).flatten().long()
    out = torch.empty(shape[0] * shape[1], dtype=stored.dtype)
    out[index] = stored.flatten()
    return out.reshape(shape)


def unpack_qweight_codes(stored: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] -> nibbles [N, K], reading each element from its documented word and nibble."""
    n_, k_ = stored.shape[0], 2 * stored.shape[1]
    words = torch.from_numpy(stored.contiguous().numpy().view("<u4").astype("int64")).flatten()
    n, k = torch.meshgrid(torch.arange(n_), torch.arange(k_), indexing="ij")
    word = (((((n // 128 * (k_ // 64) + k // 64) * 8 + (n % 128) // 16) * 8 + n % 8) * 4 + (k % 32) // 8) * 2
            + (n % 16) // 8) * 2 + (k % 64) // 32
    return (words[word] >> (4 * (k % 8))) & 0xF


def unpack_awq_codes(stored: torch.Tensor) -> torch.Tensor:
    n_, k_ = 4 * stored.shape[0], 2 * stored.shape[1]
    words = torch.from_numpy(stored.contiguous().numpy().view("<u2").astype("int64")).flatten()
    n, k = torch.meshgrid(torch.arange(n_), torch.arange(k_), indexing="ij")
    flat = ((n // 4 * (k_ // 64) + k // 64) * 4 + n % 4) * 16 + ((k % 64) // 32) * 8 + (k % 32) % 8
    return (words[flat] >> (4 * ((k % 32) // 8))) & 0xF
