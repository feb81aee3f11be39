"""ImageNet-layout data, clear errors on bad input, and checkpoints of every supported origin."""
from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest
import timm
import torch
from hydra.utils import instantiate
from torchvision.datasets.folder import IMG_EXTENSIONS

from conftest import TINY_CLS, compose, run_cli
from vtrain.tasks.classification.data import ImageFolderDataModule, ImageFolderDataset
from vtrain.tasks.classification.synthetic import write
from vtrain.config import ConfigError
from vtrain.training.checkpoint import load_task_weights
from vtrain.data.datamodule import CorruptFileError, ReadableCollate, class_folder_samples
from vtrain.training.build import build_task


def test_synthetic_imagenet_layout_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a, seed=3, num_classes=3, train_per_class=2, val_per_class=1, size=32)
    write(b, seed=3, num_classes=3, train_per_class=2, val_per_class=1, size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 9 and all(re.fullmatch(r"(train|val)/n\d{8}/n\d{8}_\d{5}\.JPEG", str(f)) for f in files)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_datamodule_reads_folders_with_train_class_index(imagenet_root):
    dm = ImageFolderDataModule(root=str(imagenet_root), num_classes=4, img_size=32, batch_size=4, num_workers=0,
                               augment={"auto_augment": None, "re_prob": 0.0})
    dm.check()
    dm.setup("fit")
    assert len(dm.train_set) == 48 and len(dm.val_set) == 16
    images, labels = next(iter(dm.val_dataloader())).batch  # a vtrain.data.datamodule.CountedBatch
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 0, 0]
    assert sorted({t for _, t in dm.val_set.samples}) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", r"no train/ folder; expected the ImageNet layout root/train/<class>/\*\.JPEG"),
        ("flat_val", r"val/ has no class folders"),
        ("classes", r"has 4 classes but data.num_classes=10: set data.num_classes=4"),
    ],
)
def test_bad_layout_is_one_clear_line(imagenet_root, tmp_path, breakage, message):
    root, num_classes = tmp_path / "imagenet", 4
    if breakage != "missing":
        shutil.copytree(imagenet_root, root)
    if breakage == "flat_val":
        for f in list((root / "val").rglob("*.JPEG")):
            f.rename(root / "val" / f.name)
        for d in (root / "val").iterdir():
            if d.is_dir():
                d.rmdir()
    if breakage == "classes":
        num_classes = 10
    with pytest.raises(ConfigError, match=message):
        ImageFolderDataModule(root=str(root), num_classes=num_classes).check()


def test_cli_bad_data_root_exits_before_training(tmp_path):
    out = tmp_path / "run"
    result = run_cli(*TINY_CLS, f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={out}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: data.root={tmp_path / 'nowhere'}: no train/ folder; expected the ImageNet layout "
                     "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG; this experiment trains on synthetic data: "
                     f"write it with python scripts/make_synthetic.py imagenet --out {tmp_path / 'nowhere'}"]
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_corrupt_image_is_named_or_skipped(imagenet_root, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_root, root)
    bad = sorted((root / "val").rglob("*.JPEG"))[1]
    bad.write_bytes(b"not a jpeg")
    classes = sorted(d.name for d in (root / "train").iterdir())
    samples = class_folder_samples(root / "val", classes, IMG_EXTENSIONS)
    strict = ImageFolderDataset(samples, skip_corrupt=False)
    with pytest.raises(CorruptFileError, match=re.escape(str(bad))):
        strict[1]
    lenient = ImageFolderDataset(samples, transform=lambda im: torch.zeros(1), skip_corrupt=True)
    batch = ReadableCollate()([lenient[i] for i in range(4)])
    assert batch.batch[0].shape[0] == 3 and (batch.samples, batch.skipped) == (4, 1)


@pytest.fixture(scope="module")
def imagenet22k_root(tmp_path_factory):
    """3 classes x 2 training / 1 validation images of 32x32 in ImageNet-22K's layout, composed as data=imagenet22k."""
    root = tmp_path_factory.mktemp("imagenet22k")
    write(root, seed=0, num_classes=3, train_per_class=2, val_per_class=1, size=32, list_files=True)
    return root


def _imagenet22k_module(root, **overrides):
    cfg = compose("data=imagenet22k", f"data.root={root}", "data.num_classes=3", "data.num_workers=0", "data.img_size=32")
    return instantiate(cfg.data, **overrides)


def test_imagenet22k_list_files_give_the_labels(imagenet22k_root):
    # the labels are the list file's, not the sorted folders' (the writer permutes them)
    entries = {split: json.loads((imagenet22k_root / f"ILSVRC2011fall_whole_map_{split}.txt").read_text())
               for split in ("train", "val")}
    label_of = {p.split("/")[1]: label for p, label in entries["train"]}
    assert sorted(label_of) != [w for w, _ in sorted(label_of.items(), key=lambda kv: kv[1])]
    dm = _imagenet22k_module(imagenet22k_root)
    assert dm.lists["train"].name == "ILSVRC2011fall_whole_map_train.txt"
    dm.check()
    dm.setup("fit")
    expected = {split: [(str(imagenet22k_root / p), label) for p, label in entries[split]] for split in entries}
    assert dm.train_set.samples == expected["train"] and dm.val_set.samples == expected["val"]
    assert all(p.startswith(str(imagenet22k_root / "fall11_whole")) for p, _ in dm.val_set.samples)
    assert dm.class_ids == [w for w, _ in sorted(label_of.items(), key=lambda kv: kv[1])]
    assert compose("data=imagenet22k").data.num_classes == 21841


@pytest.mark.parametrize("breakage, message", [
    ("label", r'map_val.txt: entry 1 \["fall11_whole/.*", 7\] has a label outside 0..2 \(data.num_classes\): fix'),
    ("pair", r'map_val.txt: entry 1 \["fall11_whole/.*\.JPEG"\] is not \[path, label\]: fix the list file'),
    ("json", r"map_val.txt is not JSON \(.* at line 5, column 1\): expected a JSON array of \[image path"),
    ("classes", r"map_train.txt has 3 classes but data.num_classes=4: set data.num_classes=3"),
    ("missing", r"no val list file ILSVRC2011fall_whole_map_val.txt; expected a JSON array"),
])
def test_imagenet22k_bad_list_is_one_line(imagenet22k_root, tmp_path, breakage, message):
    root = tmp_path / "in22k"
    shutil.copytree(imagenet22k_root, root)
    val = root / "ILSVRC2011fall_whole_map_val.txt"
    entries = json.loads(val.read_text())
    if breakage == "label":
        entries[1][1] = 7
    if breakage == "pair":
        entries[1] = entries[1][:1]
    val.write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + ("\n]" if breakage != "json" else ",\n]"))
    if breakage == "missing":
        val.unlink()
    overrides = {"num_classes": 4} if breakage == "classes" else {}
    with pytest.raises(ConfigError, match=message) as error:
        dm = _imagenet22k_module(root, **overrides)
        dm.check()
        dm.setup("validate")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- checkpoints
def _tiny_task(*overrides, seed=0):
    base = TINY_CLS if not any(o.startswith("backbone=") for o in overrides) else ["data.num_classes=4"]
    cfg = compose(*base, "output_dir=/tmp/unused", *overrides)
    torch.manual_seed(seed)
    return build_task(cfg).eval()


def _to_official_swin(sd):
    """timm Swin keys -> the official release's (patch merging at the end of the previous stage, ``head.*``)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
    return out


def test_official_swin_release_gives_the_same_logits(tmp_path):
    source = _tiny_task()
    sd = {k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    official = _to_official_swin(sd)
    official.update({"head.weight": source.head.weight, "head.bias": source.head.bias})
    assert "layers.0.downsample.reduction.weight" in official
    path = tmp_path / "swin_official.pth"
    torch.save({"model": official}, path)
    target = _tiny_task(seed=1)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(target(x), source(x))
    load_task_weights(target, path)
    torch.testing.assert_close(target(x), source(x))


def _tiny_swin_classifier(num_classes, seed, **task):
    from omegaconf import OmegaConf

    from vtrain.tasks.classification.module import ClassificationTask

    torch.manual_seed(seed)
    backbone = OmegaConf.create({"_target_": "vtrain.backbones.SwinTransformer", "img_size": 32, "embed_dim": 16,
                                 "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "window_size": 4,
                                 "drop_path_rate": 0.0})
    return ClassificationTask(backbone, {"_target_": "torch.optim.AdamW", "lr": 1e-3},
                              {"_target_": "vtrain.training.optim.cosine"}, num_classes=num_classes, **task).eval()


def test_official_22k_release_head_is_remapped_by_the_class_map(tmp_path, caplog):
    """An official-layout release with a 7-way head (the 21,841-way 22K one, small) for a 4-class model: the class
    map's rows, in its order, as the official load_pretrained does (head.weight[map22kto1k, :])."""
    source = _tiny_swin_classifier(7, seed=0)
    official = _to_official_swin({k.removeprefix("backbone."): v for k, v in source.state_dict().items()
                                  if k.startswith("backbone.")})
    official.update({"head.weight": source.head.weight, "head.bias": source.head.bias})
    assert "layers.0.downsample.reduction.weight" in official
    path = tmp_path / "swin_22k.pth"
    torch.save({"model": official}, path)
    class_map, rows = tmp_path / "map22kto1k.txt", [5, 0, 3, 6]
    class_map.write_text("".join(f"{r}\n" for r in rows))
    target = _tiny_swin_classifier(4, seed=1, map22kto1k=str(class_map))
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(target(x), source(x)[:, rows])
    load_task_weights(target, path)
    torch.testing.assert_close(target(x), source(x)[:, rows])
    # without a map the head keeps what it had, said in one line
    target.map22kto1k, before = None, target.head.weight.clone()
    with caplog.at_level("WARNING", logger="vtrain.training.checkpoint"):
        load_task_weights(target, path)
    assert torch.equal(target.head.weight, before)
    target.map22kto1k = class_map
    assert "is (7, 128), this model's (4, 128): it starts from its initialisation (task.map22kto1k=" in caplog.text
    class_map.write_text("5\n0\n3\n")
    with pytest.raises(ConfigError, match=r"map22kto1k.txt maps 3 classes but the model has 4: one line per class"):
        load_task_weights(target, path)
    class_map.write_text("5\n0\n7\n1\n")
    with pytest.raises(ConfigError, match=r"map22kto1k.txt line 3 is '7', not a row of the checkpoint's 7-way"):
        load_task_weights(target, path)


def test_timm_and_torchvision_resnet_state_dicts_load(tmp_path):
    reference = timm.create_model("resnet50", num_classes=4).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)  # torchvision's ResNet-50 keys are the same as timm's
    task = _tiny_task("backbone=resnet50")
    load_task_weights(task, path)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(task(x), reference(x))


def test_safetensors_and_unsafe_pickles(tmp_path):
    from safetensors.torch import save_file

    reference = timm.create_model("resnet50", num_classes=4).eval()
    save_file(reference.state_dict(), tmp_path / "r50.safetensors")
    task = _tiny_task("backbone=resnet50")
    load_task_weights(task, tmp_path / "r50.safetensors")
    torch.testing.assert_close(task.head.weight, reference.fc.weight)

    class Payload:  # an arbitrary object: weights_only=True must refuse to build it
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_task_weights(task, tmp_path / "evil.pth")
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no tensor of .* matches the backbone"):
        load_task_weights(task, tmp_path / "other.pth")


def test_swin_resolution_that_does_not_tile_is_refused_up_front(imagenet_root):
    from vtrain.config.validate import validate

    cfg = compose("experiment=swin_t_imagenet", "trainer=cpu", "backbone.img_size=240", "output_dir=/tmp/unused",
                  f"data.root={imagenet_root}", "data.num_classes=4")
    with pytest.raises(ConfigError, match=r"backbone.img_size=240 does not tile into Swin windows of 7 .* use 224 or 448 "
                                          r"\(the nearest sizes that do\)"):
        validate(cfg, instantiate(cfg.data))
    cfg.backbone.img_size = 224
    validate(cfg, instantiate(cfg.data))
    # windows of 4 (the quickstart's): 36 is refused, and the sizes named are those that train (32 does: each
    # stage holds whole windows or fits in one; the message used to say "a multiple of 128")
    cfg = compose("experiment=quickstart", "backbone.img_size=36", "output_dir=/tmp/unused", f"data.root={imagenet_root}",
                  "data.num_classes=4")
    with pytest.raises(ConfigError, match=r"use 32 or 64 \(the nearest"):
        validate(cfg, instantiate(cfg.data))
    for size in (32, 64):
        cfg.backbone.img_size = size
        validate(cfg, instantiate(cfg.data))


@pytest.mark.parametrize("fmt", ["csv", "txt"])
def test_flat_official_val_folder_is_sorted_into_the_imagenet_layout(imagenet_root, tmp_path, fmt):
    import subprocess
    import sys

    from conftest import ROOT

    val = tmp_path / "val"
    val.mkdir()
    truth = {}
    for i, f in enumerate(sorted((imagenet_root / "val").rglob("*.JPEG"))):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        shutil.copy(f, val / name)
        truth[name] = f.parent.name
    labels = tmp_path / f"labels.{fmt}"
    if fmt == "csv":
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{n[:-5]},{w} 10 20 30 40\n" for n, w in truth.items()))
    else:
        labels.write_text("".join(f"{n} {w}\n" for n, w in truth.items()))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "imagenet_val_to_folders.py"), str(val), str(labels)], check=True)
    assert {p.name: p.parent.name for p in val.rglob("*.JPEG")} == truth
    assert not [p for p in val.iterdir() if p.is_file()]


def test_swin_recipe_randaugment_survives_its_strongest_draws():
    """rand-m9-mstd0.5-inc1 samples magnitudes up to 10, where increasing posterize keeps 0 bits; Pillow 13
    raises on that (about once per 1500 images), so the install keeps Pillow 12."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import _posterize_increasing_level_to_arg, posterize

    assert _posterize_increasing_level_to_arg(10.0, {}) == (0,)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert np.asarray(posterize(image, 0)).max() == 0  # 0 bits kept: black, not an exception


@pytest.mark.parametrize(
    "override, message",
    [
        ("mode=fit", r"mode='fit' is not a mode: use mode=train or mode=eval"),
        ("trainer=gpu", r"trainer.accelerator=gpu but no CUDA device is visible: use trainer=cpu"),
        ("ckpt_path=/nonexistent/last.ckpt", r"ckpt_path=/nonexistent/last.ckpt does not exist"),
        ("pretrained=/nonexistent/w.pth", r"pretrained=/nonexistent/w.pth does not exist"),
    ],
)
def test_every_validator_message(imagenet_root, override, message):
    from vtrain.config.validate import validate

    cfg = compose(*TINY_CLS, f"data.root={imagenet_root}", "output_dir=/tmp/unused", override)
    if torch.cuda.is_available() and override == "trainer=gpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        validate(cfg, instantiate(cfg.data))


@pytest.mark.usefixtures("one_thread")
def test_rotation_evaluation_scores_the_images_turned_clockwise(monkeypatch):
    """SAN's rotation test: ``task.test_rotation=90`` scores what the plain evaluation scores on the images turned 90
    degrees clockwise by hand (pixel (i, j) of the turned image is pixel (H - 1 - j, i): the top-left corner goes to
    the top right), 180 likewise (pixel (H - 1 - i, W - 1 - j)); 0 is the plain evaluation; other angles are one line."""
    task, side = _tiny_swin_classifier(4, seed=0, test_rotation=90), 32
    images, labels = torch.randn(2, 3, side, side), torch.tensor([0, 3])
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    by_hand = {0: images, 90: images[..., side - 1 - cols, rows], 180: images[..., side - 1 - rows, side - 1 - cols]}
    corner = torch.zeros(1, 1, side, side)
    corner[..., 0, 0] = 1
    assert corner[..., side - 1 - cols, rows][0, 0, 0, side - 1] == 1  # the hand rotation is clockwise
    scored = []
    monkeypatch.setattr(task, "log_accuracy", lambda scores, targets, loss: scored.append(scores))
    with torch.no_grad():
        for degrees in (90, 180, 0):
            task.test_rotation = degrees
            task.validation_step((images, labels), 0)
            torch.testing.assert_close(scored[-1], task(by_hand[degrees]))
    assert not torch.allclose(scored[0], scored[2])  # the rotation changed what the model saw
    with pytest.raises(ConfigError, match=r"^task.test_rotation=45: the validation images turn by 0, 90, 180 or 270"):
        _tiny_swin_classifier(4, seed=0, test_rotation=45)
