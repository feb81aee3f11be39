"""``python -m vtrain.export run=<run dir>|ckpt_path=<file> format=onnx|torchscript|exported [out=DIR]``

The evaluation model of a run as a file other runtimes load: the task's ``export_module()``, a plain ``nn.Module``
that takes a normalised batch and returns logits (classification, video: per clip) or maps (segmentation: logits
at the input's size). Preprocessing (resize, crop, normalisation) and post-processing (softmax, the segmentation
test-time resize) stay the caller's, as in timm's and torchvision's exported models.

Formats: ``onnx`` (``torch.onnx.export``, torch.export-based; checked with onnxruntime), ``torchscript``
(``torch.jit.trace``), ``exported`` (``torch.export``, a ``.pt2`` file). The batch dimension is dynamic, and a
segmentation model's height and width (ONNX dynamic axes; any image size, as validation feeds it; not in a
TorchScript trace, which records the sizes it computes with); otherwise the
spatial (and temporal) size is the validation input's (``size=H,W`` changes it). Every file is loaded back, run on
an input of another batch size (and another height and width where they are dynamic) than the one it was traced
with, and compared with the PyTorch model (``atol``, ``rtol``): a difference beyond them ends the command with an
error. ``model.json`` beside it says what goes in and out, and the preprocessing (``mean``, ``std``,
``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode`` as timm's ``pretrained_cfg``; segmentation: the
test-time resize) from the run's data config.

Options (``key=value``): run=DIR | ckpt_path=FILE, experiment=NAME (weight files that do not describe their model),
format=onnx, out=DIR (default: <run dir or checkpoint folder>/export), size=H,W, atol=1e-4, rtol=1e-3; any other
<group>.<key>=value changes the model's config (a key it does not have, or an option mistyped, is one line).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vtrain.config import ConfigError
from vtrain.config.command import key_value_command
from vtrain.inference.export import FORMATS, check, dynamic_axes, export
from vtrain.training.build import datamodule_of, load

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
    example = module.example_input(2, size)
    preprocessing = module.export_preprocessing(datamodule_of(module))  # before the export: a bad config is quick
    exported = export(module, fmt, path, example)
    axes = dynamic_axes(module, fmt)
    check_input = module.example_input(3, other_size(example, axes))
    difference = check(module, exported, check_input, float(options.get("atol", 1e-4)),
                       float(options.get("rtol", 1e-3)))
    (out / "model.json").write_text(json.dumps({
        "file": path.name, "format": fmt, "task": type(module).__name__,
        "input": {"shape": [axes.get(i, n) for i, n in enumerate(example.shape)],
                  "layout": "NCTHW" if example.dim() == 5 else "NCHW",
                  "normalised": "as the run's validation transform does: preprocessing"},
        "preprocessing": preprocessing,
        "output": module.export_output,
        "class_names": module.label_names(), "max_difference_to_pytorch": difference,
    }, indent=1))
    print(f"wrote {path} ({fmt}); it matches the PyTorch model within {difference:.2g} on an input of "
          f"{tuple(check_input.shape)}, another than the one it was exported with")
    return path


def other_size(example: torch.Tensor, dynamic_axes: dict[int, str]) -> tuple[int, int]:
    """The last two sides of ``example``, each changed when the export takes it at any size (by an amount that is no
    multiple of a backbone's stride), to check the exported model on another input than it saw."""
    h, w = example.shape[-2:]
    axis_h, axis_w = example.dim() - 2, example.dim() - 1
    return (h - h // 4 + 1 if axis_h in dynamic_axes else h, w + w // 4 + 3 if axis_w in dynamic_axes else w)


def main(argv: list[str] | None = None) -> None:
    key_value_command(__doc__, OPTIONS, run, argv)


if __name__ == "__main__":
    main()
