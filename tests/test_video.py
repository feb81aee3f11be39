"""Video classification: decoding and clip sampling, corrupt files, layouts, inflation, backbones, quickstart."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose, run_forked
from vtrain.config import ConfigError
from vtrain.training.build import build_task

# The quickstart dataset: 80 training and 20 validation videos per motion class, 32x32, 8-10 frames.
QUICKSTART_DATA = {"train_per_class": 80, "val_per_class": 20}


@pytest.fixture(scope="module")
def kinetics_root(tmp_path_factory) -> Path:
    """6 motion classes x 3 training / 2 validation videos of 32x32, class folders plus list files."""
    from vtrain.tasks.video.synthetic import write

    root = tmp_path_factory.mktemp("kinetics")
    write(root, seed=0, train_per_class=3, val_per_class=2)
    return root


def gray_video(path: Path, levels: list[int], size: int = 32) -> None:
    """A video whose frame k is a flat gray of ``levels[k]``: the decoded frame says which frame it is."""
    from vtrain.tasks.video.synthetic import write_video

    write_video(path, [np.full((size, size, 3), level, dtype=np.uint8) for level in levels])


def test_synthetic_kinetics_is_byte_identical_for_a_seed(tmp_path):
    # a lossy x264 rate wrote different bytes (and frames up to 13 grey levels apart) on every call
    from vtrain.tasks.video.synthetic import write

    for name in ("a", "b"):
        write(tmp_path / name, seed=0, train_per_class=4, val_per_class=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.mp4"))
    assert len(files) == 30
    assert [f for f in files if (tmp_path / "a" / f).read_bytes() != (tmp_path / "b" / f).read_bytes()] == []


# ---------------------------------------------------------------------------------------------- sampling
def test_clip_indices_stride_offsets_and_looping():
    from vtrain.tasks.video.clips import test_clip_indices, train_clip_indices

    rng = np.random.default_rng(0)
    for _ in range(20):
        clip = train_clip_indices(100, clip_len=8, frame_interval=8, rng=rng)
        assert np.all(np.diff(clip) == 8) and 0 <= clip[0] <= 100 - 64
    # 4 clips of 32x2 over 300 frames, each centred in its quarter of the 300 - 64 + 1 possible starts (mmaction2)
    clips = test_clip_indices(300, clip_len=32, frame_interval=2, num_clips=4)
    assert clips.shape == (4, 32)
    assert clips[:, 0].tolist() == [29, 88, 148, 207]  # int(k * 59.25 + 29.625)
    # a video shorter than a clip loops its frames
    assert train_clip_indices(5, 8, 1, rng).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert test_clip_indices(5, 4, 2, 2).tolist() == [[0, 2, 4, 1], [0, 2, 4, 1]]


def test_decoded_frames_follow_the_sampled_indices(tmp_path):
    from vtrain.tasks.video.clips import VideoReader, test_clip_indices

    levels = [10 + 18 * k for k in range(12)]
    gray_video(tmp_path / "ramp.mp4", levels)
    with VideoReader(tmp_path / "ramp.mp4") as video:
        assert video.num_frames == 12
        indices = test_clip_indices(video.num_frames, clip_len=4, frame_interval=3, num_clips=1)[0]
        frames = video.read(indices, short_side=48)
    assert indices.tolist() == [0, 3, 6, 9]
    assert frames.shape == (4, 48, 48, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [levels[i] for i in indices], atol=3)

    gray_video(tmp_path / "short.mp4", levels[:5])
    with VideoReader(tmp_path / "short.mp4") as video:
        looped = video.read([0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_allclose(looped.mean(axis=(1, 2, 3)), [levels[i] for i in (0, 1, 2, 3, 4, 0, 1, 2)], atol=3)

    # Matroska stores no frame count: it is counted from the packets
    gray_video(tmp_path / "ramp.mkv", levels[:7])
    with VideoReader(tmp_path / "ramp.mkv") as video:
        assert video.stream.frames == 0 and video.num_frames == 7
        np.testing.assert_allclose(video.read([6, 0]).mean(axis=(1, 2, 3)), [levels[6], levels[0]], atol=3)


# ---------------------------------------------------------------------------------------------- data module
def datamodule(root: Path, **overrides):
    cfg = compose("experiment=quickstart_video", f"data.root={root}", "output_dir=/tmp/vtrain-test-video")
    return instantiate(cfg.data, **overrides)


def test_corrupt_videos_are_skipped_counted_and_named(kinetics_root, tmp_path, caplog):
    from vtrain.tasks.video.data import collate_clips
    from vtrain.data.datamodule import CorruptFileError, ReadableCollate

    root = tmp_path / "kinetics"
    shutil.copytree(kinetics_root, root)
    (root / "val/grow/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    good = root / "val/grow/grow_00000.mp4"
    (root / "val/grow/truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    data = datamodule(root)
    data.setup("validate")
    names = [Path(p).name for p, _ in data.val_set.samples]
    with caplog.at_level(logging.WARNING):
        counted = ReadableCollate(collate_clips)([data.val_set[i] for i in range(len(names))])
    batch = counted.batch
    assert (counted.samples, counted.skipped) == (len(names), 2)
    assert len(batch["labels"]) == len(names) - 2 == 12
    assert batch["clips"].shape == (12, 2, 3, 8, 32, 32)  # videos, views (2 clips x 1 crop), C, T, H, W
    assert "broken.mp4" in caplog.text and "truncated.mp4" in caplog.text

    strict = datamodule(root, skip_corrupt=False)
    strict.setup("validate")
    with pytest.raises(CorruptFileError, match="broken.mp4"):
        strict.val_set[names.index("broken.mp4")]


def test_training_clips_follow_the_seed_and_resume_mid_epoch(kinetics_root):
    def batches(seed, state=None, count=3):
        data = datamodule(kinetics_root, seed=seed, num_workers=0, batch_size=2)
        data.setup("fit")
        loader = data.train_dataloader()
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        out = [next(it).batch for _ in range(count)]
        return out, loader.state_dict()

    first, _ = batches(0)
    again, _ = batches(0)
    other, _ = batches(1)
    for a, b in zip(first, again):
        assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["labels"], b["labels"])
    assert not all(torch.equal(a["clips"], b["clips"]) for a, b in zip(first, other))

    _, after_one = batches(0, count=1)
    resumed, _ = batches(0, state=after_one, count=2)
    for a, b in zip(first[1:], resumed):
        assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["labels"], b["labels"])


def test_list_files_give_the_class_folder_samples(kinetics_root):
    folders = datamodule(kinetics_root)
    lists = datamodule(kinetics_root, train_list="train_list.txt", val_list="val_list.txt")
    for data in (folders, lists):
        data.check()
        data.setup("fit")
    assert sorted(lists.train_set.samples) == sorted(folders.train_set.samples)
    assert sorted(lists.val_set.samples) == sorted(folders.val_set.samples)
    assert folders.classes == ["grow", "move_down", "move_left", "move_right", "move_up", "shrink"]


def test_bad_roots_fail_in_one_line(kinetics_root, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        datamodule(tmp_path / "missing").check()
    with pytest.raises(ConfigError, match="set data.num_classes=6"):
        datamodule(kinetics_root, num_classes=400).check()
    with pytest.raises(ConfigError, match="relative to data.root"):
        (tmp_path / "train.txt").write_text("nowhere/a.mp4 0\n")
        (tmp_path / "val.txt").write_text("nowhere/b.mp4 0\n")
        datamodule(tmp_path, train_list="train.txt", val_list="val.txt").check()
    # the command line's check of the experiment's data (the one line it prints: test_classification's CLI test)
    from vtrain.config.validate import validate

    cfg = compose("experiment=quickstart_video", f"data.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=f"^data.root={tmp_path / 'missing'}"):
        validate(cfg, instantiate(cfg.data))


# ---------------------------------------------------------------------------------------------- inflation
TINY_SWIN_2D = dict(img_size=64, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=2, drop_path_rate=0.0)


def randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial norm parameters and statistics, so that a wrongly mapped one shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def official_swin_keys(state_dict: dict) -> dict:
    """timm's Swin keys -> the official release's (patch merging at the end of the previous stage)."""
    import re

    return {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
            for k, v in state_dict.items()}


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_video_swin_inflated_from_2d_swin_matches_it_on_a_still_video(tmp_path, layout):
    from vtrain.backbones import SwinTransformer

    torch.manual_seed(0)
    swin2d = SwinTransformer(**TINY_SWIN_2D).eval()
    randomise_norms(swin2d)
    state_dict = swin2d.state_dict() if layout == "timm" else official_swin_keys(swin2d.state_dict())
    torch.save({"model": state_dict}, tmp_path / "swin2d.pth")

    cfg = compose("task=video", "video_backbone=videoswin_t", "video_backbone.embed_dim=32",
                  "video_backbone.depths=[1,1,2,1]", "video_backbone.num_heads=[1,2,4,8]",
                  "video_backbone.window_size=[8,2,2]", "video_backbone.drop_path_rate=0.0", "data.num_classes=5",
                  "output_dir=/tmp/vtrain-test-video")
    task = build_task(cfg).eval()
    task.load_pretrained(str(tmp_path / "swin2d.pth"))

    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = swin2d.forward_pooled(image)
        for frames in (4, 32):  # 2 temporal tokens (window shrinks to them), 16 (shifted 8-token windows)
            got = task.backbone.forward_pooled(image[:, :, None].expand(-1, -1, frames, -1, -1))
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_i3d_inflated_from_2d_resnet_matches_it_away_from_temporal_borders(tmp_path, caplog):
    from vtrain.backbones import ResNet

    torch.manual_seed(0)
    resnet = ResNet(depth=50, out_indices=(3,)).eval()
    randomise_norms(resnet)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")  # torchvision / timm keys
    # no temporal stride before c2 (the recipe's conv1 and pool1 stride 2 in time), so that 40 frames keep 20
    cfg = compose("experiment=i3d_r50_nl_k400", "trainer=cpu", "output_dir=/tmp/vtrain-test-video",
                  "video_backbone.conv1_stride_t=1", "video_backbone.pool1_stride_t=1")
    task = build_task(cfg).eval()
    with caplog.at_level(logging.INFO, logger="vtrain.training.checkpoint"):
        task.load_pretrained(str(tmp_path / "resnet50.pth"))
    # every ResNet tensor is used; only the (identity-initialised) non-local blocks are new
    assert "0 of the file's have no place in it" in caplog.text
    i3d = task.backbone

    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = resnet(image)[-1]
        # 40 frames: the temporal receptive field (+-17 frames) leaves output times 9..10 (of 20) unpadded
        got = i3d(image[:, :, None].expand(-1, -1, 40, -1, -1))
    assert got.shape == (1, 2048, 20, 1, 1)
    for t in (9, 10):
        torch.testing.assert_close(got[:, :, t], expected, atol=1e-3 * expected.abs().mean().item(), rtol=1e-4)
    assert (got[:, :, 0] - expected).abs().max() > 1.0  # the border does see the zero padding


def test_torchvision_swin3d_weights_load_with_their_classifier(tmp_path):
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(0)
    micro = dict(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=[4, 4, 4])
    reference = SwinTransformer3d(patch_size=[2, 4, 4], stochastic_depth_prob=0.0, num_classes=6, **micro).eval()
    torch.save(reference.state_dict(), tmp_path / "swin3d.pth")  # the layout of torchvision's swin3d_t-7615ae03.pth
    cfg = compose("experiment=quickstart_video", "video_backbone=videoswin_micro", "output_dir=/tmp/vtrain-test-video")
    task = build_task(cfg).eval()
    task.load_pretrained(str(tmp_path / "swin3d.pth"))
    clips = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task(clips), reference(clips))


def _to_mmaction2(state_dict: dict) -> dict:
    """This framework's I3D keys written the way mmaction2's ResNet3d / NonLocal3d (sub_sample) name them."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("non_local."):  # non_local.layer3_1.phi.weight -> layer3.1.non_local_block.phi.0.conv.weight
            stage, block = parts[1].split("_")
            name = {"out_conv": "conv_out.conv", "out_norm": "conv_out.bn", "phi": "phi.0.conv", "g": "g.0.conv",
                    "theta": "theta.conv"}[parts[2]]
            key = f"{stage}.{block}.non_local_block.{name}.{parts[3]}"
        elif parts[0] in ("conv1", "bn1"):
            key = f"conv1.{'conv' if parts[0] == 'conv1' else 'bn'}.{parts[1]}"
        elif parts[2] == "downsample":
            key = ".".join(parts[:3] + ["conv" if parts[3] == "0" else "bn"] + parts[4:])
        else:  # layer2.0.bn3.weight -> layer2.0.conv3.bn.weight
            kind, index = parts[2][:-1], parts[2][-1]
            key = ".".join(parts[:2] + [f"conv{index}", kind] + parts[3:])
        out["backbone." + key] = value
    return out


def test_mmaction2_i3d_nl_checkpoints_load_and_give_the_same_scores(tmp_path):
    nl = "+video_backbone.nl={stages:[false,true,true,false],after_blocks:[1,3,5],sub_sample:true,use_scale:false}"
    cfg = compose("experiment=quickstart_video", "video_backbone=i3d_micro", nl, "output_dir=/tmp/vtrain-test-video")
    torch.manual_seed(0)
    reference = build_task(cfg)
    for name, tensor in reference.state_dict().items():  # every weight and BN statistic away from its init
        if tensor.ndim > 1:  # convolutions and the classifier: He-scaled, so that activations stay varied
            tensor.copy_(torch.randn_like(tensor) * (2 / tensor[0].numel()) ** 0.5)
        elif tensor.is_floating_point():  # norms' weights and statistics, biases
            tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith(("weight", "running_var"))
                         else torch.randn_like(tensor) * 0.1)
    state = _to_mmaction2(reference.backbone.state_dict())
    state.update({"cls_head.fc_cls.weight": reference.head.weight, "cls_head.fc_cls.bias": reference.head.bias})
    assert "backbone.layer3.1.non_local_block.g.0.conv.weight" in state and "backbone.conv1.bn.running_mean" in state
    torch.save({"meta": {"mmaction2_version": "1.2.0"}, "state_dict": state}, tmp_path / "i3d_nl_mmaction2.pth")

    task = build_task(cfg)
    task.load_pretrained(str(tmp_path / "i3d_nl_mmaction2.pth"))
    clips = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(clips), reference.eval()(clips))
        plain = build_task(compose("experiment=quickstart_video", "video_backbone=i3d_micro",
                                   nl.replace("sub_sample:true", "sub_sample:false"),
                                   "output_dir=/tmp/vtrain-test-video")).eval()
        plain.load_state_dict(task.state_dict())
        # the pooling changes what NL attends to
        assert not torch.allclose(plain.backbone(clips), task.backbone(clips), atol=1e-3)


def test_framewise_model_loads_2d_weights_into_its_image_backbone(tmp_path):
    from vtrain.backbones import SwinTransformer

    cfg = compose("experiment=quickstart_video", "video_backbone=frames", "output_dir=/tmp/vtrain-test-video")
    swin2d = instantiate(cfg.backbone)
    torch.save({"model": official_swin_keys(swin2d.state_dict())}, tmp_path / "swin2d.pth")
    task = build_task(cfg).eval()
    task.load_pretrained(str(tmp_path / "swin2d.pth"))
    frames = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = swin2d.eval().forward_pooled(frames.transpose(1, 2).flatten(0, 1)).view(2, 4, -1).mean(1)
        torch.testing.assert_close(task.backbone.forward_pooled(frames), expected)
    assert isinstance(task.backbone.image_backbone, SwinTransformer)


# ---------------------------------------------------------------------------------------------- backbones
@pytest.mark.parametrize(
    "overrides",
    [
        ["video_backbone=videoswin_micro"],
        ["video_backbone=i3d_r50", "+video_backbone.nl={stages:[false,true,true,false],after_blocks:[1,3,5]}"],
        ["video_backbone=i3d_r50", "+video_backbone.dnl={stages:[false,false,true,false],after_blocks:[-2]}"],
        ["video_backbone=frames"],
    ],
    ids=["videoswin", "i3d_nl", "i3d_dnl", "frames"],
)
def test_video_backbone_trains_and_scores_views(kinetics_root, tmp_path, overrides):
    import pytorch_lightning as pl

    cfg = compose("experiment=quickstart_video", *overrides, f"data.root={kinetics_root}", "data.batch_size=2",
                  "data.val_batch_size=2", "data.num_test_crops=3", "data.eval_short_side=40",
                  f"output_dir={tmp_path}")
    data = instantiate(cfg.data)
    data.check()
    task = build_task(cfg)
    before = {k: v.clone() for k, v in task.backbone.state_dict().items() if v.is_floating_point()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    changed = [k for k, v in task.backbone.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2, "one training step should update most backbone tensors"
    (metrics,) = trainer.validate(task, datamodule=data, verbose=False)
    assert {"val/top1", "val/top5", "val/loss"} <= set(metrics)
    assert metrics["val/top5"] >= metrics["val/top1"]

    # views: 2 clips x 3 crops; the video score is the mean of the six views' softmax
    batch = next(iter(data.val_dataloader())).batch
    assert batch["clips"].shape == (2, 6, 3, 8, 32, 32)
    task.eval()
    with torch.no_grad():
        probabilities = task.video_probabilities(batch["clips"])
        per_view = torch.stack([task(batch["clips"][:, v]).softmax(-1) for v in range(6)], dim=1)
    torch.testing.assert_close(probabilities, per_view.mean(dim=1))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(2))


def test_paper_models_have_the_reference_sizes():
    # torchvision's swin3d_t with its 400-class head: 28,158,070 parameters; mmaction2's I3D R50 NL
    # (dot product, 5 blocks) 35.40M and I3D R50 28.04M with the 400-class head.
    sizes = {}
    for experiment in ("videoswin_t_k400", "i3d_r50_nl_k400", "i3d_r50_dnl_k400"):
        cfg = compose(f"experiment={experiment}", "trainer=cpu", "output_dir=/tmp/vtrain-test-video")
        task = build_task(cfg)
        sizes[experiment] = sum(p.numel() for n, p in task.named_parameters())
    assert sizes["videoswin_t_k400"] == 28_158_070
    assert round(sizes["i3d_r50_nl_k400"] / 1e6, 2) == 35.40
    # DNL adds one 1x1x1 conv to one channel (the unary term) per block
    assert sizes["i3d_r50_dnl_k400"] - sizes["i3d_r50_nl_k400"] == 2 * (512 + 1) + 3 * (1024 + 1)


def test_nl_i3d_r101_has_the_official_placement_and_its_measured_size():
    """NL I3D R101 (i3d_r101_nl_k400): the official code's blocks for MODEL.DEPTH 101 (res3 every 2nd block, res4
    every 7th: idx % mod == mod - 1), on the meta device. 59,108,560 parameters with the 400-class head: the I3D R101
    plus five embedded-Gaussian blocks of C/2 inner channels (theta, phi, g with bias; the output conv without, a BN
    after it, as mmcv's ConvModule), counted here by hand; the table's 61.8M is not met
    (conf/table/videoswin_k400.yaml)."""
    cfg = compose("experiment=i3d_r101_nl_k400", "output_dir=/tmp/vtrain-test-video")
    with torch.device("meta"):
        backbone = instantiate(cfg.video_backbone)
    official = [f"layer2_{i}" for i in range(4) if i % 2 == 1] + [f"layer3_{i}" for i in range(23) if i % 7 == 6]
    assert sorted(backbone.non_local) == sorted(official)
    assert [len(stage) for stage in backbone.stages] == [3, 4, 23, 3]
    nl_block = {c: 3 * (c * c // 2 + c // 2) + c // 2 * c + 2 * c for c in (512, 1024)}
    for name, block in backbone.non_local.items():
        assert sum(p.numel() for p in block.parameters()) == nl_block[512 if name.startswith("layer2") else 1024]
    assert sum(p.numel() for p in backbone.parameters()) + (2048 + 1) * 400 == 59_108_560


def test_video_swin_l_has_the_papers_sizes():
    """Video Swin-L (Video-Swin-Transformer's _base_/models/swin/swin_large.py) with a 400-class head, on the meta
    device: with videoswin_l_384's 8x12x12 windows the paper's 384↑ rows' 200.0M, with videoswin_l's 8x7x7 (all
    videoswin_l_384 changes) its Table 1 Swin-L's 197.0M."""
    cfg = compose("task=video", "video_backbone=videoswin_l_384", "output_dir=/tmp/vtrain-test-video")
    assert list(cfg.video_backbone.window_size) == [8, 12, 12]
    for window, paper in (([8, 12, 12], 200.0), ([8, 7, 7], 197.0)):
        with torch.device("meta"):
            backbone = instantiate(cfg.video_backbone, window_size=window)
        params = sum(p.numel() for p in backbone.parameters()) + (backbone.num_features + 1) * 400  # + the head
        assert round(params / 1e6, 1) == paper, window


# ---------------------------------------------------------------------------------------------- quickstart
@pytest.mark.slow
def test_quickstart_video_learns_the_motion_not_the_frames(tmp_path):
    """The quickstart learns its motions, and from the order of the frames: each class is the time reversal of
    another with the same frames (tasks/video/synthetic.py), so the same validation clips played backwards must be
    read as the reversed motion. A frame-wise model (``video_backbone=frames``: its frames averaged) gives the same
    scores either way, which is why it is capped at 50%; docs/video.md has its measured figures."""
    import vtrain
    from vtrain.tasks.video.synthetic import MOTIONS, write

    root = tmp_path / "kinetics"
    write(root, seed=0, **QUICKSTART_DATA)
    run = tmp_path / "run"
    result = run_forked("experiment=quickstart_video", f"data.root={root}", f"hydra.run.dir={run}",
                     "callbacks.progress_bar=null", timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    reported = json.loads((run / "metrics.json").read_text())["final"]["val/top1"]

    model = vtrain.load(run / "checkpoints" / "last.ckpt")
    reverse = {i: i ^ 1 for i in range(len(MOTIONS))}  # move_left <-> move_right, move_up <-> move_down, grow <-> shrink
    assert [MOTIONS[reverse[i]] for i in range(len(MOTIONS))] == ["move_right", "move_left", "move_down", "move_up",
                                                                 "shrink", "grow"]
    named = [model.class_names.index(m) for m in MOTIONS]  # the dataset's label of each motion
    data = instantiate(compose("experiment=quickstart_video", f"data.root={root}", f"output_dir={tmp_path}").data)
    data.setup("validate")
    right = {"forward": 0, "backward as the reversed motion": 0, "backward as the motion played": 0}
    count = 0
    with torch.no_grad():
        for counted in data.val_dataloader():
            clips, labels = counted.batch["clips"], counted.batch["labels"]
            reversed_labels = torch.tensor([named[reverse[named.index(int(label))]] for label in labels])
            forward = model.video_probabilities(clips).argmax(-1)
            backward = model.video_probabilities(clips.flip(-3)).argmax(-1)  # (N, V, C, T, H, W): time reversed
            right["forward"] += int((forward == labels).sum())
            right["backward as the reversed motion"] += int((backward == reversed_labels).sum())
            right["backward as the motion played"] += int((backward == labels).sum())
            count += len(labels)
    accuracy = {name: value / count for name, value in right.items()}
    assert count == 6 * QUICKSTART_DATA["val_per_class"]
    assert accuracy["forward"] == pytest.approx(reported, abs=1e-6)  # the validation metrics.json reports
    # measured (2 cores, beside another run; lossless data): 0.975 forward (data seeds 1, 2: 0.958, 0.942), 0.975
    # backward read as the reversed motion, 0.008 backward read as the motion played; chance is 1/6, a frame-wise
    # model's cap 1/2 (measured 0.317, seed 1: 0.233).
    assert accuracy["forward"] >= 0.75, accuracy
    assert accuracy["backward as the reversed motion"] >= 0.75, accuracy
    assert accuracy["backward as the motion played"] <= 0.2, accuracy


def test_grad_checkpointing_on_a_video_model_is_a_one_line_error(kinetics_root, tmp_path):
    """What the command line does with grad_checkpointing=true (cli._run: set_grad_checkpointing, its ConfigError
    the one line)."""
    from vtrain.training.build import build_task

    module = build_task(compose("experiment=quickstart_video", f"data.root={kinetics_root}",
                                f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError) as raised:
        module.set_grad_checkpointing()
    assert str(raised.value) == ("grad_checkpointing: I3DResNet does not support it; the 2D backbones (ResNet, "
                                 "LR-Net, Swin, ViT) do")


def test_class_names_of_list_files_are_the_lines_of_classes_txt(tmp_path):
    """With list files, ``root/classes.txt`` holds one Kinetics label per line; labels have spaces and share words
    ("playing guitar", "playing piano"), so a line is a name, not an ``<id> <name>`` pair."""
    from vtrain.tasks.video.data import KineticsDataModule

    (tmp_path / "classes.txt").write_text("abseiling\nair drumming\nplaying guitar\nplaying piano\n")
    datamodule = KineticsDataModule(root=str(tmp_path), num_classes=4, train_list="train.txt", val_list="val.txt")
    assert datamodule.class_names == ["abseiling", "air drumming", "playing guitar", "playing piano"]
    assert KineticsDataModule(root=str(tmp_path), num_classes=5, train_list="train.txt",
                              val_list="val.txt").class_names == [f"class_{i}" for i in range(5)]


# ---------------------------------------------------------------------------------------------- Something-Something v2
@pytest.fixture(scope="module")
def ssv2_root(tmp_path_factory) -> Path:
    """The 6 motions in the Something-Something v2 layout (VP9 webm), 1 training and 1 validation video each."""
    from vtrain.tasks.video.synthetic import write_ssv2

    root = tmp_path_factory.mktemp("ssv2")
    write_ssv2(root, seed=0, train_per_class=1, val_per_class=1)
    return root


def test_ssv2_labels_come_from_the_templates_without_brackets(ssv2_root):
    """Each video's label is its template's index in the labels file once "[something]" loses its brackets, as
    mmaction2's parse_sthv2_splits; the videos are read back by id through the same reader as Kinetics'."""
    from vtrain.tasks.video.data import SomethingSomethingV2DataModule

    data = SomethingSomethingV2DataModule(root=str(ssv2_root), num_classes=6, frame_uniform=True, num_test_clips=1)
    data.check()
    items = json.loads((ssv2_root / "annotations/something-something-v2-train.json").read_text())
    labels = json.loads((ssv2_root / "annotations/something-something-v2-labels.json").read_text())
    assert items[1]["template"] == "Pushing [something] from left to right"
    assert labels["Pushing something from left to right"] == "4"  # sorted: the four "Moving ..." come first
    expected = [(str(ssv2_root / "20bn-something-something-v2" / f"{item['id']}.webm"),
                 int(labels[item["template"].replace("[", "").replace("]", "")])) for item in items]
    assert data.samples("train") == expected
    # move_left, move_right, up, down, grow, shrink: "Pushing ... right to left" last, "Moving ... away ..." first
    assert [label for _, label in expected] == [5, 4, 3, 2, 1, 0]
    assert data.class_names[4] == "Pushing something from left to right"

    # a webm whose frame k is gray 20k: the test clip of 4 frames is frames 1, 3, 5, 8 (the hand case below)
    gray_video(ssv2_root / "gray.webm", [20 * k for k in range(10)])
    reader = SomethingSomethingV2DataModule(root=str(ssv2_root), num_classes=6, frame_uniform=True, num_test_clips=1,
                                            clip_len=4, eval_short_side=32)
    (clip,) = reader.eval_set([]).clips(str(ssv2_root / "gray.webm"))
    np.testing.assert_allclose(clip.float().mean(dim=(1, 2, 3)).numpy(), [20, 60, 100, 160], atol=2)

    with pytest.raises(ConfigError, match="set data.num_test_clips=1"):
        SomethingSomethingV2DataModule(root=str(ssv2_root), num_classes=6, frame_uniform=True, num_test_clips=2).check()
    with pytest.raises(ConfigError, match="set data.num_classes=6"):
        SomethingSomethingV2DataModule(root=str(ssv2_root), frame_uniform=True, num_test_clips=1).check()


def test_uniform_sampling_takes_one_frame_per_segment_as_video_swin():
    """Video Swin's get_seq_frames, by hand: 10 frames, 4 segments of (10 - 1) / 4 = 2.25: bounds round(2.25 i) =
    0, 2, 4 (4.5 to even), 7, 9; test frames the middles (0+2)//2, (2+4)//2, (4+7)//2, (7+9)//2; training draws
    within each segment, both ends included."""
    from vtrain.tasks.video.clips import uniform_clip_indices

    assert uniform_clip_indices(10, 4, None).tolist() == [1, 3, 5, 8]
    draws = np.stack([uniform_clip_indices(10, 4, np.random.default_rng(s)) for s in range(200)])
    assert [sorted(set(draws[:, i].tolist())) for i in range(4)] == [[0, 1, 2], [2, 3, 4], [4, 5, 6, 7], [7, 8, 9]]
    # a short video repeats frames: 3 frames, segments of 0.5, bounds 0, 0 (0.5 to even), 1, 2 (1.5 to even), 2
    assert uniform_clip_indices(3, 4, None).tolist() == [0, 0, 1, 2]


@pytest.mark.usefixtures("one_thread")
def test_ssv2_trains_a_step_with_its_augmentation(ssv2_root, tmp_path):
    """The ssv2 data config (uniform sampling, no flip, RandAugment, random erasing) through a tiny I3D, in-process."""
    import pytorch_lightning as pl

    cfg = compose("experiment=quickstart_video", "data=ssv2", f"data.root={ssv2_root}", "data.num_classes=6",
                  "data.num_test_clips=1",
                  "data.clip_len=8", "data.train_short_side=32", "data.crop_size=32", "data.eval_short_side=32",
                  "data.eval_crop_size=32", "data.random_erasing=1.0", "data.batch_size=2", "data.val_batch_size=2",
                  "data.num_workers=0", "data.persistent_workers=false", f"output_dir={tmp_path}")
    data = instantiate(cfg.data)
    data.check()
    data.setup("fit")
    clip = data.train_set[0]["clips"]
    # erased with probability 1: one rectangle of zeros, the same in every frame
    zero = (clip == 0).all(dim=0)
    assert zero.any() and (zero == zero[0]).all()
    task = build_task(cfg)
    before = {k: v.clone() for k, v in task.backbone.state_dict().items() if v.is_floating_point()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=data)
    assert any(not torch.equal(v, before[k]) for k, v in task.backbone.state_dict().items() if k in before)
    assert next(iter(data.val_dataloader())).batch["clips"].shape == (2, 1, 3, 8, 32, 32)  # 1 clip x 1 crop
