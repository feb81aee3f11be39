"""I3D ResNet (Carreira & Zisserman, CVPR 2017) with non-local (Wang et al., CVPR 2018) or
disentangled non-local (Yin et al., ECCV 2020) blocks over T x H x W.

The ResNet-50 of the NL paper (Sec. 4, Table 1) inflated to 3D as its "I3D_3x1x1" and as
SlowFast's / mmaction2's ``I3D`` ResNet-50: the stem conv is 5x7x7, and the first 1x1 conv of
every other bottleneck becomes 3x1x1 (``inflate`` per stage, default c2: all, c3: 1,0,1,0,
c4: 1,0,1,0,1,0, c5: 0,1,0); every spatial conv stays 1x3x3. Module names and shapes are
torchvision's / timm's ResNet ones (``conv1``, ``bn1``, ``layerN.i.conv1..3``, ``bn1..3``,
``downsample.0/1``), so ``checkpoint_filter`` inflates a 2D ImageNet ResNet-50 checkpoint key
by key (I3D Sec. 2.3: each kernel repeated over time and divided by its length).

Temporal strides (``conv1_stride_t``, ``pool1_stride_t``, ``pool2_stride_t``; ``pool2`` is a
2x1x1 max pool after c2, as the NL paper's Table 1) choose how much time the network keeps;
the 8x8 I3D of SlowFast's model zoo (8 frames, stride 8) uses 1, 1, 2.

``nl`` / ``dnl`` place ``vtrain.layers`` blocks in 3D mode (``dim=3``, attention over all
T*H*W positions) after the *output* of chosen bottlenecks, with the same keys as the 2D
``vtrain.backbones.ResNet`` (``non_local.layerN_i``): ``{stages: [4 bools], after_blocks:
[ints], reduction}``. The NL paper's 5-block I3D (Table 2b) is c3 blocks 1, 3 and c4 blocks
1, 3, 5 (``after_blocks: [1, 3, 5]`` in c3 and c4). The blocks start as the identity.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from vtrain.tasks.video.models.base import VideoBackbone
from vtrain.tasks.video.models.inflation import inflate_state_dict

from vtrain.backbones.resnet import DEPTHS, non_local_blocks

I3D_INFLATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))


class Bottleneck3d(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride in the 3x3 conv) in 3D; ``temporal_kernel``
    is the time extent of the first 1x1 conv (3 where inflated, else 1)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, temporal_kernel: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv3d(in_channels, width, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False), nn.BatchNorm3d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)) + shortcut)


class I3DResNet(VideoBackbone):
    """I3D ResNet-50/101; ``forward`` returns the C5 map (N, 2048, T', H/32, W/32).

    Args:
        depth: 50, or 101 with an ``inflate`` of 3-4-23-3 entries.
        base_channels: stem width; stage i is ``base_channels * 2**i`` wide (x4 out). 64 is ResNet-50; smaller
            values give the micro model of CPU runs (no 2D checkpoint fits those).
        inflate: per stage, per block, 1 where the first 1x1 conv becomes 3x1x1.
        conv1_temporal_kernel: time extent of the 7x7 stem conv (5 in I3D).
        conv1_stride_t, pool1_stride_t, pool2_stride_t: temporal strides of the stem conv, the stem
            max pool and the 2x1x1 max pool after c2 (1 switches a pool's temporal effect off).
        pool1_temporal_kernel: time extent of the stem max pool; default 3 where it strides in time (the NL
            paper's), else 1. mmaction2's I3D strides by 2 with extent 1.
        nl, dnl: ``NonLocalBlock`` / ``DisentangledNonLocalBlock`` placement (module doc), or None.
    """

    def __init__(
        self,
        depth: int = 50,
        base_channels: int = 64,
        inflate: Sequence[Sequence[int]] = I3D_INFLATE,
        conv1_temporal_kernel: int = 5,
        conv1_stride_t: int = 1,
        pool1_stride_t: int = 1,
        pool2_stride_t: int = 2,
        pool1_temporal_kernel: int | None = None,
        nl: Mapping | None = None,
        dnl: Mapping | None = None,
    ):
        super().__init__()
        depths = DEPTHS[depth]
        if [len(s) for s in inflate] != list(depths):
            raise ValueError(f"inflate needs {list(depths)} entries per stage, got {[len(s) for s in inflate]}")
        kt = conv1_temporal_kernel
        self.conv1 = nn.Conv3d(3, base_channels, (kt, 7, 7), stride=(conv1_stride_t, 2, 2), padding=(kt // 2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(base_channels)
        self.act1 = nn.ReLU(inplace=True)
        pool1_t = pool1_temporal_kernel or (3 if pool1_stride_t > 1 else 1)
        self.maxpool = nn.MaxPool3d((pool1_t, 3, 3), stride=(pool1_stride_t, 2, 2), padding=(pool1_t // 2, 1, 1))
        self.pool2 = nn.MaxPool3d((pool2_stride_t, 1, 1), stride=(pool2_stride_t, 1, 1)) if pool2_stride_t > 1 else nn.Identity()
        in_channels, stages = base_channels, []
        for index, (blocks, inflated) in enumerate(zip(depths, inflate)):
            width = base_channels * 2**index
            stage = []
            for b in range(blocks):
                stride = 2 if (b == 0 and index > 0) else 1
                stage.append(Bottleneck3d(in_channels, width, stride, temporal_kernel=3 if inflated[b] else 1))
                in_channels = width * Bottleneck3d.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.stages = stages
        self.out_channels = tuple(base_channels * 2**i * Bottleneck3d.expansion for i in range(4))
        self.num_features = self.out_channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        self.non_local = non_local_blocks(nl, dnl, depths, self.out_channels, dim=3)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(clips))))
        for index, stage in enumerate(self.stages):
            for block_index, block in enumerate(stage):
                x = block(x)
                name = f"layer{index + 1}_{block_index}"
                if name in self.non_local:
                    x = self.non_local[name](x)
            if index == 0:
                x = self.pool2(x)
        return x

    def forward_pooled(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward(clips).mean(dim=(2, 3, 4))

    def init_only(self, key: str) -> bool:
        return key.startswith("non_local.")  # NL / DNL blocks: identity-initialised, absent from plain ResNets

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """2D ResNet checkpoints (torchvision, timm, this framework's ``ResNet`` incl. its NL blocks) are inflated;
        this backbone's own checkpoints and mmaction2's ``ResNet3d`` ones (I3D, I3D-NL; keys converted) load as
        they are; ``fc.*`` is the classifier."""
        state_dict = state_dict.get("state_dict", state_dict)
        if "conv1.conv.weight" in state_dict:
            state_dict = mmaction2_to_own_keys(state_dict)
        backbone = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        classifier = {k[len("fc."):]: v for k, v in state_dict.items() if k.startswith("fc.")}
        return inflate_state_dict(backbone, self.state_dict()), classifier


# mmaction2's ResNet3d (ConvModule: conv + bn) and NonLocal3d names -> this module's (torchvision's ResNet names)
_MMACTION2_KEYS = (
    (r"^conv1\.conv\.", "conv1."),
    (r"^conv1\.bn\.", "bn1."),
    (r"^(layer\d\.\d+)\.conv(\d)\.conv\.", r"\1.conv\2."),
    (r"^(layer\d\.\d+)\.conv(\d)\.bn\.", r"\1.bn\2."),
    (r"^(layer\d\.\d+)\.downsample\.conv\.", r"\1.downsample.0."),
    (r"^(layer\d\.\d+)\.downsample\.bn\.", r"\1.downsample.1."),
    # with sub_sample, mmcv wraps phi and g with their max pool in a Sequential: phi.0.conv
    (r"^layer(\d)\.(\d+)\.non_local_block\.(theta|phi|g)(?:\.0)?\.conv\.", r"non_local.layer\1_\2.\3."),
    (r"^layer(\d)\.(\d+)\.non_local_block\.conv_out\.conv\.", r"non_local.layer\1_\2.out_conv."),
    (r"^layer(\d)\.(\d+)\.non_local_block\.conv_out\.bn\.", r"non_local.layer\1_\2.out_norm."),
)


def mmaction2_to_own_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmaction2 I3D / I3D-NL backbone state dict (``backbone.`` already stripped) in this module's keys. Its
    NL configs use ``sub_sample=True, use_scale=False``: set the same ``nl`` options to reproduce its outputs."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _MMACTION2_KEYS:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        out[key] = value
    return out
