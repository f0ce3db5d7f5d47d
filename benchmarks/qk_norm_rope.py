"""FLUX.1's attention prologue (per-head RMSNorm of q and k, text tokens first, RoPE) at FLUX.1-dev's
shapes: diffgen-cuda's one-pass kernel against diffusers' ops run eagerly and compiled by Inductor
(diffgen_cuda.flux1.qk_norm_rope, the ops of diffusers' FluxAttnProcessor).

Shapes: the double block (4096 image + 512 text tokens, separate Q/K/V projections, v concatenated
too) and the single block (4608 tokens, v read in place), 24 heads x 128, batch 1. CUDA-graph
replay (host_timing.graph_us), a sweep of the kernel's (rows, heads per program, warps), and how many
output values differ from the eager ops. Prints JSON; --out writes it. Needs CUDA and diffusers.

    python benchmarks/qk_norm_rope.py --out docs/benchmarks/qk_norm_rope_H100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core"), str(ROOT / "plugins" / "diffgen-cuda"), str(Path(__file__).resolve().parent)]

from host_timing import graph_us  # noqa: E402
from diffgen_cuda.flux1 import qk_norm_rope  # noqa: E402
from diffgen_cuda.fused import prologue_args  # noqa: E402
from diffgen_cuda.kernels import qk_norm_rope as kernel  # noqa: E402

HEADS, HEAD_DIM = 24, 128
CONFIGS = [(16, 1, 4), (8, 1, 4), (8, 2, 4), (8, 4, 4), (8, 8, 4), (8, 8, 2), (4, 8, 2), (4, 4, 1), (8, 24, 4), (16, 8, 4)]


def case(joint: bool, img: int, txt: int):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    attn = FluxAttention(dim, HEADS, HEAD_DIM, added_kv_proj_dim=dim if joint else None, eps=1e-6,
                         pre_only=not joint).cuda().bfloat16()
    for name, p in attn.named_parameters():
        if name.startswith("norm_"):
            p.data.normal_(1, 0.3)
    qkv = (torch.randn(1, img, 3 * dim, device="cuda") * 3).bfloat16()
    context = (torch.randn(1, txt, 3 * dim, device="cuda") * 3).bfloat16() if joint else None
    angles = torch.rand(img + txt, HEAD_DIM // 2, device="cuda", dtype=torch.float64) * 100
    freqs = tuple(f(angles).repeat_interleave(2, dim=1).float() for f in (torch.cos, torch.sin))
    return attn, qkv, context, freqs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    inductor = torch.compile(qk_norm_rope)
    with torch.no_grad():
        for label, joint, img, txt in [("double", True, 4096, 512), ("single", False, 4608, 0)]:
            attn, qkv, context, freqs = case(joint, img, txt)
            weights, cos, sin, eps = prologue_args(attn, qkv, context, freqs)

            def run(config=kernel.CONFIG):
                return kernel.qk_norm_rope(qkv, context, weights, cos, sin, eps, joint, config=config)

            tokens = img + txt
            parts = 3 if joint else 2  # tensors of [tokens, 3072] read and written (q, k and maybe v)
            row = {"block": label, "tokens": tokens, "heads": HEADS, "head_dim": HEAD_DIM,
                   "kernel_us": {f"{bs}x{hp}x{w}": graph_us(lambda: run((bs, hp, w))) for bs, hp, w in CONFIGS},
                   "inductor_us": graph_us(lambda: inductor(attn, qkv, context, freqs)),
                   "pytorch_eager_us": graph_us(lambda: qk_norm_rope(attn, qkv, context, freqs)),
                   # bf16 read and written, plus the fp32 cos / sin tables, at the H100 SXM's 3.35 TB/s
                   "memory_bound_us": (parts * 2 * tokens * HEADS * HEAD_DIM * 2 + 2 * tokens * HEAD_DIM * 4) / 3.35e6}
            out = run()
            ref = qk_norm_rope(attn, qkv, context, freqs)
            row["values_differing_from_eager"] = {
                name: (out[i].transpose(1, 2) != ref[i]).float().mean().item() for i, name in enumerate("qk")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": kernel.CONFIG, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
