"""Plugin discovery, isolation, tracing and ranking.

Builtin plugins and entry points (group ``diffgen``) are registered through one path. Each is
imported and registered on its own, and each hook implementation is called on its own, so a
broken plugin is recorded (name and a one-line reason) while the others keep working.

Besides its hooks, a plugin's distribution may publish extensions in entry-point groups of their
own: converters (``diffgen.converters``, run by ``diffgen convert``), offline quantizers
(``diffgen.quantizers``, ``diffgen quantize``) and model rewrites (``diffgen.rewrites``, applied
after loading). They are used exactly when the distribution's plugin is loaded, so the same
allow- and deny-lists govern them; the builtin plugins' extensions are listed in
``BUILTIN_EXTENSIONS`` the way their entry points would say them.

Environment: ``DIFFGEN_PLUGINS`` (allow-list of plugin or distribution names; empty loads no
external plugin), ``DIFFGEN_DISABLE_PLUGINS`` (deny-list), ``DIFFGEN_STRICT_PLUGINS=1`` (failures
raise), ``DIFFGEN_TRACE_PLUGINS=1`` (each hook call and answer on stderr).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import pluggy

try:  # the backport follows entry-point fixes sooner; the stdlib module is enough otherwise
    import importlib_metadata
except ImportError:
    import importlib.metadata as importlib_metadata

from . import hookspecs
from .errors import DiffgenError, NoLinearMethodError, PluginError, QuantConfigError
from .linear import KIND_RANK, LinearMethod
from .quant import QuantClaim, TensorStream
from .rewrites import BlockRewrite

ENTRY_POINT_GROUP = "diffgen"
# What a plugin's code may raise without taking the process down: any Exception, and SystemExit
# (a plugin calling sys.exit at import or in a hook), but not KeyboardInterrupt.
PLUGIN_FAULTS = (Exception, SystemExit)
CONVERTERS, QUANTIZERS, REWRITES = "diffgen.converters", "diffgen.quantizers", "diffgen.rewrites"
BUILTIN_PLUGINS = {"fp8": "diffgen.builtin.fp8", "bfl": "diffgen.builtin.bfl"}
# group -> extension name -> (the builtin plugin that publishes it, "module:attribute")
BUILTIN_EXTENSIONS = {QUANTIZERS: {"fp8": ("fp8", "diffgen.builtin.fp8_offline:QUANTIZER")}}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str = ""
    distribution: str = ""
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)


@dataclass
class PluginFailure:
    plugin: str
    stage: str  # "import", "register", "unknown hook", the hook name, or the extension ("rewrite NAME")
    reason: str


@dataclass(frozen=True)
class Extension:
    """One converter, quantizer or rewrite a plugin publishes; its object is imported by ``load``."""

    group: str
    name: str
    plugin: str  # the plugin whose distribution publishes it
    value: str  # "module:attribute", as in an entry point

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        obj = importlib.import_module(module)
        for part in filter(None, attribute.split(".")):
            obj = getattr(obj, part)
        return obj


class PluginHost:
    """The plugin manager, with one typed method per hook. Callers never touch ``pm.hook``."""

    def __init__(self, *, strict: bool | None = None, trace: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = _flag("DIFFGEN_STRICT_PLUGINS") if strict is None else strict
        self.trace = _flag("DIFFGEN_TRACE_PLUGINS") if trace is None else trace
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginFailure] = []
        self._publisher: dict[int, str] = {}  # id(loaded rewrite) -> its plugin

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> "PluginHost":
        deny = set(_env_list("DIFFGEN_DISABLE_PLUGINS") or [])
        for name, module in BUILTIN_PLUGINS.items():
            if name not in deny:
                self._load(name, lambda m=module: importlib.import_module(m), builtin=True, module=module)
        allow = _env_list("DIFFGEN_PLUGINS")
        seen: set[str] = set()
        installed: set[str] = set()
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else ""
            installed |= {ep.name, dist}
            if ep.name in self.plugins or ep.name in seen:
                continue
            if deny & {ep.name, dist} or (allow is not None and not set(allow) & {ep.name, dist}):
                continue
            seen.add(ep.name)
            self._load(ep.name, ep.load, module=ep.value, distribution=dist,
                       version=ep.dist.version if ep.dist else "")
        for wanted in allow or []:
            if wanted not in self.plugins and wanted not in installed:
                self._fail(wanted, "import", "named in DIFFGEN_PLUGINS but no such plugin is installed")
        return self

    def _load(self, name: str, load: Callable[[], Any], **info: Any) -> None:
        try:
            plugin = load()
        except PLUGIN_FAULTS as exc:
            self._fail(name, "import", _one_line(exc), exc)
            return
        self.register(plugin, name, **info)

    def register(self, plugin: Any, name: str, **info: Any) -> None:
        """Register a plugin object (also used by tests and the conformance kit)."""
        try:
            self.pm.register(plugin, name=name)
        except PLUGIN_FAULTS as exc:  # pluggy.PluginValidationError: an argument the spec lacks
            lines = str(exc).strip().splitlines()  # pluggy says where on the first line, why on the last
            self._fail(name, "register", _one_line(exc) + (f": {lines[-1].strip()}" if len(lines) > 1 else ""), exc)
            return
        hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
        info.setdefault("module", getattr(plugin, "__name__", type(plugin).__name__))
        self.plugins[name] = PluginInfo(name=name, hooks=hooks, **info)
        # The same check as pluggy's check_pending, but attributed to this plugin, not fatal.
        for hook_name, caller in vars(self.pm.hook).items():
            if isinstance(caller, pluggy.HookCaller) and not caller.has_spec():
                for impl in caller.get_hookimpls():
                    if impl.plugin is plugin and not impl.opts.get("optionalhook"):
                        self._fail(name, "unknown hook", f"implements {hook_name!r}, which is not a "
                                   f"diffgen hook (misspelled? hooks are {', '.join(hookspecs.HOOK_NAMES)})")

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)

    # -- extensions ------------------------------------------------------------------------
    def extensions(self, group: str) -> dict[str, Extension]:
        """What the loaded plugins publish in ``group``, by name (nothing is imported yet)."""
        found: dict[str, Extension] = {}
        for name, (plugin, value) in BUILTIN_EXTENSIONS.get(group, {}).items():
            if plugin in self.plugins:
                found[name] = Extension(group, name, plugin, value)
        by_distribution = {info.distribution: info.name for info in self.plugins.values() if info.distribution}
        for ep in importlib_metadata.entry_points(group=group):
            plugin = by_distribution.get(ep.dist.name if ep.dist else "")
            if plugin is None:
                continue  # its plugin is not loaded (not installed as one, disabled, or failed)
            if ep.name in found:
                if found[ep.name].plugin != plugin:
                    self._fail(plugin, f"{group} {ep.name}",
                               f"{ep.name!r} is already published by plugin {found[ep.name].plugin}")
                continue
            found[ep.name] = Extension(group, ep.name, plugin, ep.value)
        return found

    def load_extension(self, extension: Extension) -> Any:
        """The extension's object, or None when importing it failed (recorded as a plugin failure)."""
        try:
            return extension.load()
        except PLUGIN_FAULTS as exc:
            self._fail(extension.plugin, f"{extension.group} {extension.name}", _one_line(exc), exc)
            return None

    def rewrites(self) -> list[BlockRewrite]:
        """Every loaded plugin's model rewrites (an entry point names one BlockRewrite or a list)."""
        found = []
        for extension in self.extensions(REWRITES).values():
            published = self.load_extension(extension)
            for rewrite in published if isinstance(published, (list, tuple)) else [published]:
                if isinstance(rewrite, BlockRewrite):
                    found.append(rewrite)
                    self._publisher[id(rewrite)] = extension.plugin
                elif rewrite is not None:
                    self._fail(extension.plugin, f"{REWRITES} {extension.name}",
                               f"published {type(rewrite).__name__}, not a diffgen.rewrites.BlockRewrite")
        return found

    def rewrite_failed(self, rewrite: BlockRewrite, exc: BaseException) -> None:
        """Record a rewrite that raised as a failure of the plugin that published it."""
        self._fail(self._publisher.get(id(rewrite), rewrite.name), f"rewrite {rewrite.name}", _one_line(exc), exc)

    def _fail(self, plugin: str, stage: str, reason: str, exc: BaseException | None = None) -> None:
        failure = PluginFailure(plugin, stage, reason)
        if failure not in self.failures:  # a hook that raises for every layer or load is one failure
            self.failures.append(failure)
        if self.trace:
            print(f"diffgen: plugin {plugin} failed at {stage}: {reason}", file=sys.stderr)
        if self.strict:
            raise PluginError(f"plugin {plugin!r} failed at {stage}: {reason} "
                              "(DIFFGEN_STRICT_PLUGINS=1 makes this fatal)") from exc

    # -- calling ---------------------------------------------------------------------------
    def _call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call each implementation of ``hook`` on its own; return (plugin name, answer) pairs."""
        answers = []
        impls = getattr(self.pm.hook, hook).get_hookimpls()
        for impl in sorted(impls, key=lambda i: i.plugin_name):
            args = {a: kwargs[a] for a in impl.argnames}
            try:
                result = impl.function(**args)
            except PLUGIN_FAULTS as exc:
                self._fail(impl.plugin_name, hook, _one_line(exc), exc)
                continue
            if self.trace:
                print(f"diffgen: {hook}({', '.join(f'{k}={_short(v)}' for k, v in args.items())}) "
                      f"-> {impl.plugin_name}: {_short(result)}", file=sys.stderr)
            if result is not None:
                answers.append((impl.plugin_name, result))
        return answers

    def check_platform(self, platform) -> dict[str, Any]:
        from .platform import PlatformReport

        reports = {}
        for plugin, report in self._call("check_platform", platform=platform):
            if isinstance(report, PlatformReport):
                reports[plugin] = report
            else:
                self._fail(plugin, "check_platform", f"returned {type(report).__name__}, not a PlatformReport")
        return reports

    def detect_quant_config(self, source, request) -> list[QuantClaim]:
        claims = []
        for plugin, claim in self._call("detect_quant_config", source=source, request=request):
            if not isinstance(claim, QuantClaim):
                self._fail(plugin, "detect_quant_config", f"returned {type(claim).__name__}, not a QuantClaim")
                continue
            claims.append(dataclasses.replace(claim, plugin=plugin))
        return claims

    def create_linear_method(self, config, layer, platform) -> list[tuple[str, LinearMethod]]:
        offers = []
        for plugin, answer in self._call("create_linear_method", config=config, layer=layer, platform=platform):
            methods = [answer] if isinstance(answer, LinearMethod) else \
                list(answer) if isinstance(answer, Iterable) else [answer]
            for method in methods:
                if isinstance(method, LinearMethod):
                    offers.append((plugin, method))
                else:
                    self._fail(plugin, "create_linear_method",
                               f"returned {type(method).__name__}, not a LinearMethod")
        return offers

    def repack_checkpoint(self, config, tensors: TensorStream, target, first: str | None = None) -> TensorStream:
        impls = getattr(self.pm.hook, "repack_checkpoint").get_hookimpls()
        order = sorted((i.plugin_name for i in impls), key=lambda n: (n != first, n))
        for plugin in order:
            impl = next(i for i in impls if i.plugin_name == plugin)
            args = {"config": config, "tensors": tensors, "target": target}
            try:
                result = impl.function(**{a: args[a] for a in impl.argnames})
            except PLUGIN_FAULTS as exc:
                self._fail(plugin, "repack_checkpoint", _one_line(exc), exc)
                continue
            if result is None:
                continue
            try:
                tensors = self._guarded(plugin, iter(result))
            except TypeError:
                self._fail(plugin, "repack_checkpoint", f"returned {type(result).__name__}, not an iterator of "
                                                       "(name, tensor) pairs")
        return tensors

    def _guarded(self, plugin: str, stream: TensorStream) -> TensorStream:
        """``stream`` with a fault inside it recorded against ``plugin`` and raised as a PluginError
        naming it: a half-repacked checkpoint cannot be loaded, but it can say whose stream broke."""
        try:
            yield from stream
        except DiffgenError:
            raise  # a plugin's own message about the checkpoint (a shape it cannot split, ...)
        except PLUGIN_FAULTS as exc:
            self._fail(plugin, "repack_checkpoint", _one_line(exc), exc)
            raise PluginError(f"plugin {plugin!r} failed while repacking the checkpoint: {_one_line(exc)}; "
                              f"disable it with DIFFGEN_DISABLE_PLUGINS={plugin} to load without it") from exc


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- ranking ---------------------------------------------------------------------------------
def best_claim(claims: list[QuantClaim]) -> QuantClaim | None:
    """The most specific claim; different configs tied at the top are an error."""
    if not claims:
        return None
    top = max(c.specificity for c in claims)
    leaders = sorted((c for c in claims if c.specificity == top), key=lambda c: c.plugin)
    for other in leaders[1:]:
        if other.config != leaders[0].config:
            raise QuantConfigError(
                f"two plugins claim this checkpoint with different configs at specificity {top}: "
                f"{leaders[0].plugin} ({leaders[0].evidence}: {leaders[0].config.family}) and "
                f"{other.plugin} ({other.evidence}: {other.config.family}); disable one with "
                "DIFFGEN_DISABLE_PLUGINS or pass --quant-backend")
    return leaders[0]


def choose_method(offers: list[tuple[str, LinearMethod]], layer: str,
                  backend: str | None = None) -> tuple[str, LinearMethod]:
    """Best runnable offer by kind (native > weight-only > reference), then priority; ``backend``
    keeps the offers whose method name, plugin name or kind it is (``reference`` forces every
    layer onto its format's reference method, whichever plugin and method that is)."""
    candidates = [o for o in offers if backend in (None, o[0], o[1].name, o[1].kind)]
    runnable = [o for o in candidates if o[1].unavailable_reason is None]
    if runnable:
        return min(runnable, key=lambda o: (KIND_RANK[o[1].kind], -o[1].priority, o[0], o[1].name))
    lines = [f"  - {p}/{m.name} ({m.kind}): {m.unavailable_reason or 'not the forced --quant-backend'}"
             for p, m in offers] or ["  (no plugin offered a method for this format)"]
    forced = f" with --quant-backend {backend}" if backend else ""
    raise NoLinearMethodError(f"no linear method can run layer {layer!r}{forced}; offers:\n" + "\n".join(lines))


_host: PluginHost | None = None


def get_plugin_host() -> PluginHost:
    """The process-wide host, loaded on first use."""
    global _host
    if _host is None:
        _host = PluginHost().load()
    return _host


def reset_plugins() -> None:
    """Forget the loaded plugins (the next call re-reads the environment and entry points)."""
    global _host
    _host = None


@contextmanager
def using_plugin_host(host: PluginHost) -> Iterator[PluginHost]:
    """Make ``host`` the process-wide host for a while (the conformance kit loads models through
    the public API with only the plugin under test registered)."""
    global _host
    saved, _host = _host, host
    try:
        yield host
    finally:
        _host = saved
