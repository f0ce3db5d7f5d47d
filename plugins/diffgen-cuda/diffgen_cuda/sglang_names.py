"""SGLang-Diffusion runtime module names -> diffusers module names.

SGLang runs some models under its own module names and fuses projections that diffusers keeps
apart. Its ``param_names_mapping`` (``multimodal_gen/configs/models/dits/<model>.py``) maps each
diffusers tensor to a runtime tensor, as ``(runtime name, shard, shards)`` where several diffusers
linears fill one fused runtime linear along dim 0. This file is that table inverted, for:

- HunyuanVideo (``HunyuanVideoArchConfig``): ``double_blocks.N.img_attn_qkv`` = [to_q; to_k; to_v],
  ``txt_attn_qkv`` = [add_q_proj; add_k_proj; add_v_proj], ``single_blocks.N.linear1`` =
  [to_q; to_k; to_v; proj_mlp], ``txt_in.refiner_blocks.N.self_attn_qkv``, and 1:1 renames
  (``img_mod.linear`` = ``norm1.linear``, ``final_layer.linear`` = ``proj_out``, ...);
- Qwen-Image (``QwenImageArchConfig``): ``attn.to_added_qkv`` (SVDQuant's packed ``add_qkv_proj`` is diffgen-nunchaku's) =
  [add_q_proj; add_k_proj; add_v_proj]; SGLang's ignore lists also write ``img_mod``/``txt_mod``
  for diffusers' ``img_mod.1``/``txt_mod.1``.

Where runtime names appear in ModelOpt checkpoints:

- ignore lists: SGLang's ``build_modelopt_fp8_transformer`` keeps a HunyuanVideo export's tensors
  under their diffusers names but writes the ``ignore`` entries it adds (BF16 fallbacks, layers
  without a scale) in runtime names: ``diffusers_module_names`` translates them;
- tensor names: a checkpoint saved from SGLang's runtime model has runtime names and fused
  weights: ``runtime_to_diffusers`` renames and splits them as they stream. Each shard keeps its
  FP8 bytes; a scalar ``weight_scale``/``input_scale`` (shared by the fused layer) is copied to
  every shard, a per-shard ``[S]`` one is split, a per-channel ``[N]`` one is cut like the weight.
"""

from __future__ import annotations

from diffgen.quant import RepackTarget, TensorStream
from diffgen.renames import RenameRule, RenameTable, rename_and_split


def _single_linear1_widths(config: dict, rows: int) -> list[int]:
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return [hidden, hidden, hidden, rows - 3 * hidden]


_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

RULES: dict[str, RenameTable] = {name: RenameTable(rules) for name, rules in {
    "HunyuanVideoTransformer3DModel": (
        RenameRule(r"txt_in\.t_embedder\.mlp\.fc_in", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
        RenameRule(r"txt_in\.t_embedder\.mlp\.fc_out", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
        RenameRule(r"txt_in\.input_embedder", ("context_embedder.proj_in",)),
        RenameRule(r"txt_in\.c_embedder\.fc_in", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
        RenameRule(r"txt_in\.c_embedder\.fc_out", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
        RenameRule(r"txt_in\.refiner_blocks\.(\d+)\.(norm1|norm2)", (r"context_embedder.token_refiner.refiner_blocks.\1.\2",)),
        RenameRule(r"txt_in\.refiner_blocks\.(\d+)\.self_attn_qkv",
             tuple(rf"context_embedder.token_refiner.refiner_blocks.\1.{m}" for m in _QKV)),
        RenameRule(r"txt_in\.refiner_blocks\.(\d+)\.self_attn_proj",
             (r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_out.0",)),
        RenameRule(r"txt_in\.refiner_blocks\.(\d+)\.mlp\.fc_in", (r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.0.proj",)),
        RenameRule(r"txt_in\.refiner_blocks\.(\d+)\.mlp\.fc_out", (r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.2",)),
        RenameRule(r"txt_in\.refiner_blocks\.(\d+)\.adaLN_modulation\.linear",
             (r"context_embedder.token_refiner.refiner_blocks.\1.norm_out.linear",)),
        RenameRule(r"img_in\.proj", ("x_embedder.proj",)),
        RenameRule(r"time_in\.mlp\.fc_in", ("time_text_embed.timestep_embedder.linear_1",)),
        RenameRule(r"time_in\.mlp\.fc_out", ("time_text_embed.timestep_embedder.linear_2",)),
        RenameRule(r"guidance_in\.mlp\.fc_in", ("time_text_embed.guidance_embedder.linear_1",)),
        RenameRule(r"guidance_in\.mlp\.fc_out", ("time_text_embed.guidance_embedder.linear_2",)),
        RenameRule(r"vector_in\.fc_in", ("time_text_embed.text_embedder.linear_1",)),
        RenameRule(r"vector_in\.fc_out", ("time_text_embed.text_embedder.linear_2",)),
        RenameRule(r"double_blocks\.(\d+)\.img_mod\.linear", (r"transformer_blocks.\1.norm1.linear",)),
        RenameRule(r"double_blocks\.(\d+)\.txt_mod\.linear", (r"transformer_blocks.\1.norm1_context.linear",)),
        RenameRule(r"double_blocks\.(\d+)\.img_attn_q_norm", (r"transformer_blocks.\1.attn.norm_q",)),
        RenameRule(r"double_blocks\.(\d+)\.img_attn_k_norm", (r"transformer_blocks.\1.attn.norm_k",)),
        RenameRule(r"double_blocks\.(\d+)\.img_attn_qkv", tuple(rf"transformer_blocks.\1.{m}" for m in _QKV)),
        RenameRule(r"double_blocks\.(\d+)\.txt_attn_qkv", tuple(rf"transformer_blocks.\1.{m}" for m in _ADDED_QKV)),
        RenameRule(r"double_blocks\.(\d+)\.img_attn_proj", (r"transformer_blocks.\1.attn.to_out.0",)),
        RenameRule(r"double_blocks\.(\d+)\.txt_attn_proj", (r"transformer_blocks.\1.attn.to_add_out",)),
        RenameRule(r"double_blocks\.(\d+)\.txt_attn_q_norm", (r"transformer_blocks.\1.attn.norm_added_q",)),
        RenameRule(r"double_blocks\.(\d+)\.txt_attn_k_norm", (r"transformer_blocks.\1.attn.norm_added_k",)),
        RenameRule(r"double_blocks\.(\d+)\.img_mlp\.fc_in", (r"transformer_blocks.\1.ff.net.0.proj",)),
        RenameRule(r"double_blocks\.(\d+)\.img_mlp\.fc_out", (r"transformer_blocks.\1.ff.net.2",)),
        RenameRule(r"double_blocks\.(\d+)\.txt_mlp\.fc_in", (r"transformer_blocks.\1.ff_context.net.0.proj",)),
        RenameRule(r"double_blocks\.(\d+)\.txt_mlp\.fc_out", (r"transformer_blocks.\1.ff_context.net.2",)),
        RenameRule(r"single_blocks\.(\d+)\.q_norm", (r"single_transformer_blocks.\1.attn.norm_q",)),
        RenameRule(r"single_blocks\.(\d+)\.k_norm", (r"single_transformer_blocks.\1.attn.norm_k",)),
        RenameRule(r"single_blocks\.(\d+)\.linear1",
             tuple(rf"single_transformer_blocks.\1.{m}" for m in (*_QKV, "proj_mlp")), _single_linear1_widths),
        RenameRule(r"single_blocks\.(\d+)\.linear2", (r"single_transformer_blocks.\1.proj_out",)),
        RenameRule(r"single_blocks\.(\d+)\.modulation\.linear", (r"single_transformer_blocks.\1.norm.linear",)),
        RenameRule(r"final_layer\.adaLN_modulation\.linear", ("norm_out.linear",)),
        RenameRule(r"final_layer\.linear", ("proj_out",)),
    ),
    "QwenImageTransformer2DModel": (
        RenameRule(r"(transformer_blocks\.\d+)\.attn\.(to_added_qkv)", tuple(rf"\1.{m}" for m in _ADDED_QKV)),
        # Only in ignore lists: SGLang names the modulation Sequential, diffusers' Linear is its [1].
        RenameRule(r"(transformer_blocks\.\d+)\.(img_mod|txt_mod)", (r"\1.\2.1",)),
    ),
}.items()}


def diffusers_module_names(model_class: str | None, module: str) -> list[str]:
    """The diffusers modules a runtime module name stands for ([] when it is not a runtime name)."""
    table = RULES.get(model_class or "")
    return table.modules(module) if table else []


def runtime_to_diffusers(tensors: TensorStream, target: RepackTarget) -> TensorStream:
    """Rename (and split) SGLang runtime tensors into diffusers ones; pass everything else through."""
    return rename_and_split(tensors, RULES[target.model_class], target.model_config, describe="SGLang runtime",
                            keep=lambda name: name in target.expected)
