"""``python -m vtrain.export``: the exported files, loaded back by their own runtime (onnxruntime for ONNX), give the
task model's outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vtrain
from vtrain.inference.export import FORMATS
from vtrain.export import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SWIN = ["backbone.embed_dim=16", "backbone.depths=[1,1,1,1]", "backbone.num_heads=[1,1,2,2]",
             "backbone.window_size=4"]
MODELS = {
    # a one-block ViT: the torch.export-based ONNX exporter takes seconds per hundred operators on a CPU
    "classification": [None, "backbone=vit_s16", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
                       "backbone.img_size=32", "data.num_classes=4"],
    "segmentation": [None, "task=segmentation", "data=ade20k", "task/head=fcn", "task.head.channels=16",
                     "task.aux_head=null", "backbone=vit_s16", "backbone.embed_dim=32", "backbone.depth=1",
                     "backbone.num_heads=2", "backbone.img_size=64", "data.num_classes=6", "data.crop_size=[64,96]"],
    "video": ["quickstart_video"],
}


def checkpoint(task: str, path) -> tuple:
    """A checkpoint of a freshly built task, as vtrain writes them (its weights and its description)."""
    experiment, *overrides = MODELS[task]
    torch.manual_seed(0)
    swin = TINY_SWIN if experiment else []
    module, _ = vtrain.build(vtrain.compose(experiment, [*swin, *overrides, f"output_dir={path}"]))
    module.class_names = [f"c{i}" for i in range(module.run_config["data"]["num_classes"])]
    file = path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6", "epoch": 0,
                "global_step": 0, module.CHECKPOINT_KEY: module.description()}, file)
    return module.eval(), file


# Each format once, each exportable task once (torch.export-based exports take seconds each on a CPU); the
# segmentation model, whose height and width are dynamic, by both torch.export-based formats.
@pytest.mark.parametrize("task, fmt", [("classification", "exported"), ("video", "torchscript"),
                                       ("segmentation", "onnx"), ("segmentation", "exported")])
def test_exported_model_gives_the_task_models_outputs(task, fmt, tmp_path):
    module, file = checkpoint(task, tmp_path)
    main([f"ckpt_path={file}", f"format={fmt}", f"out={tmp_path / 'out'}"])
    exported = tmp_path / "out" / FORMATS[fmt]
    described = json.loads((tmp_path / "out" / "model.json").read_text())
    assert described["class_names"][:2] == ["c0", "c1"]
    shapes = {"classification": [(5, 3, 32, 32)], "video": [(5, 3, 8, 32, 32)],
              # the training crop is 64x96: the segmentation export takes any size, padded inside as mmseg does
              "segmentation": [(5, 3, 64, 96), (2, 3, 50, 130)]}[task]
    if task == "segmentation":
        assert described["input"]["shape"] == ["batch", 3, "height", "width"]
    for shape in shapes:
        x = torch.randn(shape)  # a batch size (and a size) the export never saw
        with torch.no_grad():
            expected = module(x)  # the task's own forward, as validation calls it
            if fmt == "onnx":
                import onnxruntime

                session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
                got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            elif fmt == "torchscript":
                got = torch.jit.load(str(exported))(x)
            else:
                got = torch.export.load(str(exported)).module()(x)
        assert got.shape == expected.shape
        # measured: ONNX within 2e-7 of PyTorch on these models, TorchScript and torch.export exactly equal
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_model_json_carries_the_runs_preprocessing(tmp_path):
    """``model.json``'s preprocessing, given to timm's own ``create_transform`` as its ``pretrained_cfg`` keys, makes
    the input the run's validation transform makes (an image of another size than the input, squashed or cropped
    as the config says); segmentation names its data config's normalisation and its task's test-time resize."""
    from PIL import Image
    from timm.data import create_transform

    from vtrain.training.build import datamodule_of

    module, _ = vtrain.build(vtrain.compose("quickstart", [
        *TINY_SWIN, "backbone.img_size=32", "data.num_classes=4", "preprocessing=vit_augreg", "data.eval_crop_pct=0.8",
        "data.eval_interpolation=bilinear", f"output_dir={tmp_path}"]))
    datamodule = datamodule_of(module)
    cfg = module.export_preprocessing(datamodule)
    assert cfg == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 32, 32], "interpolation": "bilinear",
                   "crop_pct": 0.8, "crop_mode": "center"}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    timm_input = create_transform(is_training=False, **cfg)(image)
    torch.testing.assert_close(datamodule.predict_set([np.asarray(image)])[0]["input"], timm_input, rtol=0, atol=0)

    module, _ = vtrain.build(vtrain.compose(None, [*MODELS["segmentation"][1:], "data.img_scale=[640,160]",
                                                   f"output_dir={tmp_path}"]))
    cfg = module.export_preprocessing(datamodule_of(module))
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]  # conf/preprocessing/imagenet
    assert cfg["input_size"] == [3, None, None] and cfg["resize"]["scale"] == [640, 160]


def test_detection_export_is_a_one_line_refusal_naming_the_alternative(tmp_path, capsys):
    """torchvision's ONNX path gives a file right at one image size only for vtrain's detectors (measured, beside
    ``EXPORT_REFUSAL``): the command says so in one line and names what to use instead, before any export."""
    module, _ = vtrain.build(vtrain.compose("quickstart_det", [*TINY_SWIN, "task/detector=faster_rcnn",
                                                               f"output_dir={tmp_path}"]))
    file = tmp_path / "det.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6", "epoch": 0,
                "global_step": 0, module.CHECKPOINT_KEY: module.description()}, file)
    with pytest.raises(SystemExit) as exited:
        main([f"ckpt_path={file}", "format=onnx", f"out={tmp_path / 'out'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert "detection models do not export" in lines[0] and "vtrain.load(path)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_torchscript_export_hides_only_torchs_deprecation_of_torchscript(tmp_path):
    """torch 2.10+ says that torch.jit.trace, save and load are deprecated: not shown for format=torchscript, which
    asks for them; any other warning still is."""
    import warnings
    from types import SimpleNamespace

    from vtrain.inference.export import export, torchscript_deprecations_hidden

    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = export(SimpleNamespace(export_module=lambda: linear), "torchscript", tmp_path / "m.ts",
                        torch.randn(1, 3))
        with torchscript_deprecations_hidden():
            torch.jit.trace(linear, torch.randn(1, 3))
            warnings.warn("another deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["another deprecation"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(loaded(x), linear(x))
    with warnings.catch_warnings(record=True) as caught:  # what torch says outside (the filter is not global)
        warnings.simplefilter("always")
        torch.jit.trace(linear, torch.randn(1, 3))
    assert any("`torch.jit.trace` is deprecated" in str(w.message) for w in caught)
