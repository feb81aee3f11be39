"""Decode heads: backbone feature maps (strides 4/8/16/32) -> per-pixel class logits at a feature stride.

The layouts are mmsegmentation's (the reference of the seed papers' ADE20K numbers), so a result here is
comparable with theirs:

* ``UperNetHead``: Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018, Sec. 3 /
  Fig. 3: a pyramid pooling module on the last stage, an FPN on the others, all levels resized to
  stride 4 and fused. mmseg ``UPerHead``; the Swin paper's ADE20K head (Sec. 4.3, Table 3).
* ``FCNHead``: convs on one stage, the input concatenated back, a classifier (mmseg ``FCNHead``). With a
  ``context`` block between its two convs it is mmseg's ``NLHead`` / ``GCHead`` / ``DNLHead``, the heads
  with which the GCNet and DNL papers report their segmentation results; with one conv and no
  concatenation it is the auxiliary head on stage 3 (loss weight 0.4, PSPNet's deep supervision).
* ``SETRUpHead``, ``SETRMLAHead`` with the ``MLANeck``: SETR's decoders (Zheng et al., CVPR 2021, Sec. 3.3, Fig. 1(b)
  and (c)) on a ViT's block outputs, as mmseg 0.x's ``SETRUPHead`` (naive: one conv and a 4x up-sampling; PUP:
  four conv + 2x up-sampling steps), ``SETRMLAHead`` and ``MLANeck``. The neck feeds the decode and the auxiliary
  heads alike, so it is the task's (``task.neck``), as in mmseg's ``EncoderDecoder``.

Every head names in ``out_indices`` the backbone levels it reads (0..3: strides 4..32; mmseg's name), a config
value the task reads before it builds the backbone with those levels (:func:`head_out_indices`). The task then
passes ``in_channels`` and, in ``forward``, the features, both keyed by level; the config gives the rest. Convs are conv -> BatchNorm -> ReLU (SyncBN under DDP comes from
``trainer.sync_batchnorm``); the classifier is dropout (``Dropout2d``, 0.1) then a 1x1 conv.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import Conv2dNormActivation

from vtrain.config import ConfigError


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (mmseg's setting for ADE20K)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(Conv2dNormActivation):
    """mmcv ``ConvModule`` with BN and ReLU (torchvision's ``Conv2dNormActivation``: bias-free conv, "same"
    padding), with mmcv's Kaiming-normal (fan_out) init of the conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


def head_out_indices(head: Mapping) -> tuple[int, ...]:
    """The backbone levels a head config reads (its ``out_indices``), known before anything is built."""
    if not isinstance(head, Mapping):
        raise ConfigError(f"a decode head is a config, not {head!r}: pick one with task/head=<name> "
                          "(upernet, fcn, nl, gc, dnl, fcn_hr48, hrnet_nl, hrnet_dnl, setr_naive, setr_pup, setr_mla: "
                          "the files of conf/task/head/)")
    if head.get("out_indices") is None:
        raise ConfigError(f"head {head.get('_target_')} has no out_indices: name the backbone levels it reads "
                          "(0..3 = strides 4..32), e.g. out_indices: [0, 1, 2, 3]")
    index = head["out_indices"]
    return (int(index),) if isinstance(index, int) else tuple(int(i) for i in index)


class DecodeHead(nn.Module):
    """What every head ends with: ``Dropout2d`` then a 1x1 classifier, initialised N(0, 0.01) as mmseg."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))


class PyramidPoolingModule(nn.Module):
    """PSPNet (Zhao et al., CVPR 2017) Sec. 3.2: average-pool to s x s bins, 1x1 conv, upsample back."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels, 1)) for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[2:]) for stage in self.stages]


class UperNetHead(DecodeHead):
    """UperNet on four backbone stages; logits at the stride of the first one (4).

    Args:
        in_channels: channels of the backbone outputs, by level.
        out_indices: the levels it reads, shallowest first (0, 1, 2, 3): a PPM on the last, an FPN on the others.
        num_classes: classifier outputs.
        channels: width of every lateral / FPN / fusion conv (512 in the paper and mmseg).
        pool_scales: PPM bins on the last stage (1, 2, 3, 6).
        dropout: before the classifier.
    """

    def __init__(
        self,
        in_channels: Mapping[int, int],
        num_classes: int,
        out_indices: Sequence[int],
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.out_indices = tuple(out_indices)
        *lower, top = [in_channels[level] for level in self.out_indices]
        self.ppm = PyramidPoolingModule(top, channels, pool_scales)
        self.ppm_bottleneck = ConvBNReLU(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in lower)
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in lower)
        self.fpn_bottleneck = ConvBNReLU(len(self.out_indices) * channels, channels, 3)

    def forward(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        *lower, top = [features[level] for level in self.out_indices]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, lower)]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size) for x in outs], dim=1))
        return self.classify(fused)


class FCNHead(DecodeHead):
    """Convs on one backbone stage, optionally a context block, the input concatenated back, a classifier.

    ``convs[0] -> context -> convs[1:] -> conv_cat(concat(input, .)) -> classifier``; logits at the stride
    of the chosen stage (8 on a dilated "-D8" ResNet).

    Args:
        in_channels: channels of the backbone outputs, by level.
        num_classes: classifier outputs.
        out_indices: the level it reads (3: C5, the decode head; 2: C4, the auxiliary head), or a list of levels,
            each resized (bilinear) to the first one's size and concatenated: mmseg's
            ``input_transform="resize_concat"``, HRNetV2's representation (HRNet paper Fig. 4(b); ``fcn_hr48``).
        channels: conv width (512 decode, 256 auxiliary).
        num_convs: 3x3 convs before the concatenation (2 decode, 1 auxiliary; 0: the classifier alone, on
            ``channels`` = the input's, SETR-MLA's auxiliary heads).
        concat_input: concatenate the input to the conv output and fuse with one more 3x3 conv.
        dropout: before the classifier.
        context: a callable ``channels -> nn.Module`` (a ``_partial_`` config of a ``vtrain.layers`` block),
            applied after the first conv: NL, GC (ratio 1/4) or DNL as in mmseg's heads.
        cat_channels: width of the conv after the concatenation, which the classifier reads (default
            ``channels``; 512 on ``channels=360`` in the DNL paper's official HRNet head, its ``NLModule``'s
            ``bottleneck``).
    """

    def __init__(
        self,
        in_channels: Mapping[int, int],
        num_classes: int,
        out_indices: int | Sequence[int],
        channels: int = 512,
        num_convs: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
        concat_input: bool = True,
        dropout: float = 0.1,
        context: Callable[[int], nn.Module] | None = None,
        cat_channels: int | None = None,
    ):
        cat_channels = channels if cat_channels is None else cat_channels
        super().__init__(cat_channels if concat_input else channels, num_classes, dropout)
        if num_convs < 0 or (context is not None and num_convs < 2):
            raise ValueError(f"FCNHead needs num_convs >= {2 if context else 0} (got {num_convs})")
        self.out_indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
        source = sum(in_channels[level] for level in self.out_indices)
        if num_convs == 0 and (channels != source or concat_input):
            raise ValueError(f"FCNHead with num_convs=0 classifies its input: channels={channels} must be the input's "
                             f"{source}, and concat_input false")
        self.convs = nn.ModuleList(
            ConvBNReLU(source if i == 0 else channels, channels, kernel_size, dilation) for i in range(num_convs)
        )
        self.context = context(channels) if context is not None else None
        self.conv_cat = ConvBNReLU(source + channels, cat_channels, kernel_size) if concat_input else None

    def forward(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        x = features[self.out_indices[0]]
        if len(self.out_indices) > 1:
            x = torch.cat([x] + [resize(features[level], x.shape[2:]) for level in self.out_indices[1:]], dim=1)
        out = self.convs[0](x) if len(self.convs) else x
        if self.context is not None:
            out = self.context(out)
        for conv in self.convs[1:]:
            out = conv(out)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classify(out)


def upsample(scale: int) -> nn.Upsample:
    """mmseg's ``Upsample`` of the SETR heads: bilinear, ``align_corners=False`` (their configs)."""
    return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)


class SETRUpHead(DecodeHead):
    """SETR-Naive / SETR-PUP (Sec. 3.3): one backbone level (a ViT block's tokens), LayerNorm (eps 1e-6), then
    ``num_convs`` x (conv -> BN -> ReLU -> ``up_scale``x bilinear up-sampling), then the classifier (mmseg 0.x
    ``SETRUPHead``; its auxiliary heads are the same head on other blocks).

    Naive: ``num_convs=1, kernel_size=1, up_scale=4`` (the paper's 1x1 conv + BN + ReLU + 1x1 classifier, the
    rest of the way bilinear); PUP: ``num_convs=4, kernel_size=3, up_scale=2`` (four 2x steps, stride 16 -> 1).

    Args:
        in_channels: channels of the backbone outputs, by level.
        num_classes: classifier outputs.
        out_indices: the level it reads (3: block 23 of ViT-L in SETR's configs; 0..2 the auxiliary heads).
        channels: conv width (256 in mmseg's SETR configs).
        num_convs, kernel_size, up_scale: as above.
        dropout: before the classifier (0 in every SETR config).
    """

    def __init__(self, in_channels: Mapping[int, int], num_classes: int, out_indices: int, channels: int = 256,
                 num_convs: int = 1, kernel_size: int = 1, up_scale: int = 4, dropout: float = 0.0):
        super().__init__(channels, num_classes, dropout)
        if not isinstance(out_indices, int):
            raise ConfigError(f"SETRUpHead reads one backbone level: out_indices={out_indices!r}, give one of 0..3")
        self.out_indices = (out_indices,)
        source = in_channels[out_indices]
        self.norm = LayerNorm2d(source, eps=1e-6)
        self.up_convs = nn.ModuleList(
            nn.Sequential(ConvBNReLU(source if i == 0 else channels, channels, kernel_size), upsample(up_scale))
            for i in range(num_convs)
        )

    def forward(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        x = self.norm(features[self.out_indices[0]])
        for up_conv in self.up_convs:
            x = up_conv(x)
        return self.classify(x)


class MLANeck(nn.Module):
    """SETR's multi-level feature aggregation, its first half (Sec. 3.3, Fig. 1(c); mmseg 0.x ``MLANeck``):
    each level LayerNorm (eps 1e-6) and a 1x1 conv to ``channels``, summed top-down (the deepest level alone,
    then each shallower one added to the running sum), each sum through a 3x3 conv. All levels are at one stride
    (a ViT's patch grid). Convs are conv -> BN -> ReLU (mmseg's SETR-MLA config: SyncBN, ReLU).

    The outputs keep mmseg's order, which runs deepest first: output ``out_indices[0]`` is the 3x3 conv of the
    deepest level's projection alone, output ``out_indices[-1]`` that of the sum of all (mmseg's ``MLAModule``
    zips the deepest-first sums with its convs in order); the decode and auxiliary heads read them so.

    Args:
        in_channels: channels of the backbone outputs, by level.
        out_indices: the backbone levels it reads, shallowest first; its outputs carry the same indices.
        channels: width of every conv (256).
    """

    def __init__(self, in_channels: Mapping[int, int], out_indices: Sequence[int] = (0, 1, 2, 3), channels: int = 256):
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.norm = nn.ModuleList(LayerNorm2d(in_channels[level], eps=1e-6) for level in self.out_indices)
        self.channel_proj = nn.ModuleList(ConvBNReLU(in_channels[level], channels, 1) for level in self.out_indices)
        self.feat_extract = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in self.out_indices)
        self.out_channels = {level: channels for level in self.out_indices}

    def forward(self, features: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        projected = [proj(norm(features[level]))
                     for level, norm, proj in zip(self.out_indices, self.norm, self.channel_proj)]
        sums = [projected[-1]]
        for x in reversed(projected[:-1]):
            sums.append(resize(sums[-1], x.shape[2:]) + x)  # one size on a ViT; a pyramid's levels resized (FPN)
        return {level: conv(x) for level, conv, x in zip(self.out_indices, self.feat_extract, sums)}


class SETRMLAHead(DecodeHead):
    """SETR-MLA's second half (Sec. 3.3, Fig. 1(c); mmseg 0.x ``SETRMLAHead``): on each neck output two 3x3
    conv -> BN -> ReLU and a 4x bilinear up-sampling, the levels concatenated, the classifier.

    Args:
        in_channels: channels of the neck outputs, by level.
        num_classes: classifier outputs.
        out_indices: the levels it reads (0, 1, 2, 3).
        channels: width per level (128, mmseg's ``mla_channels``); the classifier sees ``len(out_indices) x channels``.
        up_scale: the up-sampling of each level (4).
        dropout: before the classifier (0 in the SETR configs).
    """

    def __init__(self, in_channels: Mapping[int, int], num_classes: int, out_indices: Sequence[int] = (0, 1, 2, 3),
                 channels: int = 128, up_scale: int = 4, dropout: float = 0.0):
        super().__init__(len(out_indices) * channels, num_classes, dropout)
        self.out_indices = tuple(out_indices)
        self.up_convs = nn.ModuleList(
            nn.Sequential(ConvBNReLU(in_channels[level], channels, 3), ConvBNReLU(channels, channels, 3),
                          upsample(up_scale))
            for level in self.out_indices
        )

    def forward(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        levels = [up_conv(features[level]) for level, up_conv in zip(self.out_indices, self.up_convs)]
        # one size on a ViT; a pyramid's levels are resized to the largest (the first) before the concatenation
        return self.classify(torch.cat([resize(x, levels[0].shape[2:]) for x in levels], dim=1))


# mmseg segmentor keys -> this task's: its decode head, auxiliary head (a list of them: ``aux_heads``) and neck; a
# ConvModule's ``conv`` / ``bn``
# are torchvision's Conv2dNormActivation ``0`` / ``1``, ``conv_seg`` the classifier, MLANeck's ``mla`` module is the
# neck itself. The backbone's keys are its ``checkpoint_filter``'s.
MMSEG_PARTS = {"decode_head": "head", "auxiliary_head": "aux_head", "neck": "neck"}
MMSEG_NAMES = {"conv": "0", "bn": "1", "conv_seg": "classifier"}


def keys_of_mmseg_segmentor(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmseg segmentor's head, auxiliary-head and neck tensors under this task's keys (SETR's heads and neck,
    the FCN-style heads; the UperNet names differ); other keys (the backbone's) are left out."""
    converted = {}
    for key, value in state_dict.items():
        part, *rest = key.split(".")
        if part not in MMSEG_PARTS:
            continue
        if part == "neck" and rest[:1] == ["mla"]:
            rest = rest[1:]
        name = "aux_heads" if part == "auxiliary_head" and rest[0].isdigit() else MMSEG_PARTS[part]
        converted[".".join([name, *(MMSEG_NAMES.get(n, n) for n in rest)])] = value
    return converted
