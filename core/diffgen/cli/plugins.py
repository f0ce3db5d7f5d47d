"""``diffgen plugins``: the installed plugins, what each can run here and why not, what they
publish (converters, quantizers, rewrites), and the plugins that failed to load."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="include builtin plugins")
    p.add_argument("--requirements", action="store_true", help="name==version lines of external plugins")
    p.add_argument("--device")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from ..api import list_plugins

    info = list_plugins(args.device)
    plugins = [p for p in info["plugins"] if args.all or not p["builtin"]]
    if args.requirements:  # pip-readable on stdout (one line per distribution); failures on stderr
        pins = {f"{p['distribution']}=={p['version']}" for p in plugins if not p["builtin"] and p["distribution"]}
        for line in sorted(pins, key=str.lower):
            print(line)
        for f in info["failures"]:
            print(f"diffgen: plugin {f['plugin']} failed at {f['stage']}: {f['reason']}", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps({**info, "plugins": plugins}, indent=2))
        return 0
    plat = info["platform"]
    print(f"platform: {plat['device_kind']} {plat['device_name']} (torch {plat['torch_version']})")
    if not plugins:
        print("no external plugins installed (--all shows the builtin ones)")
    for p in plugins:
        origin = "builtin" if p["builtin"] else f"{p['distribution']} {p['version']}"
        print(f"{p['name']} ({origin}, {p['module']}): hooks {', '.join(p['hooks'])}")
        for k in (p["platform"] or {}).get("kernels", []):
            state = "available" if k["available"] else "unavailable"
            print(f"    {k['name']}: {state}{': ' + k['reason'] if k['reason'] else ''}")
        for group, published in info["extensions"].items():
            names = sorted(n for n, plugin in published.items() if plugin == p["name"])
            if names:
                print(f"    {group.removeprefix('diffgen.')}: {', '.join(names)}")
    for f in info["failures"]:
        print(f"FAILED {f['plugin']} at {f['stage']}: {f['reason']}")
    return 0
