#!/usr/bin/env python
"""Byte-compile the modules vtrain runs with, by importing them once (``make install`` runs this).

    PYTHONDONTWRITEBYTECODE= python scripts/compile_imports.py

``make install`` installs with ``pip install --no-compile``: pip otherwise byte-compiles every module it installs,
about 14,000 of them with torch's CUDA build, triton and sympy (measured: 46 s of a 101 s install on 2 cores).
Importing every module of vtrain, and the modules it imports only where a feature is used, compiles the 5,500 or so
that runs and the test suite import (about 25 s). A module left out is compiled when first imported, as Python
always does; under ``PYTHONDONTWRITEBYTECODE`` it is compiled again at each start.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys

# imported inside functions, only where a feature is used: torch.compile and torch.export, the ONNX export and its
# check, the wandb logger, the sweeps' launcher and sampler, and the test suite
FEATURES = ("torch._dynamo", "torch.onnx", "onnxscript", "onnxruntime", "wandb",
            "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper",
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher", "pytest", "xdist", "importlinter")


def main() -> int:
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("compile_imports: PYTHONDONTWRITEBYTECODE is set, nothing would be written; run it with "
              "PYTHONDONTWRITEBYTECODE= (empty)", file=sys.stderr)
        return 2
    import vtrain

    names = [m.name for m in pkgutil.walk_packages(vtrain.__path__, "vtrain.") if not m.name.endswith("__main__")]
    for name in [*names, *FEATURES]:
        try:
            importlib.import_module(name)
        except ImportError as error:  # an extra that is not installed (export, dev): nothing to compile
            print(f"compile_imports: {name} not imported ({error})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
