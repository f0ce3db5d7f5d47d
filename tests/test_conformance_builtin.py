"""The conformance suite run against the builtin fp8 plugin, and shown to fail for broken plugins.

``TestBuiltinFp8Conformance`` is how a third party uses the suite. The broken plugins below are
the builtin fp8 plugin with one fault each; calling the matching test method must raise
AssertionError, so a suite that passes everything cannot hide here.
"""

from __future__ import annotations

import pytest
import torch

from diffgen import hookimpl
from diffgen.builtin import fp8
from diffgen.builtin.fp8_methods import Fp8ScaledMMMethod
from diffgen.platform import PlatformReport
from diffgen.quant import QuantClaim, QuantConfig
from diffgen.rewrites import BlockRewrite
from diffgen.testing.conformance import BUILTIN_FIXTURE_WRITERS, PluginConformance

FP8_FIXTURES = {name: BUILTIN_FIXTURE_WRITERS[name] for name in ("fp8-per-channel", "fp8-per-tensor", "fp8-block")}


class TestBuiltinFp8Conformance(PluginConformance):
    plugin = fp8
    plugin_name = "fp8"
    fixture_writers = FP8_FIXTURES
    online_methods = ("fp8",)
    # Measured on the tiny FLUX (CPU, fp32): cosine 0.99999 to the 16-bit output for every scheme
    # and online; 0.999 leaves room for bf16 on a GPU and still fails a wrong scale or layout.
    reference_min_cosine = 0.999


# -- broken plugins: the builtin fp8 plugin with one fault each --------------------------------
class Fp8Copy:
    """The builtin fp8 plugin's four hooks as methods, so a subclass can break one."""

    @hookimpl
    def check_platform(self, platform):
        return fp8.check_platform(platform)

    @hookimpl
    def detect_quant_config(self, source, request):
        return fp8.detect_quant_config(source, request)

    @hookimpl
    def create_linear_method(self, config, layer, platform):
        return fp8.create_linear_method(config, layer, platform)

    @hookimpl
    def repack_checkpoint(self, config, tensors, target):
        return fp8.repack_checkpoint(config, tensors, target)


class ClaimsEverything(Fp8Copy):
    @hookimpl
    def detect_quant_config(self, source, request):
        return fp8.detect_quant_config(source, request) or QuantClaim(
            QuantConfig.make("fp8", scheme="per-channel"), 10, "every checkpoint looks like fp8 to me")


class NoisyRepack(Fp8Copy):
    @hookimpl
    def repack_checkpoint(self, config, tensors, target):
        def stream():
            for name, tensor in tensors:
                if name.endswith("weight_scale") or name.endswith("weight_scale_inv"):
                    tensor = tensor * (1 + 1e-3 * torch.rand(()))  # a fresh random draw each run
                yield name, tensor
        return stream()


class EagerRepack(Fp8Copy):
    @hookimpl
    def repack_checkpoint(self, config, tensors, target):
        return iter(list(tensors))  # reads the whole checkpoint before the loader asks for a tensor


class RenamesNorms(Fp8Copy):
    @hookimpl
    def repack_checkpoint(self, config, tensors, target):
        return ((n, t * 2 if "norm" in n and t.dtype == torch.bfloat16 else t) for n, t in tensors)


class WrongScaleShape(fp8.Fp8ReferenceMethod):
    def create_weights(self, layer, in_features, out_features, dtype):
        super().create_weights(layer, in_features, out_features, dtype)
        if hasattr(layer, "weight_scale") and layer.weight_scale.dim() == 1:
            layer.weight_scale = torch.nn.Parameter(torch.empty(out_features, 2), requires_grad=False)


class WrongShapes(Fp8Copy):
    @hookimpl
    def create_linear_method(self, config, layer, platform):
        return WrongScaleShape(config, layer) if config.family == "fp8" else None


class WrongNative(fp8.Fp8ReferenceMethod):
    """Labelled native and runnable on the CPU, but drops the scales."""

    name = "fp8-wrong-native"
    kind = "native"

    def apply(self, layer, x, bias):
        return torch.nn.functional.linear(x, layer.weight.to(x.dtype), bias)


class DisagreeingNative(Fp8Copy):
    @hookimpl
    def create_linear_method(self, config, layer, platform):
        if config.family != "fp8":
            return None
        return [fp8.Fp8ReferenceMethod(config, layer), WrongNative(config, layer)]


class SilentPlatform(Fp8Copy):
    @hookimpl
    def check_platform(self, platform):
        return PlatformReport().kernel("fp8-magic", platform.device_kind == "cuda", "")


class SilentOffer(Fp8Copy):
    @hookimpl
    def create_linear_method(self, config, layer, platform):
        if config.family != "fp8":
            return None
        return [fp8.Fp8ReferenceMethod(config, layer), fp8.Fp8ScaledMMMethod(config, layer, unavailable_reason="")]


class RaisesOnGarbage(Fp8Copy):
    @hookimpl
    def detect_quant_config(self, source, request):
        return fp8.detect_quant_config(source, request) if isinstance(
            source.config.get("quantization_config", {}).get("quant_method", ""), str) else None


class ExtraArgument(Fp8Copy):
    @hookimpl
    def detect_quant_config(self, source, request, device):
        return None


class DefaultedArgument(Fp8Copy):
    @hookimpl
    def create_linear_method(self, config, layer, platform=None):
        return fp8.create_linear_method(config, layer, platform)


class Unmarked(Fp8Copy):
    def check_platform(self, platform):  # no @hookimpl: diffgen never calls it
        return None


class PreparedOnTheCpu(Fp8ScaledMMMethod):
    """torch._scaled_mm runs on the CPU too: the PyTorch producers, declared runnable and wanted,
    so the prepared-input test has a method to check here."""

    name = "fp8-prepared-cpu"
    prepared_inputs = True


class WrongShift(PreparedOnTheCpu):
    name = "fp8-wrong-shift"

    def prepare_norm_modulate(self, layer, x, shift, scale, eps, keep_value):
        return super().prepare_norm_modulate(layer, x, -shift, scale, eps, keep_value)


def offering(method_cls):
    class Offering(Fp8Copy):
        @hookimpl
        def create_linear_method(self, config, layer, platform):
            if config.family != "fp8":
                return None
            return [fp8.Fp8ReferenceMethod(config, layer), method_cls(config, layer)]
    Offering.__name__ = f"Offers{method_cls.__name__}"
    return Offering()


class Negated:
    def forward(self, *args, **kwargs):
        return -super().forward(*args, **kwargs)


class Unchanged:
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def feed_forward_rewrite(mixin) -> BlockRewrite:
    rewrite = BlockRewrite()
    rewrite.name, rewrite.block_class, rewrite.forward_mixin = f"ff-{mixin.__name__.lower()}", "FeedForward", mixin
    return rewrite


def suite_for(plugin, rewrites=()) -> PluginConformance:
    class Suite(PluginConformance):
        fixture_writers = FP8_FIXTURES
        online_methods = ("fp8",)
    Suite.plugin, Suite.plugin_name, Suite.rewrites = plugin, "broken", tuple(rewrites)
    return Suite()


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("broken")


@pytest.mark.parametrize("plugin, test, message", [
    (ClaimsEverything(), "test_claims_no_foreign_fixture", "claims checkpoints of other formats: 16bit"),
    (ClaimsEverything(), "test_detection_tolerates_malformed_configs", "claims quantization_config="),
    (RaisesOnGarbage(), "test_detection_tolerates_malformed_configs", "raises on quantization_config="),
    (NoisyRepack(), "test_repack_is_a_function_of_its_input", "give different tensors"),
    (EagerRepack(), "test_repack_is_lazy", "read .* tensors before its stream was iterated"),
    (RenamesNorms(), "test_repack_preserves_what_it_does_not_rename", "keeps its name but not its value"),
    (WrongShapes(), "test_weights_match_the_checkpoint", r"weight_scale is declared torch.float32\[\d+, 2\]"),
    (DisagreeingNative(), "test_methods_agree_with_the_reference", "fp8-wrong-native disagrees"),
    (SilentPlatform(), "test_check_platform_gives_reasons", "fp8-magic is unavailable without a one-line reason"),
    (SilentOffer(), "test_offers_are_well_formed", "fp8-scaled-mm is unavailable without a one-line reason"),
    (ExtraArgument(), "test_hook_signatures_match_the_specs", "takes 'device', which the spec"),
    (DefaultedArgument(), "test_hook_signatures_match_the_specs", "'platform' must be a plain argument"),
    (Unmarked(), "test_hook_signatures_match_the_specs", "check_platform is not marked"),
    (offering(WrongShift), "test_prepared_inputs_match_apply", r"apply_prepared\(prepare_norm_modulate\) has cosine"),
], ids=lambda v: type(v).__name__ if isinstance(v, Fp8Copy) else None)
def test_the_suite_fails_a_broken_plugin(fixtures_dir, plugin, test, message):
    suite = suite_for(plugin)
    context = suite.prepare(fixtures_dir)
    with pytest.raises(AssertionError, match=message):
        getattr(suite, test)(context)


def test_the_suite_fails_a_rewrite_that_changes_the_numbers(fixtures_dir):
    suite = suite_for(Fp8Copy(), rewrites=[feed_forward_rewrite(Negated)])
    with pytest.raises(AssertionError, match=r"the rewritten model \(transformer_blocks.0.ff, .*\) has cosine"):
        suite.test_rewrites_keep_the_numbers(suite.prepare(fixtures_dir))


def test_the_unbroken_copy_passes_the_same_tests(fixtures_dir):
    """The faults above are what fails, not the copy they start from. Tests that have nothing to
    check on the CPU (no native method runs, no prepared inputs) are run with what gives them one."""
    suite = suite_for(Fp8Copy(), rewrites=[feed_forward_rewrite(Unchanged)])
    context = suite.prepare(fixtures_dir)
    cpu_only_skips = {"test_methods_agree_with_the_reference", "test_prepared_inputs_match_apply"}
    for name in dir(suite):
        if name.startswith("test_") and name not in cpu_only_skips:
            getattr(suite, name)(context)
    prepared = suite_for(offering(PreparedOnTheCpu))
    prepared.test_prepared_inputs_match_apply(prepared.prepare(fixtures_dir))
