"""Tiny diffusers pipelines written to disk in diffusers layout, built offline and deterministically.

`build_tiny_pipeline(family, directory, seed)` writes model_index.json plus one folder per
component, loadable with `diffusers.DiffusionPipeline.from_pretrained(directory)`, and small
enough that 2 steps at 32x32 px (5 frames for video) take well under a second on CPU (except
"qwen_image_edit": QwenImageEditPipeline VAE-encodes its input image at about one megapixel
whatever the output size, which takes a few seconds).

Every component is seeded on its own, so changing one leaves the others' weights alone:
transformer under `seed` (it equals `tiny_transformer(family, seed)`), vae `seed + 1`,
text_encoder `seed + 2`, text_encoder_2 `seed + 3`, transformer_2 `seed + 4`; "qwen_image_edit"
has exactly the "qwen_image" components. Weights are saved in fp32; the same seed gives
byte-identical files. Tokenizers come from `tokenizers` beside this module.

Departures from the upstream layouts: the AutoencoderKL-style VAEs have no mid-block attention
(so a default-size call does not build a huge attention matrix); "flux2" ships a LlamaTokenizer with Mistral's chat
template where FLUX.2-dev ships a PixtralProcessor (which needs torchvision); "wan" and "wan_i2v"
are the Wan2.2 A14B two-expert layouts (transformer_2 + boundary_ratio), "wan_ti2v" the TI2V-5B
one (expand_timesteps, 48-channel residual VAE); "qwen_image_edit" ships the tiny Qwen2Tokenizer
as `processor` too, where Qwen-Image-Edit ships a Qwen2VLProcessor (which transformers 5 builds only with
torchvision), so its text encoder reads the prompt without the input image's vision tokens while
the transformer still gets the image's VAE latents.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from diffgen.checkpoint_writer import release_staging, staging_directory
from diffgen.tiny.tokenizers import (
    QWEN_SPECIAL_TOKENS,
    tiny_clip_tokenizer,
    tiny_llama_tokenizer,
    tiny_mistral3_tokenizer,
    tiny_qwen2_tokenizer,
    tiny_qwen3_tokenizer,
    tiny_t5_tokenizer,
)
from diffgen.tiny.transformers import tiny_transformer

# Text encoders are 32 wide, the transformers' joint_attention_dim / text_dim / pooled size.
_TEXT_DIM = 32


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ---------------------------------------------------------------------------------------------
# Text encoders and VAEs


def _tiny_clip_text_model(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_DIM, intermediate_size=64, projection_dim=_TEXT_DIM,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, lambda: CLIPTextModel(config).eval())


def _tiny_t5_encoder(tokenizer, seed: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer), d_model=_TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    return _seeded(seed, lambda: model_cls(config).eval())


def _tiny_qwen2_5_vl(tokenizer, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=_TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
            # mrope splits the 16-dim head's 8 rotary frequencies over (time, height, width).
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 2, 4]),
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_TEXT_DIM),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config).eval())


def _tiny_qwen3(tokenizer, seed: int, hidden_size: int, num_layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
        max_position_embeddings=2048, tie_word_embeddings=causal_lm,
        bos_token_id=pad, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=pad,
    )
    model_cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
    return _seeded(seed, lambda: model_cls(config).eval())


def _tiny_llama(tokenizer, seed: int, num_layers: int):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_DIM, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, lambda: LlamaModel(config).eval())


def _tiny_mistral3(tokenizer, seed: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        # Flux2Pipeline stacks hidden_states (10, 20, 30): 30 layers of width 16 give joint dim 48.
        text_config=dict(
            model_type="mistral", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
            num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            head_dim=8, image_size=64, patch_size=16,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    )
    return _seeded(seed, lambda: Mistral3ForConditionalGeneration(config).eval())


def _tiny_autoencoder_kl_hunyuan_video(seed: int):
    from diffusers import AutoencoderKLHunyuanVideo

    # Four blocks: 8x spatial (three spatial downsamples) and 4x temporal, as upstream.
    return _seeded(seed, lambda: AutoencoderKLHunyuanVideo(
        latent_channels=16, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False,
    ).eval())


def _tiny_autoencoder_kl_qwenimage(z_dim: int, seed: int):
    from diffusers import AutoencoderKLQwenImage

    # Three dim_mult stages give 4x spatial compression; temperal_downsample has one entry per
    # down stage, and QwenImagePipeline reads 2 ** len(temperal_downsample) as the spatial factor.
    return _seeded(seed, lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    ).eval())


def _tiny_autoencoder_kl_wan(z_dim: int, seed: int, residual_patch_size: int | None = None):
    from diffusers import AutoencoderKLWan

    # dim_mult [1, 2, 2] with temperal_downsample [True, True]: 4x spatial and 4x temporal as
    # upstream, so I2V's 36 input channels are 16 noise + 4 (= scale_factor_temporal) mask + 16
    # image. The Wan2.2 VAE (is_residual) first pixel-unshuffles RGB by `patch_size`, so it sees
    # 3 * p * p channels and compresses p times more; its residual shortcuts need the last
    # dim_mult repeated.
    patch = residual_patch_size or 1
    return _seeded(seed, lambda: AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, is_residual=residual_patch_size is not None,
        in_channels=3 * patch * patch, out_channels=3 * patch * patch, patch_size=residual_patch_size,
        scale_factor_temporal=4, scale_factor_spatial=4 * patch,
    ).eval())


def _tiny_autoencoder_kl(latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    # Two blocks: 2x spatial compression. FLUX's VAE has no quant convs; the mid-block attention
    # is left out so a default-size (256 px) call does not build a 16k x 16k attention matrix.
    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval())


def _tiny_autoencoder_kl_flux2(seed: int):
    from diffusers import AutoencoderKLFlux2

    # latent_channels 4: the pipeline batch-norms and packs 2x2 patches, so 16 = transformer in_channels.
    return _seeded(seed, lambda: AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
        mid_block_add_attention=False,
    ).eval())


def _flow_match_scheduler(**overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler config: resolution-dependent shift between 256 and 4096 tokens.
    config = dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    config.update(overrides)
    return FlowMatchEulerDiscreteScheduler(**config)


# ---------------------------------------------------------------------------------------------
# Pipelines


def _flux1_pipeline(seed: int):
    from diffusers import FluxPipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=_flow_match_scheduler(),
        vae=_tiny_autoencoder_kl(latent_channels=4, seed=seed + 1),
        text_encoder=_tiny_clip_text_model(tokenizer, seed=seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5_encoder(tokenizer_2, seed=seed + 3),
        tokenizer_2=tokenizer_2,
        transformer=tiny_transformer("flux1", seed=seed),
    )


def _qwen_image_pipeline(seed: int):
    from diffusers import QwenImagePipeline

    tokenizer = tiny_qwen2_tokenizer()
    return QwenImagePipeline(
        # Qwen-Image's scheduler config (as recalled): exponential dynamic shift over 256..8192 tokens.
        scheduler=_flow_match_scheduler(
            shift=1.0, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02,
            time_shift_type="exponential",
        ),
        vae=_tiny_autoencoder_kl_qwenimage(z_dim=4, seed=seed + 1),
        text_encoder=_tiny_qwen2_5_vl(tokenizer, seed=seed + 2),
        tokenizer=tokenizer,
        transformer=tiny_transformer("qwen_image", seed=seed),
    )


def _qwen_image_edit_pipeline(seed: int):
    from diffusers import QwenImageEditPipeline

    # The qwen_image components under the same seeds; the edit pipeline calls
    # processor(text=..., images=..., return_tensors="pt"), which a tokenizer answers with the
    # text alone (see the module docstring).
    qwen_image = _qwen_image_pipeline(seed)
    return QwenImageEditPipeline(processor=tiny_qwen2_tokenizer(), **qwen_image.components)


def _wan_pipeline(seed: int, family: str):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    tokenizer = tiny_t5_tokenizer()
    # T2V-A14B and I2V-A14B: two experts split at boundary_ratio (0.875 and 0.9 upstream); the
    # TI2V-5B model is one transformer with per-token timesteps and a 48-channel VAE.
    if family == "wan_ti2v":
        vae = _tiny_autoencoder_kl_wan(z_dim=48, seed=seed + 1, residual_patch_size=2)
        experts = dict(transformer=tiny_transformer(family, seed=seed), expand_timesteps=True)
    else:
        vae = _tiny_autoencoder_kl_wan(z_dim=16, seed=seed + 1)
        experts = dict(
            transformer=tiny_transformer(family, seed=seed),
            transformer_2=tiny_transformer(family, seed=seed + 4),
            boundary_ratio=0.9 if family == "wan_i2v" else 0.875,
        )
    pipeline_cls = WanImageToVideoPipeline if family == "wan_i2v" else WanPipeline
    return pipeline_cls(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5_encoder(tokenizer, seed=seed + 2, umt5=True),
        vae=vae,
        # Wan repos ship UniPCMultistepScheduler(flow_shift=5.0); the pipelines take any flow
        # scheduler, and Euler keeps 2-step test runs simple.
        scheduler=_flow_match_scheduler(shift=5.0, use_dynamic_shifting=False),
        **experts,
    )


def _z_image_pipeline(seed: int):
    from diffusers import ZImagePipeline

    tokenizer = tiny_qwen3_tokenizer()
    return ZImagePipeline(
        scheduler=_flow_match_scheduler(shift=3.0, use_dynamic_shifting=False),  # Z-Image-Turbo's
        vae=_tiny_autoencoder_kl(latent_channels=16, seed=seed + 1),
        # Two layers: the pipeline reads hidden_states[-2], the output of the next-to-last layer.
        text_encoder=_tiny_qwen3(tokenizer, seed=seed + 2, hidden_size=_TEXT_DIM, num_layers=2, causal_lm=False),
        tokenizer=tokenizer,
        transformer=tiny_transformer("z_image", seed=seed),
    )


def _flux2_pipeline(seed: int):
    from diffusers import Flux2Pipeline

    tokenizer = tiny_mistral3_tokenizer()
    return Flux2Pipeline(
        scheduler=_flow_match_scheduler(),
        vae=_tiny_autoencoder_kl_flux2(seed=seed + 1),
        text_encoder=_tiny_mistral3(tokenizer, seed=seed + 2),
        tokenizer=tokenizer,
        transformer=tiny_transformer("flux2", seed=seed),
    )


def _flux2_klein_pipeline(seed: int):
    from diffusers import Flux2KleinPipeline

    tokenizer = tiny_qwen3_tokenizer()
    return Flux2KleinPipeline(
        scheduler=_flow_match_scheduler(),
        vae=_tiny_autoencoder_kl_flux2(seed=seed + 1),
        # The pipeline stacks hidden_states (9, 18, 27) by default, so 27 layers of width 16 give
        # the transformer's joint_attention_dim of 48.
        text_encoder=_tiny_qwen3(tokenizer, seed=seed + 2, hidden_size=16, num_layers=27, causal_lm=True),
        tokenizer=tokenizer,
        transformer=tiny_transformer("flux2_klein", seed=seed),
    )


def _hunyuan_video_pipeline(seed: int):
    from diffusers import HunyuanVideoPipeline

    tokenizer, tokenizer_2 = tiny_llama_tokenizer(), tiny_clip_tokenizer()
    return HunyuanVideoPipeline(
        # Three layers: the pipeline reads hidden_states[-3] (num_hidden_layers_to_skip=2).
        text_encoder=_tiny_llama(tokenizer, seed=seed + 2, num_layers=3),
        tokenizer=tokenizer,
        transformer=tiny_transformer("hunyuan_video", seed=seed),
        vae=_tiny_autoencoder_kl_hunyuan_video(seed=seed + 1),
        scheduler=_flow_match_scheduler(shift=7.0, use_dynamic_shifting=False),  # HunyuanVideo's
        text_encoder_2=_tiny_clip_text_model(tokenizer_2, seed=seed + 3),
        tokenizer_2=tokenizer_2,
    )


_PIPELINE_BUILDERS = {
    "flux1": _flux1_pipeline,
    "qwen_image": _qwen_image_pipeline,
    "qwen_image_edit": _qwen_image_edit_pipeline,
    "wan": lambda seed: _wan_pipeline(seed, "wan"),
    "wan_ti2v": lambda seed: _wan_pipeline(seed, "wan_ti2v"),
    "wan_i2v": lambda seed: _wan_pipeline(seed, "wan_i2v"),
    "z_image": _z_image_pipeline,
    "flux2": _flux2_pipeline,
    "flux2_klein": _flux2_klein_pipeline,
    "hunyuan_video": _hunyuan_video_pipeline,
}

TINY_PIPELINE_FAMILIES: tuple[str, ...] = tuple(_PIPELINE_BUILDERS)


def tiny_pipeline(family: str, seed: int = 0):
    """The family's tiny pipeline object, in memory (fp32, CPU)."""
    try:
        builder = _PIPELINE_BUILDERS[family]
    except KeyError:
        raise KeyError(f"no tiny pipeline for {family!r}; known: {list(TINY_PIPELINE_FAMILIES)}") from None
    return builder(seed)


def build_tiny_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write the family's tiny pipeline to `directory` in diffusers layout and return the path."""
    directory = Path(directory)
    tiny_pipeline(family, seed).save_pretrained(directory, safe_serialization=True)
    return directory


# ---------------------------------------------------------------------------------------------
# The embedded default model

EMBEDDED_DEFAULT_VERSION = "v1"


def _default_cache_root() -> Path:
    if os.environ.get("DIFFGEN_CACHE_DIR"):
        return Path(os.environ["DIFFGEN_CACHE_DIR"])
    return Path.home() / ".cache" / "diffgen"


def embedded_default_pipeline(cache_dir: str | Path | None = None) -> Path:
    """Path of diffgen's offline default model: the tiny flux1 pipeline, built once and cached.

    The result lives in `<cache_dir>/default-model-<version>`; cache_dir defaults to
    $DIFFGEN_CACHE_DIR or ~/.cache/diffgen. It is built in a sibling temporary directory and
    renamed into place, so a concurrent or interrupted build never leaves a partial cache.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    target = root / f"default-model-{EMBEDDED_DEFAULT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_directory(root, f".{target.name}-")
    try:
        build_tiny_pipeline("flux1", staging, seed=0)
        release_staging(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its build first; theirs is byte-identical to ours.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
