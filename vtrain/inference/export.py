"""The evaluation model of a task as a file other runtimes load (ONNX, TorchScript, torch.export), checked
against the PyTorch model."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtrain.config import ConfigError

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts", "exported": "model.pt2"}


@contextlib.contextmanager
def torchscript_deprecations_hidden() -> Iterator[None]:
    """Without torch's ``FutureWarning`` that ``torch.jit.trace`` / ``save`` / ``load`` are deprecated (torch 2.10+):
    ``format=torchscript`` asks for TorchScript, and the other formats are ``torch.export``'s already. Only those
    messages: any other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.(trace|trace_method|save|load)` is deprecated",
                                category=FutureWarning)
        yield


def export(module: Any, fmt: str, path: str | Path, example: torch.Tensor) -> nn.Module:
    """Write ``module.export_module()`` to ``path`` in format ``fmt``; the model as written, loaded back."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt}: use one of {', '.join(FORMATS)}")
    model = module.export_module().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a spatial side's range is the exporter's to find (Dim.AUTO): a backbone may need more than one stride of it
    # (measured: torch.export refuses 1..8192 for a segmentation model, whose padded side // 32 must not be 1)
    dynamic = {axis: torch.export.Dim("batch", min=1, max=1024) if name == "batch" else torch.export.Dim.AUTO
               for axis, name in dynamic_axes(module, fmt).items()}
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["input"],
                              output_names=["output"], dynamic_shapes=(dynamic,), verbose=False)
            return OnnxModel(path)
        if fmt == "torchscript":
            with torchscript_deprecations_hidden():
                with warnings.catch_warnings():  # the backbones' shape checks, constant for a traced input size
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    traced = torch.jit.trace(model, example, check_trace=False)
                traced.save(str(path))
                return torch.jit.load(str(path))
        program = torch.export.export(model, (example,), dynamic_shapes=(dynamic,))
        torch.export.save(program, str(path))
        return torch.export.load(str(path)).module()


def dynamic_axes(module: Any, fmt: str) -> dict[int, str]:
    """The input axes the file takes at any size: the task's (``export_dynamic_axes``); a TorchScript trace records
    the sizes it computes with as constants, so there only the batch."""
    return {0: "batch"} if fmt == "torchscript" else dict(module.export_dynamic_axes)


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU, called like the PyTorch model."""

    def __init__(self, path: Path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        name = self.session.get_inputs()[0].name
        return torch.from_numpy(self.session.run(None, {name: x.detach().cpu().numpy()})[0])


def check(module: Any, exported: Any, example: torch.Tensor, atol: float, rtol: float) -> float:
    """The largest difference between the exported model and the PyTorch one on ``example``; a ConfigError beyond
    the tolerance."""
    with torch.no_grad():
        expected = module.export_module().eval()(example)
        got = exported(example)
    difference = float((got.float() - expected.float()).abs().max())
    if not torch.allclose(got.float(), expected.float(), atol=atol, rtol=rtol):
        raise ConfigError(f"the exported model differs from the PyTorch model by up to {difference:.3g} "
                          f"(atol={atol}, rtol={rtol}): do not use it")
    return difference
