"""The families' tiny transformers, widened for nunchaku's packer."""

# Each family's tiny transformer, widened so every quantized linear is a multiple of 128 wide
# (nunchaku's packer requires it); the other components stay the tiny pipeline's.
WIDE = {
    "flux1": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 24, 24))),
    "qwen_image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(16, 24, 24))),
    "z_image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=384, n_layers=1, n_refiner_layers=1,
        n_heads=3, n_kv_heads=3, qk_norm=True, cap_feat_dim=32, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])),
}
WIDE["qwen_image_edit"] = WIDE["qwen_image"]
RANK = 16
