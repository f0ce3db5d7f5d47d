"""Tiny diffusers transformers, one per model family, for tests that need real module trees.

Each entry of `TINY_TRANSFORMERS` names the diffusers class and constructor kwargs of a model
with the family's real Linear names and tens of thousands of parameters (Z-Image: ~0.8M, because
its t_embedder's 1024 mid size is fixed by the class). Random init is the weights:
`tiny_transformer(family, seed)` seeds torch and constructs, so the seed fixes every tensor.

Every Linear has in_features and out_features divisible by 16, because the FP8 and NVFP4 GEMMs
need K % 16 == 0 and N % 16 == 0; no family needs an exception (`linear_shape_exceptions`
lists offenders, and the tests assert it is empty). `tiny_transformer_inputs` gives each class
its forward kwargs for a 4x4-token latent and 8 text tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TRANSFORMERS: dict[str, dict] = {
    # FLUX.1: latents are packed 2x2, so in_channels = 4 * VAE latent_channels (4 here).
    # sum(axes_dims_rope) must equal attention_head_dim.
    "flux1": {
        "class_name": "FluxTransformer2DModel",
        "kwargs": dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8),
        ),
    },
    # FLUX.2-dev: no biases; mlp_ratio 3 gives ff.linear_in N = 192 and single to_qkv_mlp_proj
    # N = 288. joint_attention_dim is 3 stacked text-encoder layers of width 16.
    "flux2": {
        "class_name": "Flux2Transformer2DModel",
        "kwargs": dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
            mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
        ),
    },
    # FLUX.2 klein (4B/9B): the same class without the guidance embedder.
    "flux2_klein": {
        "class_name": "Flux2Transformer2DModel",
        "kwargs": dict(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
            mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
        ),
    },
    # Wan 2.1 / 2.2 T2V: patch_embedding is a Conv3d; proj_out N = 16 channels * 1*2*2 patch = 64.
    "wan": {
        "class_name": "WanTransformer3DModel",
        "kwargs": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        ),
    },
    # Wan 2.2 TI2V-5B: 48 latent channels and per-token timesteps (expand_timesteps in the pipeline).
    "wan_ti2v": {
        "class_name": "WanTransformer3DModel",
        "kwargs": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48,
            out_channels=48, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        ),
    },
    # Wan 2.2 I2V-A14B: 36 input channels = 16 noise + 4 mask + 16 image latents; no CLIP image branch.
    "wan_i2v": {
        "class_name": "WanTransformer3DModel",
        "kwargs": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36,
            out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        ),
    },
    # HunyuanVideo: 16 latent channels with patch 1 so proj_out N = 16 (4 channels would give N = 4).
    "hunyuan_video": {
        "class_name": "HunyuanVideoTransformer3DModel",
        "kwargs": dict(
            in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
            guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
        ),
    },
    # Qwen-Image: hidden_states arrive packed 2x2, so in_channels = 4 * out_channels.
    "qwen_image": {
        "class_name": "QwenImageTransformer2DModel",
        "kwargs": dict(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        ),
    },
    # Z-Image: dim 96 (not 64) so the SwiGLU hidden int(dim / 3 * 8) = 256 divides by 16. The
    # t_embedder's 1024 mid size is fixed by the class, hence ~0.9M parameters.
    "z_image": {
        "class_name": "ZImageTransformer2DModel",
        "kwargs": dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=96, n_layers=1,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
            axes_dims=[16, 16, 16], axes_lens=[1024, 512, 512],
        ),
    },
}

# Token counts of the inputs: an image of 4x4 latent tokens and 8 text tokens.
_GRID = 4
_TEXT_TOKENS = 8


def tiny_transformer(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Construct the family's tiny transformer; its weights are the random init under `seed`."""
    import diffusers

    spec = TINY_TRANSFORMERS[family]
    cls = getattr(diffusers, spec["class_name"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**spec["kwargs"])
    return _cast_like_from_pretrained(model, dtype).eval()


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # from_pretrained(torch_dtype=...) leaves parameters whose dotted name contains one of
    # `_keep_in_fp32_modules` (Wan: norms, time_embedder, ...) in fp32; do the same so a saved
    # and reloaded model matches this one exactly. ModelMixin.to() would cast them too.
    # Non-persistent buffers (RoPE tables) are not in the checkpoint and stay as constructed.
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    saved = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in saved or not torch.is_floating_point(tensor):
            continue
        target = torch.float32 if any(k in name.split(".") for k in keep_fp32) else dtype
        tensor.data = tensor.data.to(target)
    return model


def linear_shape_exceptions(model: torch.nn.Module, multiple: int = 16) -> list[str]:
    """Names of Linear layers whose in_features or out_features is not a multiple of `multiple`."""
    return [
        f"{name} ({module.in_features}->{module.out_features})"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (module.in_features % multiple or module.out_features % multiple)
    ]


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    # The dtype of the first parameter outside `_keep_in_fp32_modules` (Wan's first parameter
    # is the fp32 scale_shift_table even in a bf16 model).
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, parameter in model.named_parameters():
        if not any(k in name.split(".") for k in keep_fp32):
            return parameter.dtype
    return torch.float32


def _flux1_img_ids(grid: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def tiny_transformer_inputs(family: str, model: torch.nn.Module, seed: int = 0, batch: int = 1) -> dict:
    """Keyword inputs for `model(**inputs, return_dict=False)`: a 4x4-token latent, 8 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    dtype = _compute_dtype(model)
    config = model.config

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    tokens = _GRID * _GRID
    if family == "flux1":
        return dict(
            hidden_states=randn(batch, tokens, config.in_channels),
            encoder_hidden_states=randn(batch, _TEXT_TOKENS, config.joint_attention_dim),
            pooled_projections=randn(batch, config.pooled_projection_dim),
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_ids=_flux1_img_ids(_GRID),
            txt_ids=torch.zeros(_TEXT_TOKENS, 3),
            guidance=torch.full((batch,), 3.5, dtype=dtype),
        )
    if family in ("flux2", "flux2_klein"):
        img_ids = torch.cat([torch.zeros(tokens, 1), _flux1_img_ids(_GRID)], dim=-1)
        txt_ids = torch.zeros(_TEXT_TOKENS, 4)
        txt_ids[:, 3] = torch.arange(_TEXT_TOKENS)
        return dict(
            hidden_states=randn(batch, tokens, config.in_channels),
            encoder_hidden_states=randn(batch, _TEXT_TOKENS, config.joint_attention_dim),
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_ids=img_ids.expand(batch, -1, -1),
            txt_ids=txt_ids.expand(batch, -1, -1),
            guidance=torch.full((batch,), 3.5, dtype=dtype) if config.guidance_embeds else None,
        )
    if family in ("wan", "wan_ti2v", "wan_i2v"):
        # Patch (1, 2, 2) over an 8x8 latent frame gives the 4x4 token grid.
        size = _GRID * 2
        if family == "wan_ti2v":
            timestep = torch.full((batch, tokens), 500.0)  # per-token timesteps, as expand_timesteps does
        else:
            timestep = torch.full((batch,), 500.0)
        return dict(
            hidden_states=randn(batch, config.in_channels, 1, size, size),
            timestep=timestep.to(dtype),
            encoder_hidden_states=randn(batch, _TEXT_TOKENS, config.text_dim),
        )
    if family == "hunyuan_video":
        return dict(
            hidden_states=randn(batch, config.in_channels, 1, _GRID, _GRID),
            timestep=torch.full((batch,), 500.0, dtype=dtype),
            encoder_hidden_states=randn(batch, _TEXT_TOKENS, config.text_embed_dim),
            encoder_attention_mask=torch.ones(batch, _TEXT_TOKENS, dtype=torch.long),
            pooled_projections=randn(batch, config.pooled_projection_dim),
            guidance=torch.full((batch,), 6000.0, dtype=dtype),  # the pipeline passes guidance * 1000
        )
    if family == "qwen_image":
        return dict(
            hidden_states=randn(batch, tokens, config.in_channels),
            encoder_hidden_states=randn(batch, _TEXT_TOKENS, config.joint_attention_dim),
            encoder_hidden_states_mask=torch.ones(batch, _TEXT_TOKENS, dtype=torch.long),
            timestep=torch.full((batch,), 0.5, dtype=dtype),
            img_shapes=[[(1, _GRID, _GRID)]] * batch,
        )
    if family == "z_image":
        # Lists of per-sample tensors: latents (C, F, H, W) and caption features (tokens, cap_feat_dim).
        size = _GRID * 2
        return dict(
            x=[randn(config.in_channels, 1, size, size) for _ in range(batch)],
            t=torch.full((batch,), 0.5, dtype=dtype),
            cap_feats=[randn(_TEXT_TOKENS, config.cap_feat_dim) for _ in range(batch)],
        )
    raise KeyError(f"unknown tiny transformer family {family!r}; known: {sorted(TINY_TRANSFORMERS)}")


def save_tiny_transformer(
    family: str, directory: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write the tiny transformer in diffusers layout (config.json + diffusion_pytorch_model.safetensors)."""
    directory = Path(directory)
    tiny_transformer(family, seed=seed, dtype=dtype).save_pretrained(directory, safe_serialization=True)
    return directory
