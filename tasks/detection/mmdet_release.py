"""mmdetection v2's R-CNN checkpoints under vtrain's keys: the Swin detection releases
(SwinTransformer/Swin-Transformer-Object-Detection, mmdet 2.11: ``mask_rcnn_swin_*.pth``,
``cascade_mask_rcnn_swin_*.pth``), ``{'state_dict': ...}`` with mmdet's module names.

A detector says where each mmdet module of its heads sits in vtrain's (a map of module prefixes, e.g.
``roi_head.bbox_head.0.fc_cls`` -> ``detector.roi_heads.stages.0.cls_score``) and how rows are reordered where the
two layouts differ; the pyramid and the RPN are the same in every R-CNN (:func:`pyramid_and_rpn_names`), and the
``backbone.*`` part goes through the backbone's own ``checkpoint_filter`` (Swin's reads mmdet's Swin layout). Where
the layouts differ (mmdet's names: ``mmdet/models/roi_heads/bbox_heads/bbox_head.py``, ``mask_heads/fcn_mask_head.py``):

* ``fc_cls`` has the background in its last row (mmdet: labels 0..K-1, K the background); vtrain, as torchvision,
  in its first (:func:`background_first`);
* the RPN is the same: ``rpn_cls`` one sigmoid logit per anchor (``use_sigmoid=True``), ``rpn_reg`` 4 deltas per
  anchor, anchors per location in the same order (mmdet's ``AnchorGenerator`` with ``scale_major=True``: ratios
  outer, scales inner, as torchvision's ``AnchorGenerator.generate_anchors``), target stds 1 in both.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from vtrain.config import ConfigError
from vtrain.training.checkpoint import load_matching, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

Rows = Callable[[Tensor], Tensor]


def is_mmdet_release(state_dict: Mapping[str, Tensor]) -> bool:
    """An mmdet R-CNN checkpoint: an ``rpn_head`` beside a ``roi_head``."""
    return any(k.startswith("roi_head.") for k in state_dict) and any(k.startswith("rpn_head.") for k in state_dict)


def background_first(rows: Tensor) -> Tensor:
    """mmdet's classifier rows (K categories, then the background) in torchvision's order (background, then K)."""
    return torch.cat([rows[-1:], rows[:-1]])


def with_background_rows(per_row: int) -> Rows:
    """mmdet's rows of K categories with ``per_row`` zero rows put first for the background, which torchvision's
    box regressor and mask predictor have but never read (their outputs are taken for labels 1..K only)."""
    return lambda rows: torch.cat([rows.new_zeros(per_row, *rows.shape[1:]), rows])


def pyramid_and_rpn_names(levels: int) -> dict[str, str]:
    """mmdet's ``FPN`` (``lateral_convs.i.conv``, ``fpn_convs.i.conv``, ``necks/fpn.py``; P6 max-pooled, no
    parameters) and ``RPNHead`` (``rpn_conv``, ``rpn_cls``, ``rpn_reg``, ``dense_heads/rpn_head.py``) in
    :class:`neck.FeaturePyramid` (torchvision's FPN) and torchvision's ``RPNHead``."""
    names = {"rpn_head.rpn_conv": "detector.rpn.head.conv.0.0", "rpn_head.rpn_cls": "detector.rpn.head.cls_logits",
             "rpn_head.rpn_reg": "detector.rpn.head.bbox_pred"}
    for i in range(levels):
        names[f"neck.lateral_convs.{i}.conv"] = f"detector.backbone.fpn.inner_blocks.{i}.0"
        names[f"neck.fpn_convs.{i}.conv"] = f"detector.backbone.fpn.layer_blocks.{i}.0"
    return names


def mask_head_names(mmdet: str, own: str, convs: int, logits: str, upsample: str) -> dict[str, str]:
    """mmdet's ``FCNMaskHead`` (``convs.k.conv``, ``upsample``, ``conv_logits``) on torchvision's ``MaskRCNNHeads``
    (``own.k.0``) and the deconvolution / logits named ``upsample`` / ``logits``."""
    names = {f"{mmdet}.convs.{k}.conv": f"{own}.{k}.0" for k in range(convs)}
    return {**names, f"{mmdet}.upsample": upsample, f"{mmdet}.conv_logits": logits}


def convert_mmdet_state_dict(state_dict: Mapping[str, Tensor], backbone: nn.Module, names: Mapping[str, str],
                             rows: Mapping[str, Rows]) -> tuple[dict[str, Tensor], list[str]]:
    """(the tensors under vtrain's keys, the file's keys no name covers). ``names``: mmdet module prefix -> vtrain
    module prefix; ``rows``: vtrain module prefix -> its rows' reordering. The ``backbone.*`` keys go through the
    backbone's ``checkpoint_filter``."""
    trunk = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    converted = {f"backbone.{k}": v for k, v in backbone.checkpoint_filter(trunk)[0].items()} if trunk else {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        prefix, _, leaf = key.rpartition(".")
        if prefix not in names:
            unknown.append(key)
            continue
        reorder = rows.get(names[prefix])
        converted[f"{names[prefix]}.{leaf}"] = reorder(value) if reorder and leaf in ("weight", "bias") else value
    return converted, unknown


def load_mmdet_release(task: nn.Module, path: str, strict: bool, names: Mapping[str, str],
                       rows: Mapping[str, Rows], what: str) -> bool:
    """Load ``path`` into ``task`` and return True if it is an mmdet R-CNN checkpoint (False: not one, e.g.
    backbone weights). Strict: every file key converted and in the model, every model tensor from the file,
    otherwise one line naming the first that does not fit."""
    state_dict = unwrap_state_dict(read_checkpoint(path))
    if not is_mmdet_release(state_dict):
        return False
    converted, unknown = convert_mmdet_state_dict(state_dict, task.backbone, names, rows)
    own = task.state_dict()
    unplaced = [k for k in converted if k not in own]
    if (unknown or unplaced) and strict:
        first = unknown[0] if unknown else f"{unplaced[0]}, as converted"
        raise ConfigError(f"{path}: {len(unknown) + len(unplaced)} tensors of this mmdet checkpoint have no place in "
                          f"the {what} (e.g. {first}): is it of this detector and backbone (mmdet 2.x names)? "
                          "pretrained_strict=false loads the rest")
    if unknown:
        log.warning("%s: %d tensors of this mmdet checkpoint are left out (e.g. %s)", path, len(unknown), unknown[0])
    load_matching(task, converted, str(path), what, strict=strict)
    return True
