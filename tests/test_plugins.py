"""The plugin host through its public surface: discovery, isolation, environment, tracing, ranking.

External plugins are real distributions written into tmp_path (package + dist-info with
entry_points.txt) and put on sys.path, so discovery goes through importlib_metadata exactly as
for a pip-installed plugin.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys

import pytest
import torch

import diffgen
from diffgen import hookimpl
from diffgen.builtin.fp8_methods import Fp8ReferenceMethod
from diffgen.errors import NoLinearMethodError, PluginError, QuantConfigError
from diffgen.plugins import best_claim, choose_method, get_plugin_host, reset_plugins
from diffgen.quant import QuantClaim, QuantConfig
from tests.plugin_fixtures import (
    BROKEN_PLUGINS,
    DETECT_RAISES_PLUGIN,
    EXTENDING_PLUGIN,
    EXTRA_ARGUMENT_PLUGIN,
    GOOD_PLUGIN,
    IMPORT_FAILS_PLUGIN,
    MISSPELLED_PLUGIN,
    install_distribution,
    offer,
    save_tiny_flux,
    tiny_flux_inputs,
)

PLUGIN_ENV = ("DIFFGEN_PLUGINS", "DIFFGEN_DISABLE_PLUGINS", "DIFFGEN_STRICT_PLUGINS", "DIFFGEN_TRACE_PLUGINS")


@pytest.fixture(autouse=True)
def fresh_plugin_host(monkeypatch):
    """Every test starts from a host that has not been loaded, with no plugin variable set except
    DIFFGEN_PLUGINS="" (plugins installed in the developer's environment stay out)."""
    for var in PLUGIN_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIFFGEN_PLUGINS", "")
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(*plugins)``: write the distributions, put them on sys.path, and load plugins as a
    user would (DIFFGEN_PLUGINS unset). Their modules are forgotten afterwards."""
    site = tmp_path / "site-packages"
    modules: list[str] = []

    def install_(*plugins):
        for plugin in plugins:
            install_distribution(site, plugin)
            modules.append(plugin.module)
        monkeypatch.syspath_prepend(str(site))
        importlib.invalidate_caches()
        monkeypatch.delenv("DIFFGEN_PLUGINS", raising=False)
        reset_plugins()

    yield install_
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def plugin_env(monkeypatch):
    """``plugin_env(VAR=value, ...)``: set plugin variables and make the next use reload plugins."""
    def set_(**env):
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        reset_plugins()
    return set_


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "transformer")


@pytest.fixture
def toy_checkpoint(tiny_flux, tmp_path):
    """The tiny FLUX checkpoint declaring quant_method "toy" (the good plugin's format)."""
    directory = shutil.copytree(tiny_flux, tmp_path / "toy")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "toy"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def listed(plugins_out: dict) -> dict[str, dict]:
    return {p["name"]: p for p in plugins_out["plugins"]}


def failures_of(plugins_out: dict) -> dict[tuple[str, str], str]:
    return {(f["plugin"], f["stage"]): f["reason"] for f in plugins_out["failures"]}


def quantized(model) -> list:
    return [d for d in model.diffgen_plan.decisions if d.action == "quantize"]


# -- discovery through entry points ---------------------------------------------------------
def test_entry_point_plugin_is_listed_beside_the_builtin(install):
    install(GOOD_PLUGIN)
    out = diffgen.list_plugins()
    plugins = listed(out)
    good = plugins["good"]
    assert (good["distribution"], good["version"], good["module"], good["builtin"]) == \
        ("diffgen-toy-good", "0.1", "diffgen_toy_good", False)
    assert good["hooks"] == ["create_linear_method", "detect_quant_config"]
    assert good["platform"] is None  # it has no check_platform
    assert plugins["fp8"]["builtin"] is True
    assert plugins["fp8"]["platform"]["kernels"]
    assert out["failures"] == []


def test_entry_point_plugin_loads_its_format(install, toy_checkpoint, tiny_flux):
    install(GOOD_PLUGIN)
    model = diffgen.load_transformer(toy_checkpoint, dtype=torch.float32)
    assert model.diffgen_plan.claim.plugin == "good"
    decisions = model.diffgen_plan.decisions
    assert decisions and all(d.action == "quantize" and d.plugin == "good" and d.method.name == "toy-reference"
                             for d in decisions)
    # The toy method is F.linear on the same weights, so it must equal the plain 16-bit load exactly.
    plain = diffgen.load_transformer(tiny_flux, dtype=torch.float32)
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], plain(**inputs, return_dict=False)[0])


def test_broken_plugins_are_reported_and_the_others_keep_working(install, tiny_flux):
    install(GOOD_PLUGIN, *BROKEN_PLUGINS)
    before = diffgen.list_plugins()
    assert {"good", "fp8"} <= set(listed(before))
    assert listed(before)["fp8"]["builtin"] is True
    assert set(failures_of(before)) == {("import_fails", "import"), ("misspelled", "unknown hook"),
                                        ("extra_argument", "register")}

    model = diffgen.load_transformer(tiny_flux, quantization="fp8")
    assert quantized(model) and all(d.plugin == "fp8" for d in quantized(model))
    assert ("detect_raises", "detect_quant_config") in {(f.plugin, f.stage) for f in get_plugin_host().failures}

    reasons = failures_of(diffgen.list_plugins())
    assert reasons == {
        ("import_fails", "import"): "ImportError: libtoy.so not found",
        ("detect_raises", "detect_quant_config"): "RuntimeError: toy detector crashed",
        ("misspelled", "unknown hook"): reasons[("misspelled", "unknown hook")],
        ("extra_argument", "register"): reasons[("extra_argument", "register")],
    }
    assert "'detect_quant_cofnig'" in reasons[("misspelled", "unknown hook")]
    assert "detect_quant_config" in reasons[("misspelled", "unknown hook")]  # the likely intended hook
    assert "create_linear_method" in reasons[("extra_argument", "register")]
    assert "'device'" in reasons[("extra_argument", "register")]  # what is wrong, not only where
    assert all("\n" not in r for r in reasons.values())


def test_a_failure_is_reported_once_however_often_it_happens(install, tiny_flux):
    install(DETECT_RAISES_PLUGIN)
    for _ in range(2):
        diffgen.load_transformer(tiny_flux, quantization="fp8")
    assert diffgen.list_plugins()["failures"] == [
        {"plugin": "detect_raises", "stage": "detect_quant_config", "reason": "RuntimeError: toy detector crashed"}]


# -- DIFFGEN_STRICT_PLUGINS -----------------------------------------------------------------
@pytest.mark.parametrize("plugin, stage", [
    (IMPORT_FAILS_PLUGIN, "import"),
    (MISSPELLED_PLUGIN, "unknown hook"),
    (EXTRA_ARGUMENT_PLUGIN, "register"),
    (DETECT_RAISES_PLUGIN, "detect_quant_config"),
])
def test_strict_mode_makes_each_failure_fatal(install, plugin_env, tiny_flux, plugin, stage):
    install(GOOD_PLUGIN, plugin)
    plugin_env(DIFFGEN_STRICT_PLUGINS="1")
    with pytest.raises(PluginError, match=f"plugin '{plugin.entry_point}' failed at {stage}: "):
        diffgen.load_transformer(tiny_flux, quantization="fp8")


def test_strict_import_failure_stops_list_plugins_too(install, plugin_env):
    install(GOOD_PLUGIN, IMPORT_FAILS_PLUGIN)
    plugin_env(DIFFGEN_STRICT_PLUGINS="1")
    with pytest.raises(PluginError, match="'import_fails' failed at import: ImportError: libtoy.so not found"):
        diffgen.list_plugins()


# -- DIFFGEN_PLUGINS / DIFFGEN_DISABLE_PLUGINS ----------------------------------------------
@pytest.mark.parametrize("allow, names, failures", [
    ("", ["bfl", "fp8"], set()),
    ("good", ["bfl", "fp8", "good"], set()),
    ("diffgen-toy-good", ["bfl", "fp8", "good"], set()),  # the distribution name works too
    (" good , misspelled ", ["bfl", "fp8", "good", "misspelled"], {("misspelled", "unknown hook")}),
    ("good,not-installed", ["bfl", "fp8", "good"], {("not-installed", "import")}),
    # An allowed plugin that fails is reported for its failure, not also as "not installed".
    ("import_fails", ["bfl", "fp8"], {("import_fails", "import")}),
])
def test_allow_list(install, plugin_env, allow, names, failures):
    install(GOOD_PLUGIN, *BROKEN_PLUGINS)
    plugin_env(DIFFGEN_PLUGINS=allow)
    out = diffgen.list_plugins()
    assert sorted(listed(out)) == names
    assert listed(out)["fp8"]["builtin"] is True and listed(out)["bfl"]["builtin"] is True
    assert [(f["plugin"], f["stage"]) for f in out["failures"]] == sorted(failures)
    if ("not-installed", "import") in failures:
        assert "DIFFGEN_PLUGINS" in failures_of(out)[("not-installed", "import")]


@pytest.mark.parametrize("deny", ["good", "diffgen-toy-good"])
def test_deny_list_skips_an_external_plugin(install, plugin_env, deny):
    install(GOOD_PLUGIN, IMPORT_FAILS_PLUGIN)
    plugin_env(DIFFGEN_DISABLE_PLUGINS=f"{deny},import_fails")
    out = diffgen.list_plugins()
    assert "good" not in listed(out) and "fp8" in listed(out)
    assert out["failures"] == []  # a disabled plugin is not even imported


def test_deny_list_disables_the_builtin_fp8(install, plugin_env, tiny_flux):
    install(GOOD_PLUGIN)
    plugin_env(DIFFGEN_DISABLE_PLUGINS="fp8")
    assert "fp8" not in listed(diffgen.list_plugins()) and "good" in listed(diffgen.list_plugins())
    with pytest.raises(QuantConfigError, match="no installed plugin implements online quantization 'fp8'"):
        diffgen.load_transformer(tiny_flux, quantization="fp8")


# -- DIFFGEN_TRACE_PLUGINS ------------------------------------------------------------------
def test_trace_prints_each_hook_call_and_answer(install, plugin_env, tiny_flux, capsys):
    install(GOOD_PLUGIN, DETECT_RAISES_PLUGIN)
    plugin_env(DIFFGEN_TRACE_PLUGINS="1")
    diffgen.load_transformer(tiny_flux, quantization="fp8")
    err = capsys.readouterr().err
    assert "diffgen: detect_quant_config(source=" in err
    assert "-> good: None" in err
    assert "-> fp8: QuantClaim(" in err
    assert "diffgen: create_linear_method(config=" in err and "-> fp8: [" in err
    assert "plugin detect_raises failed at detect_quant_config: RuntimeError: toy detector crashed" in err


def test_no_trace_by_default(install, tiny_flux, capsys):
    install(GOOD_PLUGIN)
    diffgen.load_transformer(tiny_flux, quantization="fp8")
    assert "detect_quant_config" not in capsys.readouterr().err


# -- extensions: converters, quantizers and rewrites published beside the hooks --------------
def _cli(argv, capsys) -> tuple[int, str, str]:
    from diffgen.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # --help
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_plugin_publishes_a_converter_and_rewrites_without_core_changes(install, tiny_flux, capsys):
    install(EXTENDING_PLUGIN)
    info = diffgen.list_plugins()  # other installed plugins (diffgen-cuda, the example) publish theirs too
    assert info["extensions"]["diffgen.converters"]["toy-convert"] == "extending"
    assert info["extensions"]["diffgen.rewrites"]["toy"] == "extending"
    assert info["extensions"]["diffgen.quantizers"]["fp8"] == "fp8"  # the builtin plugin's
    code, out, _ = _cli(["convert", "--help"], capsys)
    assert code == 0 and "toy-convert (plugin extending): a toy converter" in out
    assert _cli(["convert", "toy-convert", "--anything", "x"], capsys)[0] == 0
    module = sys.modules["diffgen_toy_extending"]
    assert module.CALLS == [("convert", ["--anything", "x"])]

    plain = diffgen.load_transformer(tiny_flux, device="cpu", dtype=torch.float32, rewrites=False)
    model = diffgen.load_transformer(tiny_flux, device="cpu", dtype=torch.float32)
    # FLUX's double block has two diffusers FeedForwards; the rewrite that raises is one failure, not fatal.
    assert model.diffgen_rewrites == {"transformer_blocks.0.ff": "toy-count-ff",
                                      "transformer_blocks.0.ff_context": "toy-count-ff"}
    assert failures_of(diffgen.list_plugins())[("extending", "rewrite toy-raises")] == \
        "RuntimeError: toy rewrite crashed"
    module.CALLS.clear()
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], plain(**inputs, return_dict=False)[0])
    assert [c[0] for c in module.CALLS] == ["feed-forward", "feed-forward"]


@pytest.mark.parametrize("env", [{"DIFFGEN_PLUGINS": ""}, {"DIFFGEN_DISABLE_PLUGINS": "extending"},
                                 {"DIFFGEN_PLUGINS": "good"}])
def test_extensions_follow_their_plugin_in_and_out(install, plugin_env, tiny_flux, capsys, env):
    install(EXTENDING_PLUGIN, GOOD_PLUGIN)
    plugin_env(**env)
    code, out, _ = _cli(["convert", "--help"], capsys)
    assert code == 0 and "toy-convert" not in out
    if env.get("DIFFGEN_PLUGINS") == "":
        assert "Installed converters: none" in out  # no external plugin, no converter
    code, _, err = _cli(["convert", "toy-convert"], capsys)
    assert code == 2 and "no installed plugin publishes a converter named 'toy-convert'" in err
    assert diffgen.load_transformer(tiny_flux, dtype=torch.float32).diffgen_rewrites == {}


def test_strict_mode_makes_a_raising_rewrite_fatal(install, plugin_env, tiny_flux):
    install(EXTENDING_PLUGIN)
    plugin_env(DIFFGEN_STRICT_PLUGINS="1")
    with pytest.raises(PluginError, match="plugin 'extending' failed at rewrite toy-raises"):
        diffgen.load_transformer(tiny_flux, dtype=torch.float32)


def test_quantize_help_lists_the_installed_quantizers(install, plugin_env, capsys):
    code, out, _ = _cli(["quantize", "--help"], capsys)
    assert code == 0 and "fp8 (plugin fp8; schemes: per-channel, per-tensor, block)" in out
    plugin_env(DIFFGEN_DISABLE_PLUGINS="fp8")
    code, out, _ = _cli(["quantize", "--help"], capsys)
    assert code == 0 and "Installed quantizers: none" in out


# -- ranking --------------------------------------------------------------------------------
CONFIG_A = QuantConfig.make("fp8", scheme="per-tensor")
CONFIG_B = QuantConfig.make("modelopt-fp8", scheme="per-tensor")


def claim(plugin, specificity, config=CONFIG_A, evidence=None):
    return QuantClaim(config, specificity, evidence or f"{plugin} saw it", plugin)


def test_no_claim_means_no_winner():
    assert best_claim([]) is None


def test_most_specific_claim_wins():
    claims = [claim("a", 10), claim("b", 30, CONFIG_B), claim("c", 20, CONFIG_A)]
    assert best_claim(claims).plugin == "b"


def test_different_configs_tied_at_the_top_are_an_error_naming_both():
    claims = [claim("low", 20), claim("zeta", 30, CONFIG_A, "quant_method=fp8"),
              claim("alpha", 30, CONFIG_B, "quant_algo=FP8 in hf_quant_config.json"), claim("x", 10, CONFIG_B)]
    with pytest.raises(QuantConfigError) as err:
        best_claim(claims)
    message = str(err.value)
    for text in ("alpha", "zeta", "quant_method=fp8", "quant_algo=FP8 in hf_quant_config.json", "specificity 30"):
        assert text in message


def test_equal_configs_tied_at_the_top_are_fine():
    winner = best_claim([claim("b", 30), claim("a", 30, QuantConfig.make("fp8", scheme="per-tensor"))])
    assert winner.config == CONFIG_A and winner.plugin == "a"  # ties resolve by plugin name


@pytest.mark.parametrize("offers, backend, chosen", [
    # native > weight-only > reference, whatever the order of the offers
    ([offer("p", "ref", "reference"), offer("p", "wo", "weight-only"), offer("p", "nat", "native")], None, "p/nat"),
    ([offer("p", "ref", "reference"), offer("q", "wo", "weight-only")], None, "q/wo"),
    # an unavailable native offer is passed over
    ([offer("p", "ref", "reference"), offer("p", "nat", "native", "needs SM100"),
      offer("q", "wo", "weight-only")], None, "q/wo"),
    # equal kinds: plugin name, then method name
    ([offer("z", "a", "native"), offer("b", "y", "native"), offer("b", "x", "native")], None, "b/x"),
    # --quant-backend by method name, then by plugin name
    ([offer("p", "ref", "reference"), offer("p", "nat", "native")], "ref", "p/ref"),
    ([offer("p", "nat", "native"), offer("q", "ref", "reference"), offer("q", "wo", "weight-only")], "q", "q/wo"),
    # ... and by kind: the reference of whichever plugin offers one
    ([offer("p", "nat", "native"), offer("q", "ref", "reference"), offer("q", "wo", "weight-only")], "reference",
     "q/ref"),
    ([offer("p", "nat", "native"), offer("q", "wo", "weight-only")], "weight-only", "q/wo"),
])
def test_choose_method(offers, backend, chosen):
    plugin, method = choose_method(offers, "transformer_blocks.0.attn.to_q", backend)
    assert f"{plugin}/{method.name}" == chosen


def test_nothing_runnable_lists_every_offer_with_its_reason():
    offers = [offer("fp8", "fp8-scaled-mm", "native", "needs CUDA SM89+"),
              offer("kern", "fp8-fast", "native", "libkern is not installed")]
    with pytest.raises(NoLinearMethodError) as err:
        choose_method(offers, "proj_out")
    message = str(err.value)
    assert "'proj_out'" in message
    assert "fp8/fp8-scaled-mm (native): needs CUDA SM89+" in message
    assert "kern/fp8-fast (native): libkern is not installed" in message


def test_forced_backend_that_cannot_run_lists_the_others_too():
    offers = [offer("fp8", "fp8-reference", "reference"), offer("fp8", "fp8-scaled-mm", "native", "needs CUDA")]
    with pytest.raises(NoLinearMethodError) as err:
        choose_method(offers, "proj_out", backend="fp8-scaled-mm")
    message = str(err.value)
    assert "--quant-backend fp8-scaled-mm" in message
    assert "fp8/fp8-scaled-mm (native): needs CUDA" in message
    assert "fp8/fp8-reference (reference): not the forced --quant-backend" in message


def test_no_offer_at_all_says_so():
    with pytest.raises(NoLinearMethodError, match="no plugin offered a method"):
        choose_method([], "proj_out")


# -- ranking through the loader, with plugins registered on the live host -------------------
@pytest.fixture
def register():
    """``register(plugin_object, name)`` on the process-wide host; unregistered afterwards."""
    host = get_plugin_host()
    names: list[str] = []

    def register_(plugin, name):
        host.register(plugin, name)
        names.append(name)

    try:
        yield register_
    finally:
        for name in names:
            host.unregister(name)


class RivalFp8:
    """Claims fp8 where the builtin does, at the same specificity, with another scheme."""

    @hookimpl
    def detect_quant_config(self, source, request):
        if request is not None and request.method == "fp8":
            return QuantClaim(QuantConfig.make("fp8", scheme="per-tensor", online=True), 100,
                              "rival: online fp8 per-tensor")
        if (source.config.get("quantization_config") or {}).get("quant_method") == "fp8":
            return QuantClaim(QuantConfig.make("fp8", scheme="block"), 10, "rival: fp8 means block here")
        return None


class FastFp8Method(Fp8ReferenceMethod):
    """The builtin math under a native label: a stand-in for a kernel plugin."""

    name = "fp8-fast"
    kind = "native"


class FastFp8:
    @hookimpl
    def create_linear_method(self, config, layer):
        return FastFp8Method(config, layer) if config.family == "fp8" else None


def test_rival_claim_at_the_builtins_specificity_is_an_error(register, tiny_flux):
    register(RivalFp8(), "rival")
    with pytest.raises(QuantConfigError) as err:
        diffgen.load_transformer(tiny_flux, quantization="fp8")
    message = str(err.value)
    assert "rival (rival: online fp8 per-tensor" in message
    assert "fp8 (--quantization fp8 on a 16-bit checkpoint" in message


def test_rival_claim_on_a_declared_checkpoint_is_an_error(register, tiny_flux, tmp_path):
    directory = shutil.copytree(tiny_flux, tmp_path / "declared")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (directory / "config.json").write_text(json.dumps(config))
    # float8 weights with no scale tensor: the declaration stands, unconfirmed (specificity 10)
    from safetensors.torch import load_file, save_file

    weights = directory / "diffusion_pytorch_model.safetensors"
    tensors = {k: v.to(torch.float8_e4m3fn) if k.endswith("attn.to_q.weight") else v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    register(RivalFp8(), "rival")
    with pytest.raises(QuantConfigError, match=r"specificity 10: fp8 \(quantization_config.quant_method=fp8 in config.json"
                                               r".*rival \(rival: fp8 means block here"):
        diffgen.load_transformer(directory)


def test_available_native_offer_beats_the_builtin_reference(register, tiny_flux):
    register(FastFp8(), "fast")
    model = diffgen.load_transformer(tiny_flux, quantization="fp8")
    assert quantized(model)
    for d in quantized(model):
        assert (d.plugin, d.method.name, d.method.kind) == ("fast", "fp8-fast", "native")
        assert d.reason == "native method of plugin fast"


@pytest.mark.parametrize("backend", ["fp8-reference", "fp8"])
def test_quant_backend_forces_the_builtin(register, tiny_flux, backend):
    register(FastFp8(), "fast")
    model = diffgen.load_transformer(tiny_flux, quantization="fp8", quant_backend=backend)
    assert quantized(model)
    for d in quantized(model):
        assert d.plugin == "fp8"
        assert d.method.name in ({"fp8-reference"} if backend == "fp8-reference" else
                                 {"fp8-reference", "fp8-scaled-mm"})


def test_wrong_answer_types_are_recorded_not_fatal(register, flux_dir):
    """A plugin answering with the wrong type is isolated like one that raises."""

    class Confused:
        @diffgen.hookimpl
        def detect_quant_config(self, source):
            return "fp8, I think"

        @diffgen.hookimpl
        def create_linear_method(self, config):
            return [42]

    register(Confused(), "confused")
    model = diffgen.load_transformer(flux_dir, quantization="fp8")
    assert model.diffgen_plan.claim.plugin == "fp8"
    stages = {(f.plugin, f.stage) for f in get_plugin_host().failures}
    assert {("confused", "detect_quant_config"), ("confused", "create_linear_method")} <= stages


class _ExitsAtEveryHook:
    """A plugin that calls sys.exit in its hooks."""

    @diffgen.hookimpl
    def check_platform(self, platform):
        raise SystemExit(3)

    @diffgen.hookimpl
    def detect_quant_config(self, source):
        raise SystemExit(4)


class _BadAnswers:
    @diffgen.hookimpl
    def check_platform(self, platform):
        return "all good"

    @diffgen.hookimpl
    def repack_checkpoint(self, tensors):
        return 42


class _BreaksMidStream:
    @diffgen.hookimpl
    def repack_checkpoint(self, tensors):
        def stream():
            for i, pair in enumerate(tensors):
                if i == 3:
                    raise RuntimeError("ran out of patience")
                yield pair
        return stream()


def test_a_plugin_calling_sys_exit_is_recorded_not_obeyed(register, tiny_flux):
    register(_ExitsAtEveryHook(), "exiter")
    model = diffgen.load_transformer(tiny_flux, device="cpu")  # loads as 16-bit, the process lives
    assert model is not None
    report = diffgen.list_plugins("cpu")
    stages = {(f["plugin"], f["stage"]) for f in report["failures"]}
    assert {("exiter", "check_platform"), ("exiter", "detect_quant_config")} <= stages


def test_answers_of_the_wrong_type_are_recorded_against_their_plugin(register, tiny_flux):
    register(_BadAnswers(), "bad")
    diffgen.load_transformer(tiny_flux, device="cpu")  # the non-iterable stream is skipped
    report = diffgen.list_plugins("cpu")
    reasons = {f["stage"]: f["reason"] for f in report["failures"] if f["plugin"] == "bad"}
    assert reasons["check_platform"] == "returned str, not a PlatformReport"
    assert reasons["repack_checkpoint"].startswith("returned int, not an iterator")


def test_a_stream_that_breaks_names_its_plugin(register, tiny_flux):
    from diffgen.errors import PluginError

    register(_BreaksMidStream(), "breaker")
    with pytest.raises(PluginError, match="^plugin 'breaker' failed while repacking the checkpoint: RuntimeError: "
                                          "ran out of patience; disable it with DIFFGEN_DISABLE_PLUGINS=breaker"):
        diffgen.load_transformer(tiny_flux, device="cpu")
