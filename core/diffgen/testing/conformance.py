"""A conformance suite that a plugin's own tests run against that plugin (as langchain-tests does).

Subclass :class:`PluginConformance` in a test module, name the subclass ``Test...`` and fill in
the class attributes; pytest then runs every ``test_*`` method below against your plugin::

    from diffgen.testing.conformance import PluginConformance
    import diffgen_int8wo.plugin
    from diffgen_int8wo.quantize import write_fixture

    class TestInt8woConformance(PluginConformance):
        plugin = diffgen_int8wo.plugin            # the module (or object) with @hookimpl functions
        plugin_name = "int8wo"                    # its entry-point name
        fixture_writers = {"int8wo": write_fixture}   # format name -> writer(src_dir, dst_dir)

A fixture writer turns a tiny 16-bit diffusers transformer directory (``src``, written by
:func:`diffgen.tiny.transformers.save_tiny_transformer`) into a checkpoint of the
format at ``dst``. Fixtures of *other* formats come from :data:`BUILTIN_FIXTURE_WRITERS` (16-bit and
the builtin fp8 schemes) and from every installed distribution that publishes writers in the
entry-point group ``diffgen.fixtures`` (``[project.entry-points."diffgen.fixtures"] NAME =
"pkg.module:writer"``), except distributions named in ``DIFFGEN_DISABLE_PLUGINS``; a foreign
writer that fails is skipped with a warning, since it is not the tested plugin's fault.

The plugin is registered alone (plus ``companions``, builtin plugins it builds on) in a strict
:class:`~diffgen.plugins.PluginHost`, so an exception in one of its hooks fails the test that
caused it. Models load through :func:`diffgen.load_transformer` on the machine's default device
(the CPU in CI, where only methods that run there are compared). Each test method takes one
argument, the class-scoped :class:`ConformanceContext`; ``suite.prepare(directory)`` builds one
for calling a test method directly. Needs pytest.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from .. import hookspecs
from ..builtin import fp8 as fp8_plugin
from ..checkpoint import open_checkpoint
from ..errors import PluginError
from ..linear import KIND_RANK, LinearMethod, PreparedInputMethod, QuantLinear, gelu_concat, norm_modulate
from ..plan import build_meta_model, plan
from ..platform import Platform, PlatformReport, resolve
from ..plugins import BUILTIN_PLUGINS, PluginHost, best_claim, using_plugin_host
from ..quant import LayerSpec, QuantClaim, QuantConfig, QuantRequest, RepackTarget, linear_layers
from ..rewrites import BlockRewrite, apply_rewrites, undo_rewrites
from ..tiny.transformers import save_tiny_transformer, tiny_transformer, tiny_transformer_inputs

from .conformance_fixtures import (  # noqa: F401 (re-exported for plugin authors)
    BUILTIN_FIXTURE_WRITERS,
    FAKE_PLATFORMS,
    HOSTILE_QUANTIZATION_CONFIGS,
    ConformanceContext,
    FIXTURE_ENTRY_POINT_GROUP,
    FixtureWriter,
    HOOKS,
    UNKNOWN_FAMILY,
    _CountingStream,
    _compatible_dtype,
    _compatible_shape,
    _cosine,
    _hostile_fixture,
    _on,
    _one_line,
    _owner,
    _run,
    _same_tensor,
    installed_fixture_writers,
    write_fixture,
)


# -- the suite --------------------------------------------------------------------------------
class PluginConformance:
    """Base class of a plugin's conformance tests; see the module docstring."""

    # Required.
    plugin: ClassVar[Any] = None                       # module or object with @hookimpl functions
    plugin_name: ClassVar[str] = ""                    # its name in diffgen (entry-point name)
    fixture_writers: ClassVar[dict[str, FixtureWriter]] = {}  # its format(s): name -> writer
    # Optional.
    family: ClassVar[str] = "flux1"                    # tiny model family (diffgen.testing.TINY_TRANSFORMERS)
    companions: ClassVar[tuple[str, ...]] = ()         # builtin plugins registered beside it ("fp8")
    online_methods: ClassVar[tuple[str, ...]] = ()     # --quantization names it implements
    claims_foreign: ClassVar[tuple[str, ...]] = ()     # foreign fixtures it may claim on purpose
    declared_tensors: ClassVar[Callable[[LayerSpec], dict[str, tuple[tuple[int, ...], torch.dtype]]] | None] = None
    reference_min_cosine: ClassVar[float] = 0.99      # reference output vs the 16-bit model
    native_min_cosine: ClassVar[float] = 0.999         # each other method vs the reference
    rewrites: ClassVar[tuple[BlockRewrite, ...]] = ()  # the rewrites it publishes in diffgen.rewrites

    # -- setup ------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def conformance(cls, tmp_path_factory) -> ConformanceContext:
        return cls().prepare(tmp_path_factory.mktemp(f"conformance-{cls.plugin_name or 'plugin'}"))

    def prepare(self, directory: Path) -> ConformanceContext:
        """Write (or reuse) every fixture under ``directory``."""
        assert self.plugin is not None and self.plugin_name, \
            f"{type(self).__name__} must set `plugin` and `plugin_name`"
        assert self.fixture_writers, f"{type(self).__name__} must set `fixture_writers` (name -> writer)"
        directory = Path(directory)
        src = write_fixture("16bit-source", lambda s, d: save_tiny_transformer(self.family, d, seed=0),
                            Path(), directory, self.family)
        own = {name: write_fixture(name, w, src, directory, self.family) for name, w in self.fixture_writers.items()}
        foreign: dict[str, Path] = {}
        candidates = {**BUILTIN_FIXTURE_WRITERS, **installed_fixture_writers()}
        for name, writer in candidates.items():
            if name in own or name in self.claims_foreign:
                continue
            try:
                foreign[name] = write_fixture(name, writer, src, directory, self.family)
            except Exception as exc:  # another plugin's writer: not the tested plugin's fault
                if name in BUILTIN_FIXTURE_WRITERS:
                    raise
                warnings.warn(f"diffgen conformance: skipping fixture {name!r}: its writer failed "
                              f"({type(exc).__name__}: {exc})", stacklevel=2)
        hostile = {name: _hostile_fixture(src, directory / f"hostile-{name}", qc)
                   for name, qc in HOSTILE_QUANTIZATION_CONFIGS.items()}
        platform, dtype = resolve()
        return ConformanceContext(src, own, foreign, hostile, platform, dtype)

    def plugin_host(self, *, companions: bool = True, strict: bool = True) -> PluginHost:
        """A host with only this plugin (and, if asked, its companions) registered."""
        host = PluginHost(strict=strict, trace=False)
        if companions:
            for name in self.companions:
                host.register(importlib.import_module(BUILTIN_PLUGINS[name]), name, builtin=True)
        host.register(self.plugin, self.plugin_name)
        return host

    def hook_impls(self) -> dict[str, Callable]:
        """This plugin's functions marked with ``@diffgen.hookimpl``, by name."""
        marker = f"{hookspecs.PROJECT}_impl"
        out = {}
        for attr in dir(self.plugin):
            value = getattr(self.plugin, attr, None)
            if callable(value) and getattr(value, marker, None) is not None:
                out[attr] = value
        return out

    def _require_hook(self, hook: str) -> None:
        if hook not in self.hook_impls():
            pytest.skip(f"plugin {self.plugin_name} does not implement {hook}")

    def _claim(self, host: PluginHost, path: Path, request: QuantRequest | None = None) -> QuantClaim | None:
        claims = [c for c in host.detect_quant_config(open_checkpoint(path), request) if c.plugin == self.plugin_name]
        assert len(claims) <= 1, f"{self.plugin_name} answered detect_quant_config more than once"
        return claims[0] if claims else None

    def _winning_config(self, path: Path, request: QuantRequest | None = None) -> QuantConfig:
        host = self.plugin_host()
        claim = best_claim(host.detect_quant_config(open_checkpoint(path), request))
        assert claim is not None, f"no plugin of {[self.plugin_name, *self.companions]} claims {path}"
        return claim.config

    def _load(self, ctx: ConformanceContext, path: Path, **kwargs) -> torch.nn.Module:
        import diffgen

        with using_plugin_host(self.plugin_host()):
            return diffgen.load_transformer(path, device=ctx.platform.device, dtype=ctx.dtype, **kwargs)

    def _inputs(self, ctx: ConformanceContext, model_16bit: torch.nn.Module) -> dict:
        return _on(tiny_transformer_inputs(self.family, model_16bit, seed=1), ctx.platform, ctx.dtype)

    def _runtime_plan(self, ctx: ConformanceContext, path: Path, host: PluginHost):
        """The plan the loader would make, and the RepackTarget it would pass."""
        source = open_checkpoint(path)
        planned = plan(source, platform=ctx.platform, dtype=ctx.dtype, host=host)
        return source, planned, planned.target("runtime")

    def _checkpoint_target(self, source, request: QuantRequest | None = None) -> RepackTarget:
        """The target ``diffgen quantize`` passes for ``request``, or an offline repack of one of
        the plugin's own checkpoints."""
        platform, dtype = resolve("cpu", torch.bfloat16)
        return plan(source, platform=platform, dtype=dtype, request=request, host=self.plugin_host()).target("checkpoint")

    @staticmethod
    def _foreign_target(source) -> RepackTarget:
        """A runtime target for a checkpoint in a format the tested plugin does not know: the
        model's linears, every tensor expected as stored (it is in the runtime layout already)."""
        model = build_meta_model(source)
        linears = tuple(spec.name for spec in linear_layers(model, torch.bfloat16))
        return RepackTarget("runtime", type(model).__name__, dict(source.config),
                            {n: (tuple(i.shape), i.dtype) for n, i in source.tensors.items()}, linears)

    def _own_offers(self, host: PluginHost, config: QuantConfig, spec: LayerSpec,
                    platform: Platform) -> list[LinearMethod]:
        return [m for p, m in host.create_linear_method(config, spec, platform) if p == self.plugin_name]

    # -- hooks and signatures -----------------------------------------------------------------
    def test_hook_signatures_match_the_specs(self, conformance: ConformanceContext) -> None:
        impls = self.hook_impls()
        problems = []
        if not impls:
            problems.append("implements no hook (functions need the @diffgen.hookimpl marker)")
        for name in dir(self.plugin):
            if name in HOOKS and name not in impls and callable(getattr(self.plugin, name, None)):
                problems.append(f"{name} is not marked @diffgen.hookimpl, so diffgen never calls it")
        for name, fn in impls.items():
            opts = getattr(fn, f"{hookspecs.PROJECT}_impl")
            if name not in HOOKS and not opts.get("specname"):
                problems.append(f"{name} is not a diffgen hook (hooks are {', '.join(HOOKS)})")
                continue
            spec = inspect.signature(getattr(hookspecs, opts.get("specname") or name))
            for flag in ("wrapper", "hookwrapper"):
                if opts.get(flag):
                    problems.append(f"{name} is a {flag}; diffgen calls each implementation on its own")
            for param in inspect.signature(fn).parameters.values():
                if param.name not in spec.parameters:
                    problems.append(f"{name} takes {param.name!r}, which the spec "
                                    f"{name}{tuple(spec.parameters)} does not have")
                elif param.kind is not param.POSITIONAL_OR_KEYWORD or param.default is not param.empty:
                    problems.append(f"{name}: argument {param.name!r} must be a plain argument "
                                    "(pluggy never passes keyword-only or defaulted ones)")
        assert not problems, f"plugin {self.plugin_name}: " + "; ".join(problems)
        self.plugin_host(companions=False)  # registers cleanly (strict: raises otherwise)

    # -- check_platform and offers ------------------------------------------------------------
    def test_check_platform_gives_reasons(self, conformance: ConformanceContext) -> None:
        self._require_hook("check_platform")
        host = self.plugin_host(companions=False)
        problems = []
        platforms = {**FAKE_PLATFORMS, "this machine": conformance.platform}
        for where, platform in platforms.items():
            report = host.check_platform(platform).get(self.plugin_name)
            if report is None:
                continue
            if not isinstance(report, PlatformReport):
                problems.append(f"{where}: returned {type(report).__name__}, not a PlatformReport")
                continue
            for kernel in report.kernels:
                if not _one_line(kernel.name):
                    problems.append(f"{where}: a kernel has no one-line name ({kernel.name!r})")
                if not isinstance(kernel.available, bool):
                    problems.append(f"{where}: {kernel.name}.available is {kernel.available!r}, not a bool")
                if not kernel.available and not _one_line(kernel.reason):
                    problems.append(f"{where}: {kernel.name} is unavailable without a one-line reason "
                                    f"({kernel.reason!r})")
        assert not problems, f"plugin {self.plugin_name} check_platform: " + "; ".join(problems)

    def test_offers_are_well_formed(self, conformance: ConformanceContext) -> None:
        self._require_hook("create_linear_method")
        host = self.plugin_host()
        problems = []
        for fixture, path in conformance.own.items():
            config = self._winning_config(path)
            model = build_meta_model(open_checkpoint(path))
            specs = [s for s in linear_layers(model, conformance.dtype) if config.ignored_by(s.name) is None]
            for where, platform in FAKE_PLATFORMS.items():
                for spec in specs:
                    offers = self._own_offers(host, config, spec, platform)
                    names = [m.name for m in offers]
                    if len(set(names)) != len(names):
                        problems.append(f"{fixture} on {where}: method names repeat: {names}")
                    for m in offers:
                        if m.kind not in KIND_RANK or not _one_line(m.name) or m.name == LinearMethod.name:
                            problems.append(f"{fixture} on {where}: offer {m.name!r} has kind {m.kind!r}; "
                                            f"needs a name and one of {list(KIND_RANK)}")
                        if m.unavailable_reason is not None and not _one_line(m.unavailable_reason):
                            problems.append(f"{fixture} on {where}: {m.name} is unavailable without a "
                                            f"one-line reason ({m.unavailable_reason!r})")
                    if where == "cpu" and not any(m.kind == "reference" and m.unavailable_reason is None
                                                  for m in offers):
                        problems.append(f"{fixture}: no reference method runs on the CPU for {spec.name} "
                                        f"(offers: {names})")
            foreign = self._own_offers(host, QuantConfig.make(UNKNOWN_FAMILY), specs[0], conformance.platform)
            if foreign:
                problems.append(f"offers {[m.name for m in foreign]} for a family it does not know")
        assert not problems, f"plugin {self.plugin_name}: " + "; ".join(sorted(set(problems))[:12])

    # -- detection ----------------------------------------------------------------------------
    def test_claims_its_own_fixtures(self, conformance: ConformanceContext) -> None:
        self._require_hook("detect_quant_config")
        host = self.plugin_host(companions=False)
        for fixture, path in conformance.own.items():
            claim = self._claim(host, path)
            assert claim is not None, f"{self.plugin_name} does not claim its own {fixture} fixture ({path})"
            assert isinstance(claim.config, QuantConfig) and not claim.config.online, \
                f"{fixture}: the claim's config must be a checkpoint QuantConfig, got {claim.config!r}"
            assert isinstance(claim.specificity, int) and claim.specificity > 0, \
                f"{fixture}: specificity must be a positive int, got {claim.specificity!r}"
            assert _one_line(claim.evidence), f"{fixture}: the claim needs one line of evidence"
            assert getattr(claim, "unsupported_reason", None) is None, \
                f"{fixture}: claimed as unsupported ({claim.unsupported_reason}), but its own writer made it"
            winner = best_claim(self.plugin_host().detect_quant_config(open_checkpoint(path), None))
            assert winner is not None and winner.config == claim.config, \
                f"{fixture}: {self.plugin_name}'s claim loses to {winner}"

    def test_claims_no_foreign_fixture(self, conformance: ConformanceContext) -> None:
        self._require_hook("detect_quant_config")
        host = self.plugin_host(companions=False)
        claimed = []
        for fixture, path in conformance.foreign.items():
            claim = self._claim(host, path)
            if claim is not None:
                claimed.append(f"{fixture} ({claim.evidence})")
        claim = self._claim(host, conformance.source_16bit, QuantRequest(UNKNOWN_FAMILY))
        if claim is not None:
            claimed.append(f"16-bit with --quantization {UNKNOWN_FAMILY} ({claim.evidence})")
        assert not claimed, f"{self.plugin_name} claims checkpoints of other formats: {'; '.join(claimed)}"

    def test_detection_tolerates_malformed_configs(self, conformance: ConformanceContext) -> None:
        self._require_hook("detect_quant_config")
        host = self.plugin_host(companions=False)
        problems = []
        for fixture, path in conformance.hostile.items():
            qc = HOSTILE_QUANTIZATION_CONFIGS[fixture]
            try:
                claim = self._claim(host, path)
            except PluginError as exc:
                problems.append(f"raises on quantization_config={qc!r}: {exc.__cause__!r}")
                continue
            if claim is not None:
                problems.append(f"claims quantization_config={qc!r} ({claim.evidence})")
        assert not problems, f"{self.plugin_name} detect_quant_config " + "; ".join(problems)

    def test_online_methods_are_claimed_and_load(self, conformance: ConformanceContext) -> None:
        if not self.online_methods:
            pytest.skip(f"plugin {self.plugin_name} declares no online_methods")
        host = self.plugin_host(companions=False)
        model_16bit = self._load(conformance, conformance.source_16bit)
        inputs = self._inputs(conformance, model_16bit)
        expected = _run(model_16bit, inputs)
        for method in self.online_methods:
            claim = self._claim(host, conformance.source_16bit, QuantRequest(method))
            assert claim is not None and claim.config.online, \
                f"{self.plugin_name} does not claim --quantization {method} on a 16-bit checkpoint"
            quantized = self._load(conformance, conformance.source_16bit, quantization=method)
            cos = _cosine(_run(quantized, inputs), expected)
            assert cos >= self.reference_min_cosine, \
                f"--quantization {method}: cosine {cos:.5f} to the 16-bit model < {self.reference_min_cosine}"

    # -- linear methods -----------------------------------------------------------------------
    def test_weights_match_the_checkpoint(self, conformance: ConformanceContext) -> None:
        """Every offered method (runnable here or not) declares exactly the layer's checkpoint
        tensors, by name, shape and dtype, as they arrive after repack_checkpoint."""
        host = self.plugin_host()
        problems = []
        for fixture, path in conformance.own.items():
            source, plan, target = self._runtime_plan(conformance, path, host)
            assert plan.claim is not None, f"{fixture}: no plugin claims it, so nothing is quantized"
            stream = host.repack_checkpoint(plan.config, source.iter_tensors(), target, first=self.plugin_name)
            stored = {n: (tuple(t.shape), t.dtype) for n, t in stream}
            for d in (d for d in plan.decisions if d.action == "quantize"):
                spec = d.layer
                layer_stored = {n.rpartition(".")[2]: v for n, v in stored.items() if _owner(n) == spec.name}
                methods = {}
                for platform in (conformance.platform, *FAKE_PLATFORMS.values()):
                    for m in self._own_offers(host, plan.config, spec, platform):
                        methods.setdefault(m.name, m)
                declared_tensors = type(self).declared_tensors  # a plain function, not bound to self
                if declared_tensors is not None:
                    declared = dict(declared_tensors(spec))
                    if spec.bias:
                        declared["bias"] = ((spec.out_features,), conformance.dtype)
                    problems += self._compare(f"{fixture}: checkpoint vs declared_tensors", spec.name,
                                              declared, layer_stored)
                for m in methods.values():
                    with torch.device("meta"):
                        layer = QuantLinear(spec, m, dtype=conformance.dtype)
                    made = {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict(keep_vars=True).items()}
                    problems += self._compare(f"{fixture}: method {m.name}", spec.name, made, layer_stored)
        assert not problems, f"plugin {self.plugin_name}: " + "; ".join(problems[:12])

    @staticmethod
    def _compare(what: str, layer: str, made: dict, stored: dict) -> list[str]:
        out = []
        missing, unexpected = sorted(set(made) - set(stored)), sorted(set(stored) - set(made))
        if missing or unexpected:
            out.append(f"{what}: layer {layer} declares {sorted(made)}, the checkpoint has {sorted(stored)}")
        for key in sorted(set(made) & set(stored)):
            (ms, md), (ss, sd) = made[key], stored[key]
            if not _compatible_shape(ms, ss) or not _compatible_dtype(md, sd):
                out.append(f"{what}: {layer}.{key} is declared {md}{list(ms)}, stored as {sd}{list(ss)}")
        return out

    def test_reference_matches_the_16bit_model(self, conformance: ConformanceContext) -> None:
        model_16bit = self._load(conformance, conformance.source_16bit)
        inputs = self._inputs(conformance, model_16bit)
        expected = _run(model_16bit, inputs)
        for fixture, path in conformance.own.items():
            references = self._runnable_everywhere(conformance, path, kinds=("reference",))
            assert references, f"{fixture}: no reference method of {self.plugin_name} runs on " \
                               f"{conformance.platform.describe()} for every quantized layer"
            for name in references:
                cos = _cosine(_run(self._load(conformance, path, quant_backend=name), inputs), expected)
                assert cos >= self.reference_min_cosine, \
                    f"{fixture}: {name} output has cosine {cos:.5f} to the 16-bit model " \
                    f"(< {self.reference_min_cosine})"

    def test_methods_agree_with_the_reference(self, conformance: ConformanceContext) -> None:
        """Each native / weight-only method that runs here against the plugin's reference."""
        model_16bit = self._load(conformance, conformance.source_16bit)
        inputs = self._inputs(conformance, model_16bit)
        compared, why_not = 0, set()
        for fixture, path in conformance.own.items():
            references = self._runnable_everywhere(conformance, path, kinds=("reference",))
            others = self._runnable_everywhere(conformance, path, kinds=("native", "weight-only"), why_not=why_not)
            if not references or not others:
                continue
            expected = _run(self._load(conformance, path, quant_backend=references[0]), inputs)
            for name in others:
                cos = _cosine(_run(self._load(conformance, path, quant_backend=name), inputs), expected)
                assert cos >= self.native_min_cosine, \
                    f"{fixture}: {name} disagrees with {references[0]}: cosine {cos:.5f} < {self.native_min_cosine}"
                compared += 1
        if not compared:
            pytest.skip(f"no native or weight-only method of {self.plugin_name} runs on "
                        f"{conformance.platform.describe()}: {'; '.join(sorted(why_not)) or 'none offered'}")

    def _loaded_cases(self, ctx: ConformanceContext) -> Iterator[tuple[str, dict]]:
        """(what, load_transformer arguments) for each own fixture and online method, per method
        that runs here for every quantized layer."""
        cases = [(f, {"path": p}, p, None) for f, p in ctx.own.items()]
        cases += [(f"--quantization {m}", {"path": ctx.source_16bit, "quantization": m}, ctx.source_16bit,
                   QuantRequest(m)) for m in self.online_methods]
        for what, kwargs, path, request in cases:
            for name in self._runnable_everywhere(ctx, path, kinds=tuple(KIND_RANK), request=request):
                yield f"{what} with {name}", {**kwargs, "quant_backend": name}

    def test_prepared_inputs_match_apply(self, conformance: ConformanceContext) -> None:
        """Methods that take prepared inputs (``diffgen.linear.PreparedInputMethod``) compute, from
        an input prepared by each producer, what ``apply`` computes on the producer's 16-bit output."""
        g = torch.Generator().manual_seed(7)
        checked, problems = 0, []
        for what, kwargs in self._loaded_cases(conformance):
            model = self._load(conformance, kwargs.pop("path"), **kwargs)
            for name, layer in model.named_modules():
                method = getattr(layer, "method", None)
                if not isinstance(method, PreparedInputMethod) or not method.takes_prepared_input(layer, None):
                    continue
                checked += 1
                problems += self._check_prepared(what, name, layer, method, conformance, g)
        if not checked:
            pytest.skip(f"no method of {self.plugin_name} that runs on {conformance.platform.describe()} "
                        "takes prepared inputs")
        assert not problems, f"plugin {self.plugin_name}: " + "; ".join(problems[:12])

    def _check_prepared(self, what, name, layer, method, ctx: ConformanceContext, g) -> list[str]:
        def randn(*shape):
            return torch.randn(*shape, generator=g).to(ctx.platform.device, ctx.dtype)

        k, rows = layer.in_features, 2 * 24
        x, shift, scale = randn(2, 24, k) * 3, randn(2, k), randn(2, k) * 0.5
        a, h = randn(2, 24, k // 2), randn(2, 24, k - k // 2) * 2
        problems = []
        if not method.takes_prepared_input(layer, rows):
            return problems
        if not method.shares_prepared_input(layer, layer):
            problems.append(f"{what}: {name} says it cannot share a prepared input with itself")
        with torch.no_grad():
            prepared, value = method.prepare_norm_modulate(layer, x, shift, scale, 1e-6, True)
            expected_value = norm_modulate(x, shift, scale, 1e-6)
            cases = {"prepare_norm_modulate": (prepared, expected_value),
                     "prepare_gelu_concat": (method.prepare_gelu_concat(layer, a, h), gelu_concat(a, h))}
            if _cosine(value.float().cpu(), expected_value.float().cpu()) < self.native_min_cosine:
                problems.append(f"{what}: {name}.prepare_norm_modulate's 16-bit value is not norm_modulate's")
            for producer, (prepared, y16) in cases.items():
                got = method.apply_prepared(layer, prepared, layer.bias, ctx.dtype)
                want = layer(y16).reshape(got.shape)
                cos = _cosine(got.float().cpu(), want.float().cpu())
                if cos < self.native_min_cosine:
                    problems.append(f"{what}: {name}: apply_prepared({producer}) has cosine {cos:.5f} to "
                                    f"apply on its 16-bit output (< {self.native_min_cosine})")
        return problems

    def test_rewrites_keep_the_numbers(self, conformance: ConformanceContext) -> None:
        """Each published rewrite is well formed; applied to models of the family that have its
        block class, the rewritten model matches the model as loaded, and taking the rewrites out
        (``undo_rewrites``) gives the loaded model's numbers back."""
        for rewrite in self.rewrites:
            assert isinstance(rewrite, BlockRewrite) and _one_line(rewrite.name) and _one_line(rewrite.block_class), \
                f"{rewrite!r}: a rewrite needs a one-line name and block_class"
            mixin = rewrite.forward_mixin
            assert mixin is None or callable(getattr(mixin, "forward", None)), f"{rewrite.name}: forward_mixin has no forward"
        classes = {type(m).__name__ for m in tiny_transformer(self.family).modules()}
        relevant = [r for r in self.rewrites if r.block_class in classes]
        if not relevant:
            pytest.skip(f"plugin {self.plugin_name} publishes no rewrite for the {self.family} model's classes")
        model_16bit = self._load(conformance, conformance.source_16bit)
        inputs = self._inputs(conformance, model_16bit)
        rewritten_any = False
        for what, kwargs in self._loaded_cases(conformance):
            path = kwargs.pop("path")
            plain = _run(self._load(conformance, path, **kwargs), inputs)
            model = self._load(conformance, path, **kwargs)
            declined: dict = {}
            done = apply_rewrites(model, relevant, conformance.platform, declined=declined)
            assert all(_one_line(reason) for _, reason in declined.values()), \
                f"{what}: a rewrite declined without a one-line reason: {declined}"
            rewritten_any |= bool(done)
            outputs = {"rewritten": _run(model, inputs)}
            undo_rewrites(model)
            outputs["undone"] = _run(model, inputs)
            for label, out in outputs.items():
                cos = _cosine(out, plain)
                assert cos >= self.native_min_cosine, \
                    f"{what}: the {label} model ({', '.join(done) or 'nothing rewritten'}) has cosine {cos:.6f} " \
                    f"to the model as loaded (< {self.native_min_cosine})"
        assert rewritten_any, f"no rewrite of {self.plugin_name} applied to any module of its own fixtures " \
                              f"(declined: {declined})"

    def _runnable_everywhere(self, ctx: ConformanceContext, path: Path, kinds: tuple[str, ...],
                             why_not: set | None = None, request: QuantRequest | None = None) -> list[str]:
        """Names of this plugin's methods of ``kinds`` that run here for every quantized layer."""
        host = self.plugin_host()
        config = self._winning_config(path, request)
        model = build_meta_model(open_checkpoint(path))
        runnable: dict[str, bool] = {}
        for spec in linear_layers(model, ctx.dtype):
            if config.ignored_by(spec.name) is not None:
                continue
            for m in self._own_offers(host, config, spec, ctx.platform):
                if m.kind in kinds:
                    runnable[m.name] = runnable.get(m.name, True) and m.unavailable_reason is None
                    if m.unavailable_reason and why_not is not None:
                        why_not.add(f"{m.name}: {m.unavailable_reason}")
        return sorted(name for name, ok in runnable.items() if ok)

    # -- repack_checkpoint --------------------------------------------------------------------
    def _repack_cases(self, ctx: ConformanceContext) -> Iterator[tuple[str, Path, QuantConfig | None, str,
                                                                      QuantRequest | None]]:
        """(what, fixture, config, target kind, request) for the plugin's own formats and online methods."""
        for fixture, path in ctx.own.items():
            config = self._winning_config(path)
            for kind in ("runtime", "checkpoint"):
                yield f"{fixture} ({kind})", path, config, kind, None
        for method in self.online_methods:
            request = QuantRequest(method)
            claim = self._claim(self.plugin_host(companions=False), ctx.source_16bit, request)
            if claim is not None:
                yield (f"16-bit, --quantization {method} (checkpoint)", ctx.source_16bit, claim.config,
                       "checkpoint", request)

    def _repack(self, ctx: ConformanceContext, host: PluginHost, path: Path, config: QuantConfig | None,
                kind: str, request: QuantRequest | None = None, foreign: bool = False) -> tuple[_CountingStream, Any]:
        if foreign:
            source = open_checkpoint(path)
            target = self._foreign_target(source)
        elif kind == "runtime":
            source, _, target = self._runtime_plan(ctx, path, self.plugin_host())
        else:
            source = open_checkpoint(path)
            target = self._checkpoint_target(source, request)
        counter = _CountingStream(source.iter_tensors())
        return counter, host.repack_checkpoint(config, counter, target, first=self.plugin_name)

    def test_repack_is_lazy(self, conformance: ConformanceContext) -> None:
        self._require_hook("repack_checkpoint")
        host = self.plugin_host(companions=False)
        cases = [(*case, False) for case in self._repack_cases(conformance)]
        cases += [(f"{f} (runtime)", p, None, "runtime", None, True) for f, p in conformance.foreign.items()]
        for what, path, config, kind, request, foreign in cases:
            counter, _ = self._repack(conformance, host, path, config, kind, request, foreign)
            assert counter.taken == 0, \
                f"{what}: repack_checkpoint read {counter.taken} tensors before its stream was iterated"

    def test_repack_is_a_function_of_its_input(self, conformance: ConformanceContext) -> None:
        self._require_hook("repack_checkpoint")
        host = self.plugin_host(companions=False)
        for what, path, config, kind, request in self._repack_cases(conformance):
            first = list(self._repack(conformance, host, path, config, kind, request)[1])
            second = list(self._repack(conformance, host, path, config, kind, request)[1])
            assert [n for n, _ in first] == [n for n, _ in second], f"{what}: two repacks give different names"
            differ = [n for (n, a), (_, b) in zip(first, second) if not _same_tensor(a, b)]
            assert not differ, f"{what}: two repacks of the same input give different tensors: {differ[:8]}"

    def test_repack_preserves_what_it_does_not_rename(self, conformance: ConformanceContext) -> None:
        self._require_hook("repack_checkpoint")
        host = self.plugin_host(companions=False)
        problems = []
        for what, path, config, kind, request in self._repack_cases(conformance):
            source = open_checkpoint(path)
            linears = set(self._foreign_target(source).linears)
            original = dict(source.iter_tensors())
            out = list(self._repack(conformance, host, path, config, kind, request)[1])
            if not out:
                problems.append(f"{what}: the repacked stream is empty")
            for name, tensor in out:
                if name in original and _owner(name) not in linears and not _same_tensor(tensor, original[name]):
                    problems.append(f"{what}: {name} keeps its name but not its value")
        # Checkpoints in formats it does not know (already in the runtime layout) pass unchanged.
        foreign = {**conformance.foreign, "own-format-with-unknown-config": next(iter(conformance.own.values()))}
        for fixture, path in foreign.items():
            config = QuantConfig.make(UNKNOWN_FAMILY) if fixture.startswith("own-format") else None
            source = open_checkpoint(path)
            original = list(source.iter_tensors())
            out = list(self._repack(conformance, host, path, config, "runtime", foreign=True)[1])
            if [n for n, _ in out] != [n for n, _ in original] or \
                    not all(_same_tensor(a, b) for (_, a), (_, b) in zip(out, original)):
                problems.append(f"{fixture} with config {config and config.family}: changed a checkpoint that is "
                                "not its format")
        assert not problems, f"plugin {self.plugin_name}: " + "; ".join(problems[:12])

    # -- isolation ----------------------------------------------------------------------------
    def test_a_raising_hook_is_isolated(self, conformance: ConformanceContext) -> None:
        """With each of its hooks raising, the other plugins keep working (the failure is named
        with a one-line reason) unless DIFFGEN_STRICT_PLUGINS=1 makes it fatal."""
        impls = {n: f for n, f in self.hook_impls().items() if n in HOOKS}
        raising = _RaisingCopy(impls, self.plugin_name)
        witness_name = "fp8" if self.plugin_name != "fp8" else "fp8-witness"
        fp8_fixture = conformance.own.get("fp8-per-channel") or conformance.foreign["fp8-per-channel"]
        source = open_checkpoint(fp8_fixture)
        model = build_meta_model(source)
        spec = next(iter(linear_layers(model, conformance.dtype)))
        config = QuantConfig.make("fp8", scheme="per-channel", params={"activation_scheme": "dynamic"})
        target = self._foreign_target(source)

        def exercise(host: PluginHost) -> None:
            reports = host.check_platform(conformance.platform)
            assert witness_name in reports
            assert any(c.plugin == witness_name for c in host.detect_quant_config(source, None))
            assert any(p == witness_name for p, _ in host.create_linear_method(config, spec, conformance.platform))
            assert sum(1 for _ in host.repack_checkpoint(config, source.iter_tensors(), target)) > 0

        host = PluginHost(strict=False, trace=False)
        host.register(fp8_plugin, witness_name, builtin=True)
        host.register(raising, self.plugin_name)
        exercise(host)
        failed = {f.stage: f.reason for f in host.failures if f.plugin == self.plugin_name}
        assert set(failed) == set(impls), f"failures recorded: {failed}, hooks: {sorted(impls)}"
        assert all(_one_line(r) for r in failed.values()), failed
        strict = PluginHost(strict=True, trace=False)
        strict.register(fp8_plugin, witness_name, builtin=True)
        strict.register(raising, self.plugin_name)
        if impls:
            with pytest.raises(PluginError, match=f"plugin '{self.plugin_name}' failed at "):
                exercise(strict)


class _RaisingCopy:
    """The plugin's hooks, same names and arguments, each raising a two-line error."""

    def __init__(self, impls: dict[str, Callable], plugin_name: str):
        for name, fn in impls.items():
            setattr(self, name, self._raising(name, fn, plugin_name))

    @staticmethod
    def _raising(name: str, fn: Callable, plugin_name: str) -> Callable:
        @functools.wraps(fn)  # keeps the argument names pluggy reads
        def hook(*args, **kwargs):
            raise RuntimeError(f"conformance: {plugin_name}.{name} raised on purpose\nsecond line")
        return hookspecs.hookimpl(hook)


__all__ = [
    "BUILTIN_FIXTURE_WRITERS",
    "FAKE_PLATFORMS",
    "FIXTURE_ENTRY_POINT_GROUP",
    "HOSTILE_QUANTIZATION_CONFIGS",
    "ConformanceContext",
    "FixtureWriter",
    "PluginConformance",
    "installed_fixture_writers",
    "write_fixture",
]
