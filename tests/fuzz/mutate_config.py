"""Mutations of config.json: the model's sizes and class, and the quantization declaration."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from .case import BENIGN, EITHER, ERROR, Mutation, config_of, mutator, write_config

SIZE_KEYS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
             "pooled_projection_dim", "in_channels", "patch_size", "out_channels", "axes_dims_rope",
             "guidance_embeds")
HOSTILE_VALUES = (None, -1, -2**31, math.nan, math.inf, -math.inf, 1e30, 10**9, 2**70, 0, 1, 3.5, 16.0, "16", [16],
                  {}, True, False, [4, 4, 8], [4, 4], [-4, 4, 16], [10**9, 0, 0], [4.0, 4, 8], "x" * 10_000)


@mutator("config")
def config_value(rng: random.Random, case: Path, seed: str) -> Mutation:
    """A model size set to null, a negative, NaN, 1e30, 2**70, a float, a string, a list, a bool."""
    config = config_of(case)
    key = rng.choice(SIZE_KEYS)
    value = rng.choice(HOSTILE_VALUES)
    before = config.get(key, "absent")
    config[key] = value
    write_config(case, config)
    # The same value, or the class default where the seed stored null, changes nothing.
    same = json.dumps(value) == json.dumps(before)
    expect = BENIGN if same else EITHER
    head = config.get("attention_head_dim")
    if key in ("axes_dims_rope", "attention_head_dim") and isinstance(config.get("axes_dims_rope"), list) \
            and isinstance(head, int) and not isinstance(head, bool) \
            and all(type(a) is int for a in config["axes_dims_rope"]) and sum(config["axes_dims_rope"]) != head:
        expect = ERROR  # the rotary widths must add up to the head width, or the first forward fails
    return Mutation(expect, (key,), f"config.json {key}: {before!r} -> {str(value)[:40]}")


@mutator("config")
def config_class(rng: random.Random, case: Path, seed: str) -> Mutation:
    """_class_name naming something that is not this model: a module, a pipeline, another model."""
    config = config_of(case)
    before = config.get("_class_name")
    value = rng.choice(["utils", "FluxPipeline", "AutoencoderKL", "", None, 5, ["FluxTransformer2DModel"],
                        "ModelMixin", "FluxTransformer2DModelX", "QwenImageTransformer2DModel", "__class__",
                        "WanTransformer3DModel", "torch", "UNet2DConditionModel", "ConfigMixin"])
    config["_class_name"] = value
    if rng.random() < 0.1:
        config.pop("_class_name")
        value = "(removed)"
    write_config(case, config)
    return Mutation(BENIGN if value == before else ERROR, ("_class_name", str(value), "config.json"),
                    f"_class_name -> {value!r}")


@mutator("config")
def config_file(rng: random.Random, case: Path, seed: str) -> Mutation:
    """config.json that is not a JSON object: broken, a list, empty, deeply nested, huge."""
    choice = rng.choice(["truncated", "list", "empty", "deep", "string", "utf16", "nul"])
    path = case / "config.json"
    text = path.read_bytes()
    path.write_bytes({"truncated": text[:len(text) // 2], "list": b"[" + text + b"]", "empty": b"",
                      "deep": b"[" * 200_000 + b"]" * 200_000, "string": b'"FluxTransformer2DModel"',
                      "utf16": text.decode().encode("utf-16"), "nul": text.replace(b"{", b"{\x00", 1)}[choice])
    return Mutation(ERROR, ("config.json",), f"config.json {choice}")


def _quantization_config(config: dict) -> dict | None:
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


@mutator("quant-config")
def quant_config(rng: random.Random, case: Path, seed: str) -> Mutation:
    """The quantization declaration: block sizes, ignore lists, activation scheme, quant_algo and
    quant_method changed, contradicting the tensors or of the wrong type."""
    config = config_of(case)
    qc = _quantization_config(config)
    if qc is None:  # a 16-bit seed: declare a quantization its tensors do not have
        config["quantization_config"] = rng.choice([
            {"quant_method": "fp8"}, {"quant_method": "fp8", "weight_block_size": [128, 128]},
            {"quant_method": "modelopt", "quant_algo": "FP8"}, {"quant_method": "modelopt", "quant_algo": "NVFP4"},
            {"quant_method": "bitsandbytes"}, {"quant_method": None}, [], "fp8", 5, {}])
        write_config(case, config)
        what = f"16-bit tensors with quantization_config={config['quantization_config']!r}"
        return Mutation(EITHER, ("quantization_config", "quant_method", "config.json"), what)
    key = rng.choice(["weight_block_size", "ignored_layers", "activation_scheme", "quant_algo", "quant_method",
                      "ignore", "modules_to_not_convert", "config_groups", "whole"])
    value = rng.choice({
        "weight_block_size": [[0, 0], [128], [-128, -128], "128", None, [128, 128, 128], [1e30, 1], [True, True],
                              [64, 64], [256, 256], [1, 1], [2**40, 2**40]],
        "ignored_layers": [[1, 2], {"a": 1}, "proj_out", [None], ["*"], [], ["transformer_blocks.0.attn.to_q"],
                           [["x"]]],
        "ignore": [[1, 2], {"a": 1}, "proj_out", [None], ["*"], [], ["transformer_blocks.0.attn.to_q"]],
        "modules_to_not_convert": [[1], "x", ["proj_out"], ["transformer_blocks.0.attn.to_q"]],
        "activation_scheme": ["static", "bogus", None, 5, "DYNAMIC"],
        "quant_algo": ["NVFP4", "FP8", 5, None, "INT4_AWQ", "W4A16_NVFP4", "FP8_PER_CHANNEL_PER_TOKEN", ""],
        "quant_method": ["FP8", "fp4", "modelopt", "", None, 7, ["fp8"], "fp8", "awq"],
        "config_groups": [None, 5, {"g": None}, {"g": {"weights": {"num_bits": 4, "type": "float"}}}],
        "whole": [None, [], "fp8", 5, {}],
    }[key])
    if key == "whole":
        config["quantization_config"] = value
    else:
        qc[key] = value
    write_config(case, config)
    return Mutation(EITHER, (key, "quantization_config", "quant_method", "quant_algo", "config.json"),
                    f"quantization_config.{key} -> {value!r}")


@mutator("config")
def config_extra(rng: random.Random, case: Path, seed: str) -> Mutation:
    """Keys diffusers does not know, or the diffusers version changed: ignored, as diffusers does."""
    config = config_of(case)
    config[rng.choice(["_diffusers_version", "unknown_key", "_name_or_path", "architectures"])] = \
        rng.choice(["0.0.1", "99.0", None, [1, 2], {"a": "b"}])
    write_config(case, config)
    return Mutation(BENIGN, what="config.json gains an unknown key")


@mutator("config")
def config_any_key(rng: random.Random, case: Path, seed: str) -> Mutation:
    """Any key of config.json (every class has its own: Wan's patch_size tuple and qk_norm name, rope
    lengths, ...) set to a hostile value."""
    config = config_of(case)
    key = rng.choice(sorted(k for k in config if k not in ("_class_name", "quantization_config")))
    before = config[key]
    value = rng.choice(HOSTILE_VALUES + ("rms_norm", "layer_norm", "bogus", [1, 2], [0, 0, 0], [2**70, 1, 1],
                                         [None], [1.5, 2, 2], -0.0, ""))
    config[key] = value
    write_config(case, config)
    expect = BENIGN if json.dumps(value) == json.dumps(before) else EITHER
    if key == "attention_head_dim" and isinstance(config.get("axes_dims_rope"), list) and type(value) is int \
            and all(type(a) is int for a in config["axes_dims_rope"]) and sum(config["axes_dims_rope"]) != value:
        expect = ERROR
    return Mutation(expect, (key,), f"config.json {key}: {str(before)[:30]} -> {str(value)[:40]}")
