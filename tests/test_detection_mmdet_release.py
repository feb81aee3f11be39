"""mmdetection v2 releases of the R-CNN family (the Swin detection releases, SwinTransformer/Swin-Transformer-Object-
Detection on mmdet 2.11) load through ``pretrained=``: a seeded vtrain model is written in mmdet's layout by an
inverse mapping written here from mmdet's module names (not by the loader's tables), and a differently seeded model
that loads the file gives the same detections."""
from __future__ import annotations

import re

import pytest
import torch

from test_detection_cascade import _cascade
from test_detection_models import TINY_SWIN, _batch, _task
from vtrain.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def relative_position_index(window: int) -> torch.Tensor:
    """The official WindowAttention buffer (a persistent one: the releases hold it, and the loader drops it)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def mmdet_swin_key(key: str) -> str:
    """Swin-Transformer-Object-Detection's ``SwinTransformer``: the patch merging ends stage i (timm: starts stage
    i + 1), the output norms are ``norm<i>``."""
    merging = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
    if merging:
        return f"layers.{int(merging[1]) - 1}.downsample.{merging[2]}"
    return re.sub(r"^out_norms\.(\d)\.", r"norm\1.", key)


PYRAMID_AND_RPN = [  # mmdet's FPN (necks/fpn.py) and RPNHead (dense_heads/rpn_head.py)
    (r"detector\.backbone\.fpn\.inner_blocks\.(\d+)\.0\.", lambda m: f"neck.lateral_convs.{m[1]}.conv."),
    (r"detector\.backbone\.fpn\.layer_blocks\.(\d+)\.0\.", lambda m: f"neck.fpn_convs.{m[1]}.conv."),
    (r"detector\.rpn\.head\.conv\.0\.0\.", lambda m: "rpn_head.rpn_conv."),
    (r"detector\.rpn\.head\.cls_logits\.", lambda m: "rpn_head.rpn_cls."),
    (r"detector\.rpn\.head\.bbox_pred\.", lambda m: "rpn_head.rpn_reg."),
]
CASCADE_HEADS = [  # CascadeRoIHead: a ConvFCBBoxHead (with BatchNorm) and an FCNMaskHead per stage
    # a conv, its BatchNorm, its ReLU: three modules per mmcv ConvModule
    (r"detector\.roi_heads\.stages\.(\d+)\.head\.convs\.(\d+)\.",
     lambda m: f"roi_head.bbox_head.{m[1]}.shared_convs.{int(m[2]) // 3}.{('conv', 'bn')[int(m[2]) % 3]}."),
    (r"detector\.roi_heads\.stages\.(\d+)\.head\.fcs\.(\d+)\.",
     lambda m: f"roi_head.bbox_head.{m[1]}.shared_fcs.{int(m[2]) // 2}."),
    (r"detector\.roi_heads\.stages\.(\d+)\.cls_score\.", lambda m: f"roi_head.bbox_head.{m[1]}.fc_cls."),
    (r"detector\.roi_heads\.stages\.(\d+)\.bbox_pred\.", lambda m: f"roi_head.bbox_head.{m[1]}.fc_reg."),
    (r"detector\.roi_heads\.mask_stages\.(\d+)\.head\.(\d+)\.0\.",
     lambda m: f"roi_head.mask_head.{m[1]}.convs.{m[2]}.conv."),
    (r"detector\.roi_heads\.mask_stages\.(\d+)\.upsample\.", lambda m: f"roi_head.mask_head.{m[1]}.upsample."),
    (r"detector\.roi_heads\.mask_stages\.(\d+)\.logits\.", lambda m: f"roi_head.mask_head.{m[1]}.conv_logits."),
]
MASK_RCNN_HEADS = [  # StandardRoIHead: Shared2FCBBoxHead and FCNMaskHead
    (r"detector\.roi_heads\.box_head\.fc6\.", lambda m: "roi_head.bbox_head.shared_fcs.0."),
    (r"detector\.roi_heads\.box_head\.fc7\.", lambda m: "roi_head.bbox_head.shared_fcs.1."),
    (r"detector\.roi_heads\.box_predictor\.cls_score\.", lambda m: "roi_head.bbox_head.fc_cls."),
    (r"detector\.roi_heads\.box_predictor\.bbox_pred\.", lambda m: "roi_head.bbox_head.fc_reg."),
    (r"detector\.roi_heads\.mask_head\.(\d+)\.0\.", lambda m: f"roi_head.mask_head.convs.{m[1]}.conv."),
    (r"detector\.roi_heads\.mask_predictor\.conv5_mask\.", lambda m: "roi_head.mask_head.upsample."),
    (r"detector\.roi_heads\.mask_predictor\.mask_fcn_logits\.", lambda m: "roi_head.mask_head.conv_logits."),
]
# mmdet's rows: fc_cls has the K categories then the background; a StandardRoIHead's class-specific fc_reg and
# FCNMaskHead's conv_logits have rows for the K categories only (torchvision's first rows are the background's)
MMDET_ROWS = [
    (r"roi_head\.bbox_head\.(\d+\.)?fc_cls\.", lambda v: torch.cat([v[1:], v[:1]])),
    (r"roi_head\.bbox_head\.fc_reg\.", lambda v: v[4:]),
    (r"roi_head\.mask_head\.conv_logits\.", lambda v: v[1:]),
]


def mmdet_key(key: str, rules) -> str:
    for pattern, name in rules:
        found = re.match(pattern, key)
        if found:
            return name(found) + key[found.end():]
    raise AssertionError(f"no mmdet name for {key}")


def mmdet_release(task, head_rules) -> dict:
    """``{'state_dict': ...}`` as mmdet's ``save_checkpoint`` writes it, from ``task``'s tensors."""
    state_dict = {}
    for key, value in task.state_dict().items():
        if key.startswith("backbone."):
            state_dict["backbone." + mmdet_swin_key(key[len("backbone."):])] = value
            if key.endswith("relative_position_bias_table"):
                window = (int(value.shape[0] ** 0.5) + 1) // 2
                state_dict[f"backbone.{mmdet_swin_key(key[9:-29])}.relative_position_index"] = \
                    relative_position_index(window)
            continue
        name = mmdet_key(key, PYRAMID_AND_RPN + head_rules)
        for pattern, rows in MMDET_ROWS:
            if re.match(pattern, name):
                value = rows(value)
        state_dict[name] = value
    return {"meta": {"mmdet_version": "2.11.0"}, "state_dict": state_dict}


def with_batch_norm_statistics(task):
    """Statistics that are not the initial ones, to see them loaded."""
    for module in task.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return task


def assert_same_detections(source, loaded):
    """The same boxes, scores, labels and masks, to the bit, from both models in evaluation (some detections)."""
    images, _ = _batch()
    with torch.no_grad():
        expected, got = source.eval()(images), loaded.eval()(images)
    assert sum(len(e["boxes"]) for e in expected) > 0
    for e, g in zip(expected, got):
        assert set(g) == {"boxes", "scores", "labels", "masks"}
        for k in e:
            assert torch.equal(g[k], e[k]), k


def test_a_cascade_release_in_mmdets_layout_loads_and_gives_the_same_detections(tmp_path):
    """Every tensor of the file is placed and every tensor of the model comes from it (a strict load), and the
    boxes, scores, labels and masks are those of the model that wrote it; a file with one key renamed is refused
    with one line naming that key; a file of backbone weights loads into the backbone, as before."""
    torch.manual_seed(0)
    source = with_batch_norm_statistics(_cascade())
    release = mmdet_release(source, CASCADE_HEADS)
    assert "backbone.layers.0.downsample.reduction.weight" in release["state_dict"]
    assert "roi_head.bbox_head.2.shared_convs.3.bn.running_var" in release["state_dict"]
    path = tmp_path / "cascade_mask_rcnn_swin.pth"
    torch.save(release, path)
    torch.manual_seed(1)
    loaded = _cascade()
    loaded.load_pretrained(str(path))  # what pretrained= / ckpt_path= call
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert_same_detections(source, loaded)

    renamed = dict(release["state_dict"])
    renamed["roi_head.bbox_head.1.fc_klass.weight"] = renamed.pop("roi_head.bbox_head.1.fc_cls.weight")
    torch.save({"state_dict": renamed}, path)
    other = _cascade()
    with pytest.raises(ConfigError, match=r"^[^\n]*roi_head\.bbox_head\.1\.fc_klass\.weight[^\n]*$"):
        other.load_pretrained(str(path))
    # a file of backbone weights is still one: here the release's backbone alone, in the official Swin layout
    backbone = {k[len("backbone."):]: v for k, v in release["state_dict"].items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, path)
    other.load_pretrained(str(path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(other.backbone.state_dict()[key], value), key


def test_a_mask_rcnn_release_in_mmdets_layout_loads_and_gives_the_same_detections(tmp_path):
    """The same for Mask R-CNN (mmdet's StandardRoIHead): every tensor placed, the background rows that mmdet's
    box regressor and mask logits do not have are zeros, and the detections are the writer's (those rows are
    never read)."""
    torch.manual_seed(0)
    source = _task(TINY_SWIN, "mask_rcnn", "task/detector/rcnn=mmdet")
    path = tmp_path / "mask_rcnn_swin.pth"
    torch.save(mmdet_release(source, MASK_RCNN_HEADS), path)
    torch.manual_seed(1)
    loaded = _task(TINY_SWIN, "mask_rcnn", "task/detector/rcnn=mmdet")
    loaded.load_pretrained(str(path))
    background = {"detector.roi_heads.box_predictor.bbox_pred": 4, "detector.roi_heads.mask_predictor.mask_fcn_logits": 1}
    for key, value in source.state_dict().items():
        rows = background.get(key.rpartition(".")[0], 0)
        got = loaded.state_dict()[key]
        assert torch.equal(got[rows:], value[rows:]) and not got[:rows].any(), key
    assert_same_detections(source, loaded)
