"""Segmentation: mmseg-exact metric, ADE20K data (layout, pipeline, bad input), every head on a CNN and a
transformer, whole / slide / multi-scale inference, and a quickstart fit evaluated again under DDP."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from conftest import compose, run_forked, run_in_process
from vtrain.tasks.segmentation.data import SegmentationDataModule, AnnotationError, SegmentationDataset, collate_padded, list_pairs
from vtrain.tasks.segmentation.inference import predict, rescale_size, slide
from vtrain.tasks.segmentation.metrics import SegmentationMetrics
from vtrain.config import ConfigError
from vtrain.training.build import build_task

TINY_SWIN = [
    "backbone=swin_t", "backbone.embed_dim=32", "backbone.depths=[1,1,2,1]", "backbone.num_heads=[1,2,4,8]",
    "backbone.window_size=4", "backbone.img_size=64",
]
TINY_VIT = ["backbone=vit_s16", "backbone.embed_dim=64", "backbone.depth=1", "backbone.num_heads=2", "backbone.img_size=64"]
# ResNet-26: the bottleneck widths of ResNet-50 (the heads see the same channels), fewer blocks to build and run
RESNET = ["backbone=resnet26"]
RESNET_D8 = ["backbone=resnet26", "backbone.output_stride=8"]  # the dilated "-D8" of the NL / GC / DNL recipes
# Narrow heads: the layout is the configs', the widths are CPU-sized.
NARROW_HEADS = ["task.head.channels=32", "task.aux_head.channels=16"]


@pytest.fixture(scope="session")
def ade_root(tmp_path_factory) -> Path:
    """6 classes; 48 training / 7 validation images of 64x80 (an odd count, for the DDP split)."""
    from vtrain.tasks.segmentation.synthetic import write

    root = tmp_path_factory.mktemp("ade20k")
    write(root, seed=0, num_classes=6, train=48, val=7, height=64, width=80)
    return root


# ------------------------------------------------------------------------------------------------ metric
def _mmseg_by_hand(preds: list[np.ndarray], labels: list[np.ndarray], num_classes: int) -> dict:
    """mmseg ``total_intersect_and_union`` + ``mean_iou``, written out with per-class loops."""
    inter, union, area_label = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        keep = label != 255
        for c in range(num_classes):
            p, t = (pred == c) & keep, (label == c) & keep
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
            area_label[c] += t.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / area_label
    return {"mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "aAcc": inter.sum() / area_label.sum(), "IoU": iou}


def test_metric_is_mmseg_dataset_level_iou():
    rng = np.random.default_rng(0)
    k = 7
    preds, labels = [], []
    for h, w in ((20, 30), (17, 25), (32, 8)):
        label = rng.integers(0, k - 1, size=(h, w))  # class k-1 never labelled ...
        label[rng.random((h, w)) < 0.2] = 255  # ... and a fifth of the pixels ignored
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, k - 2, size=(h, w)))  # ... nor predicted
        pred[pred == 255] = 0
        preds.append(pred)
        labels.append(label)
    metric = SegmentationMetrics(k)
    jaccard = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")
    for pred, label in zip(preds, labels):
        metric.update(torch.from_numpy(pred), torch.from_numpy(label))
        jaccard.update(torch.from_numpy(pred), torch.from_numpy(label))
    got, expected = metric.compute(), _mmseg_by_hand(preds, labels, k)
    for name in ("mIoU", "mAcc", "aAcc"):
        assert got[name].item() == pytest.approx(expected[name], abs=1e-9), name
    assert torch.isnan(got["IoU"][k - 1])  # no union: left out of the mean, as mmseg's nanmean
    np.testing.assert_allclose(got["IoU"][: k - 1].numpy(), expected["IoU"][: k - 1], atol=1e-9)
    assert got["mIoU"].item() == pytest.approx(jaccard.compute().item(), abs=1e-6)
    # the mean of per-image IoUs (what MeanIoU computes) is a different number on this data
    per_image = []
    for pred, label in zip(preds, labels):
        m = SegmentationMetrics(k)
        m.update(torch.from_numpy(pred), torch.from_numpy(label))
        per_image.append(m.compute()["mIoU"].item())
    assert abs(np.mean(per_image) - got["mIoU"].item()) > 0.0001


# ------------------------------------------------------------------------------------------------ data
def test_layout_label_reduction_and_training_pipeline(ade_root):
    pairs = list_pairs(ade_root, "train")
    assert len(pairs) == 48 and all(Path(i).stem == Path(a).stem for i, a in pairs)
    raw = np.asarray(Image.open(pairs[0][1]))
    options = dict(mean=(0, 0, 0), std=(1, 1, 1))
    _, label = SegmentationDataset(pairs, 6, train=False, **options).load(0)
    assert set(np.unique(raw)) - {0} and 0 in raw
    np.testing.assert_array_equal(label[raw == 0], 255)  # "other" -> ignore
    np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)  # 1..K -> 0..K-1

    train = SegmentationDataset(pairs, 6, train=True, img_scale=(80, 64), ratio_range=(0.5, 2.0), crop_size=(48, 48),
                                **options)
    np.random.seed(0)
    padded = 0
    for i in range(12):
        sample = train[i]
        assert sample["image"].shape == (3, 48, 48) and sample["label"].shape == (48, 48)
        values = set(sample["label"].unique().tolist())
        assert values <= set(range(6)) | {255}
        padded += bool((sample["label"] == 255).all(dim=1).any())  # a crop from a small resize is padded with 255
    assert padded > 0

    val = SegmentationDataset(list_pairs(ade_root, "val"), 6, train=False, **options)
    batch = collate_padded([val[0], val[1]])
    assert batch["images"].shape == (2, 3, 64, 80) and batch["sizes"].tolist() == [[64, 80], [64, 80]]


def test_resize_follows_mmcv_rescale():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # short side to 512
    assert rescale_size(300, 3000, (2048, 512)) == (205, 2048)  # long side capped at 2048
    assert rescale_size(375, 500, (2048, 512), ratio=0.5) == (256, 341)


def test_resize_pair_gives_the_pixels_of_plain_float_interpolation():
    """The channels_last, clamp-free resize gives exactly what NCHW float interpolation, rounding and clamping gives
    (mmcv's OpenCV INTER_LINEAR within one level), shrinking and enlarging; the label by nearest."""
    from vtrain.tasks.segmentation.data import resize_pair

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image[:5] = 255  # saturated rows: no value may leave 0..255
    label = rng.integers(0, 7, (37, 53), dtype=np.uint8)
    for size in ((20, 29), (37, 80), (91, 131)):
        img, lab = resize_pair(image, label, size)
        x = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=size, mode="bilinear",
                          align_corners=False).round().clamp(0, 255)[0].permute(1, 2, 0).to(torch.uint8).numpy()
        y = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size, mode="nearest")[0, 0].numpy()
        assert img.dtype == lab.dtype == np.uint8 and img.shape == (*size, 3)
        assert np.array_equal(img, x) and np.array_equal(lab, y.astype(np.uint8))


def _copy_root(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_input_is_named(ade_root, tmp_path):
    missing = SegmentationDataModule(str(tmp_path / "nowhere"), num_classes=6)
    with pytest.raises(ConfigError, match="does not exist"):
        missing.check()

    root = _copy_root(ade_root, tmp_path / "unpaired")
    (root / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(ConfigError, match=r"1 images in images/training have no annotation.*ADE_train_00000003\.jpg.*skip_unpaired"):
        SegmentationDataModule(str(root), num_classes=6).check()
    SegmentationDataModule(str(root), num_classes=6, skip_unpaired=True).check()
    assert len(list_pairs(root, "train", skip_unpaired=True)) == 47

    root = _copy_root(ade_root, tmp_path / "bad")
    label_path = root / "annotations" / "validation" / "ADE_val_00000002.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label_path)
    dataset = SegmentationDataset(list_pairs(root, "val"), 6, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(AnnotationError, match=r"ADE_val_00000002\.png is 10x10 but its image .* is 80x64"):
        dataset[1]

    label = np.full((64, 80), 3, np.uint8)
    label[:2, :5] = 200
    label[5, 5] = 255
    Image.fromarray(label).save(label_path)
    with pytest.raises(AnnotationError, match=r"ADE_val_00000002\.png has 10 pixels with labels \[200\] above 6"):
        dataset[1]
    lenient = SegmentationDataset(dataset.pairs, 6, train=False, mean=(0, 0, 0), std=(1, 1, 1), ignore_invalid_labels=True)
    out = lenient[1]["label"]
    assert (out == 255).sum() == 11 and (out == 2).sum() == 64 * 80 - 11


# ------------------------------------------------------------------------------------------------ models
def _module(*overrides: str):
    cfg = compose("task=segmentation", "data=ade20k", "data.num_classes=6", "output_dir=/tmp/vtrain-test-seg", *overrides)
    return build_task(cfg)


@pytest.mark.parametrize("backbone", ["cnn", "swin", "vit"])
def test_every_head_trains_and_infers_at_input_size(backbone):
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 6, (2, 64, 64))
    labels[:, :8] = 255
    image = torch.randn(1, 3, 50, 70)  # not a multiple of 32: padded for the backbone, cropped back
    bb = {"cnn": RESNET, "swin": TINY_SWIN, "vit": TINY_VIT}[backbone]
    cases = [(head, bb) for head in ("upernet", "fcn", "nl", "gc", "dnl")]
    if backbone == "cnn":
        cases.append(("dnl", RESNET_D8))
    for head, bb in cases:
        module = _module(f"task/head={head}", *bb, *NARROW_HEADS, "task.inference.scale=null")
        module.train()
        losses = module.losses(images, labels)
        assert set(losses) == {"decode", "aux", "loss"} and torch.isfinite(losses["loss"])
        losses["loss"].backward()
        head_grads = [p.grad for p in module.head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in head_grads), head
        # what DDP would stop on: a parameter without a gradient (the backbone builds only what the heads read)
        assert not [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None], head
        module.eval()
        probs = module.predict_probs(image)
        assert probs.shape == (1, 6, 50, 70), head
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 50, 70))
        module.inference_cfg.update(mode="slide", crop_size=(32, 48), stride=(24, 32))  # 2 x 2 windows
        assert module.predict_probs(image).shape == (1, 6, 50, 70), head


@pytest.mark.usefixtures("one_thread")  # HRNet's many small convs stall on busy cores with more threads
def test_hrnet_fcn_head_concatenates_the_four_branches_and_trains():
    """mmseg's fcn_hr48: the four HRNet branches resized (bilinear) to stride 4 and concatenated, one 1x1
    conv-BN-ReLU, the classifier; written out here on timm's small HRNet (hrnet_w18_small: 16..128 channels)."""
    torch.manual_seed(0)
    module = _module("task/head=fcn_hr48", "backbone=hrnet_w48", "backbone.variant=hrnet_w18_small",
                     "task.head.channels=16", "task.aux_head=null")
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32))
    module.train()
    module.losses(images, labels)["loss"].backward()
    assert not [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    module.eval()
    with torch.no_grad():
        branches = module.backbone(images)
        concat = torch.cat([F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False) for b in branches], 1)
        conv, bn, _ = module.head.convs[0]
        hidden = F.batch_norm(F.conv2d(concat, conv.weight), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                              eps=bn.eps).relu()
        expected = F.conv2d(hidden, module.head.classifier.weight, module.head.classifier.bias)
        torch.testing.assert_close(module.head(dict(enumerate(branches))), expected)
    assert concat.shape[1] == 16 + 32 + 64 + 128 and conv.kernel_size == (1, 1)


def test_fcn_hr48_size_is_timms_backbone_plus_mmsegs_head():
    cfg = compose("experiment=fcn_hr48_ade20k", "trainer=cpu")
    with torch.device("meta"):
        module = build_task(cfg)
    head = 720 * 720 + 2 * 720 + 720 * 150 + 150  # 1x1 conv (no bias), BN, classifier (fcn_hr18.py, W48 widths)
    assert sum(p.numel() for p in module.backbone.parameters()) == 65_325_120  # timm hrnet_w48, feature_location=""
    assert sum(p.numel() for p in module.parameters()) == 65_325_120 + head and module.aux_head is None


def test_the_backbone_is_built_with_the_levels_the_heads_read():
    """FCN-style heads read C5 (aux: C4): a transformer then has no output modules for C2/C3 (nothing DDP would
    find without a gradient); UperNet reads all four."""
    def output_modules(backbone):  # Swin's per-level norms, ViT's pyramid branches
        return {".".join(n.split(".")[:2]) for n, _ in backbone.named_parameters() if n.split(".")[0] in
                ("out_norms", "pyramid")}

    expected = {
        ("swin", "fcn"): {"out_norms.2", "out_norms.3"},
        ("swin", "upernet"): {"out_norms.0", "out_norms.1", "out_norms.2", "out_norms.3"},
        ("vit", "fcn"): set(),
        ("vit", "upernet"): {"pyramid.to_stride4", "pyramid.to_stride8"},
    }
    for (name, head), modules in expected.items():
        module = _module(f"task/head={head}", *(TINY_SWIN if name == "swin" else TINY_VIT), *NARROW_HEADS)
        assert module.backbone.out_indices == ((2, 3) if head == "fcn" else (0, 1, 2, 3)), (name, head)
        assert output_modules(module.backbone) == modules, (name, head)
    with pytest.raises(Exception, match="has no out_indices"):
        _module("~task.head.out_indices", *TINY_SWIN, *NARROW_HEADS)


def test_slide_multiscale_and_flip():
    module = _module(*TINY_SWIN, *NARROW_HEADS).eval()
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        logits = module(image)
        # one window covering the whole image is the whole-image inference
        torch.testing.assert_close(slide(module, image, crop_size=(64, 64), stride=(48, 48)), logits)
        # windows average where they overlap: a constant model gives its constant back
        constant = slide(lambda x: torch.ones(1, 2, *x.shape[-2:]), image, crop_size=(24, 24), stride=(16, 16))
        torch.testing.assert_close(constant, torch.ones(1, 2, 40, 56))
        flipped = predict(module, image, scale=None, flip=True)
        by_hand = (logits.softmax(1) + module(image.flip(-1)).flip(-1).softmax(1)) / 2
        torch.testing.assert_close(flipped, by_hand)
        multi = predict(module, image, scale=(56, 40), ratios=(0.5, 1.0, 1.5))
        assert multi.shape == (1, 6, 40, 56)
        torch.testing.assert_close(multi.sum(1), torch.ones(1, 40, 56))


def test_recipes():
    swin = compose("experiment=swin_t_upernet_ade20k")
    assert swin.task.head._target_.endswith("UperNetHead") and swin.backbone.drop_path_rate == 0.3 and swin.backbone.embed_dim == 96
    assert (swin.optim._target_, swin.optim.lr, swin.optim.weight_decay, tuple(swin.optim.betas)) == (
        "torch.optim.AdamW", 6e-5, 0.01, (0.9, 0.999))
    assert (swin.sched._target_, swin.sched.power, swin.sched.min_lr, swin.sched.warmup_steps) == ("vtrain.training.optim.poly", 1.0, 0.0, 1500)
    assert (swin.trainer.max_steps, swin.trainer.max_epochs, swin.trainer.val_check_interval) == (160000, -1, 16000)
    assert swin.trainer.check_val_every_n_epoch is None and swin.trainer.sync_batchnorm
    assert swin.task.aux_weight == 0.4 and swin.task.aux_head.channels == 256 and swin.task.head.channels == 512
    assert tuple(swin.data.crop_size) == (512, 512) and tuple(swin.data.img_scale) == (2048, 512)
    assert tuple(swin.task.inference.scale) == (2048, 512)
    for name, head in (("dnl", "DisentangledNonLocalBlock"), ("gcnet", "GlobalContextBlock"), ("nl", ".NonLocalBlock")):
        cfg = compose(f"experiment={name}_r50_ade20k")
        assert cfg.task.head.context._target_.endswith(head) and cfg.backbone.depth == 50 and cfg.backbone.output_stride == 8
        assert (cfg.optim._target_, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
            "torch.optim.SGD", 0.01, 0.9, 5e-4)
        assert (cfg.sched._target_, cfg.sched.power, cfg.sched.min_lr, cfg.trainer.max_steps) == ("vtrain.training.optim.poly", 0.9, 1e-4, 80000)
    assert compose("experiment=dnl_r50_ade20k").task.head.context.temperature == 0.05
    assert compose("experiment=gcnet_r50_ade20k").task.head.context.ratio == 0.25


def test_unknown_head_is_a_config_error():
    with pytest.raises(Exception, match=r"(?s)Could not find 'task/head/psp'.*Available options in 'task/head':\s+dnl\s+fcn\s+fcn_hr48\s+gc\s+hrnet_dnl\s+hrnet_nl\s+nl\s+setr_mla\s+setr_naive\s+setr_pup\s+upernet"):
        _module(*TINY_SWIN, "task/head=psp")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quickstart_fit_then_ddp_eval_matches(ade_root, tmp_path):
    run_dir = tmp_path / "fit"
    data = ["experiment=quickstart_seg", f"data.root={ade_root}", "data.img_scale=[80,64]", "data.num_workers=0",
            "callbacks.progress_bar=null"]
    # iteration-based, as the ADE20K recipes: 36 steps of 8 images, validation every 12 steps across epochs
    run_in_process(*data, f"hydra.run.dir={run_dir}", "trainer.max_epochs=-1", "trainer.max_steps=36",
                   "trainer.val_check_interval=12", "trainer.check_val_every_n_epoch=null")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["global_step"] == 36
    assert final["val/mIoU"] > 0.40, final  # chance is about 1/(2K-1) ~ 0.09 with 6 classes
    # named as the dataset names its classes (the synthetic data's classes.txt)
    assert set(metrics["per_class_IoU"]) == {line.split()[1] for line in (ade_root / "classes.txt").read_text().splitlines()}
    # the loss's terms are logged at the steps the logger writes (every 10th), each row's the same step's
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss_step"]]
    assert [int(row["step"]) for row in rows] == [9, 19, 29]
    for row in rows:
        total = float(row["train/loss_decode"]) + float(row["train/loss_aux"])
        assert float(row["train/loss_step"]) == pytest.approx(total, rel=1e-5), row

    eval_dir = tmp_path / "ddp_eval"
    ddp = run_forked(*data, f"hydra.run.dir={eval_dir}", "mode=eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                     "trainer=ddp_cpu", "data.val_batch_size=1", timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    # 7 images over 2 processes, 4 and 3 batches: an image counted twice would change the sums
    for name in ("val/mIoU", "val/mAcc", "val/aAcc"):
        assert evaluated["final"][name] == pytest.approx(final[name], abs=1e-6), name
    assert evaluated["per_class_IoU"] == metrics["per_class_IoU"]


def test_a_checkpoint_with_outputs_no_head_reads_still_evaluates(tmp_path):
    """Checkpoints written when the backbone built output norms for all four levels: an FCN head on a Swin read
    C4/C5 only, and C2/C3's norms (never trained) are dropped on load."""
    from vtrain.training.checkpoint import load_task_weights

    module = _module("task/head=fcn", *TINY_SWIN, *NARROW_HEADS)
    old = dict(module.state_dict())
    for level in (0, 1):
        channels = module.backbone.feature_info.channels(0) // 2 ** (2 - level)
        old[f"backbone.out_norms.{level}.weight"] = torch.ones(channels)
        old[f"backbone.out_norms.{level}.bias"] = torch.zeros(channels)
    old = {k: v + 1 if v.is_floating_point() else v for k, v in old.items()}
    torch.save({"state_dict": old, "pytorch-lightning_version": "2.6.0", "epoch": 0, "global_step": 1},
               tmp_path / "old.ckpt")
    fresh = _module("task/head=fcn", *TINY_SWIN, *NARROW_HEADS)
    load_task_weights(fresh, tmp_path / "old.ckpt")
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, old[key])
    old["backbone.layers.0.blocks.0.norm1.weight_extra"] = torch.ones(1)  # anything else still refuses
    torch.save({"state_dict": old, "pytorch-lightning_version": "2.6.0"}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="is not of this experiment's model"):
        load_task_weights(fresh, tmp_path / "other.ckpt")
