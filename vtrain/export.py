"""``python -m vtrain.export run=<run dir>|ckpt_path=<file> format=onnx|torchscript|exported [out=DIR]``

The evaluation model of a run as a file other runtimes load: the task's ``export_module()``, a plain ``nn.Module``
that takes a normalised batch and returns logits (classification, video: per clip) or maps (segmentation: logits
at the input's size). Preprocessing (resize, crop, normalisation) and post-processing (softmax, the segmentation
test-time resize) stay the caller's, as in timm's and torchvision's exported models.

Formats: ``onnx`` (``torch.onnx.export``, torch.export-based; checked with onnxruntime), ``torchscript``
(``torch.jit.trace``), ``exported`` (``torch.export``, a ``.pt2`` file). The batch dimension is dynamic; the
spatial (and temporal) size is the validation input's (``size=H,W`` changes it). Every file is loaded back, run on
a batch of another size than the one it was traced with, and compared with the PyTorch model (``atol``, ``rtol``):
a difference beyond them ends the command with an error. ``model.json`` beside it says what goes in and out.

Options (``key=value``): run=DIR | ckpt_path=FILE, experiment=NAME (weight files that do not describe their model),
format=onnx, out=DIR (default: <run dir or checkpoint folder>/export), size=H,W, atol=1e-4, rtol=1e-3; any other
<group>.<key>=value changes the model's config (a key it does not have, or an option mistyped, is one line).
"""
from __future__ import annotations

import json
from pathlib import Path

from vtrain.config import ConfigError
from vtrain.config.command import key_value_command
from vtrain.inference.export import FORMATS, check, export
from vtrain.training.build import load

OPTIONS = {"run", "ckpt_path", "experiment", "format", "out", "size", "atol", "rtol"}


def run(options: dict[str, str], overrides: list[str]) -> Path:

    source = options.get("run") or options.get("ckpt_path")
    if not source or (options.get("run") and options.get("ckpt_path")):
        raise ConfigError("give the model as run=<run directory> or ckpt_path=<checkpoint file> (one of them)")
    fmt = options.get("format", "onnx")
    if fmt not in FORMATS:  # before the model is loaded
        raise ConfigError(f"format={fmt}: use one of {', '.join(FORMATS)}")
    size = tuple(int(v) for v in options["size"].split(",")) if options.get("size") else None
    module = load(source, options.get("experiment"), overrides)
    out = Path(options.get("out") or (Path(source) if Path(source).is_dir() else Path(source).parent) / "export")
    path = out / FORMATS[fmt]
    exported = export(module, fmt, path, module.example_input(2, size))
    check_input = module.example_input(3, size)  # another batch size than the traced one
    difference = check(module, exported, check_input, float(options.get("atol", 1e-4)),
                       float(options.get("rtol", 1e-3)))
    (out / "model.json").write_text(json.dumps({
        "file": path.name, "format": fmt, "task": type(module).__name__,
        "input": {"shape": ["batch", *check_input.shape[1:]], "layout": "NCTHW" if check_input.dim() == 5 else "NCHW",
                  "normalised": "as the run's validation transform does"},
        "output": module.export_output,
        "class_names": module.label_names(), "max_difference_to_pytorch": difference,
    }, indent=1))
    print(f"wrote {path} ({fmt}); it matches the PyTorch model within {difference:.2g} on a batch of "
          f"{len(check_input)}")
    return path


def main(argv: list[str] | None = None) -> None:
    key_value_command(__doc__, OPTIONS, run, argv)


if __name__ == "__main__":
    main()
