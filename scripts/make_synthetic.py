#!/usr/bin/env python
"""Write a small synthetic dataset in a real dataset's on-disk layout.

    python scripts/make_synthetic.py imagenet --out data/synthetic/imagenet [--seed 0] [--set num_classes=5]
    python scripts/make_synthetic.py coco --help        # the --set keys of one kind, with their defaults

Each kind's writer lives with its task (``tasks/<task>/synthetic.py``: its ``KIND`` and a ``write(root, seed, **kw)``,
or ``WRITERS``, {kind: write function}, for a task that writes several layouts), found there, not listed here;
``--set`` takes its keyword arguments.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import pkgutil
from collections.abc import Callable

import vtrain.tasks


def writers() -> dict[str, Callable[..., dict]]:
    """Each task's synthetic writers (``vtrain.tasks.<task>.synthetic``), by the kind of layout they write."""
    found = {}
    for task in pkgutil.iter_modules(vtrain.tasks.__path__):
        if task.ispkg and importlib.util.find_spec(f"vtrain.tasks.{task.name}.synthetic") is not None:
            module = importlib.import_module(f"vtrain.tasks.{task.name}.synthetic")
            found.update(getattr(module, "WRITERS", None) or {module.KIND: module.write})
    return found


WRITERS = writers()


def writer_options(kind: str) -> dict[str, int]:
    """The ``--set`` keys of a kind and their defaults: the writer's keyword arguments after ``root`` and ``seed``."""
    signature = inspect.signature(WRITERS[kind])
    return {name: p.default for name, p in signature.parameters.items() if name not in ("root", "seed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{" + ",".join(sorted(WRITERS)) + "}")
    for kind in sorted(WRITERS):
        keys = "  ".join(f"{k}={v}" for k, v in writer_options(kind).items())
        sub = kinds.add_parser(kind, help=f"the {kind} layout", description=f"--set keys (defaults): {keys}")
        sub.add_argument("--out", required=True, help="dataset root to write")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--set", nargs="*", default=[], metavar="KEY=INT", help=f"writer options: {keys}")
    args = parser.parse_args()
    known = writer_options(args.kind)
    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in known or not value.lstrip("-").isdigit():
            parser.error(f"--set {item}: use KEY=INT with KEY one of {', '.join(known)}")
        options[key] = int(value)
    summary = WRITERS[args.kind](args.out, seed=args.seed, **options)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
