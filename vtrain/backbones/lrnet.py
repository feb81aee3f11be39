"""LR-Net (Hu, Zhang, Xie, Lin, "Local Relation Networks for Image Recognition",
ICCV 2019), Table 1: a ResNet whose 3x3 convolutions are 7x7 local relation layers.

Built on this package's ``ResNet`` (timm's bottleneck ResNet) with:

* stem: 1x1 conv 3->64 + BN + ReLU, then a 7x7 local relation layer with stride 2
  (64 channels, BN + ReLU after it as after ResNet's 7x7 conv), then the 3x3 max-pool;
* bottleneck inner widths 100/200/400/800 (timm ``base_width=100``), outputs
  256/512/1024/2048 as ResNet, the 3x3 conv replaced by a ``LocalRelation2d`` with
  the same stride (and dilation, for ``output_stride`` < 32);
* LR-Net-26: 2 bottlenecks per stage; LR-Net-50: 3/4/6/3.

Sizes with a 1000-class classifier at 224x224 (``vtrain.profiling``), paper in
brackets: LR-Net-26 14.61M params / 2.42 GMACs (14.7M / 2.6G); LR-Net-50 23.37M /
4.07 GMACs (23.3M / 4.3G). The MACs include the window aggregation (C*k*k per
output position, counted on the zero-padded groups) but not the element-wise
logits and softmax.

Why the counts differ from the paper:

* parameters agree within 0.6% once each local relation layer carries its closing
  1x1 conv (C^2 weights). Without it LR-Net-50 would have about 20.3M and LR-Net-26
  about 12.9M, so the paper's sizes need it; the rest of the gap is the geometry-prior
  MLP width and key/query biases, which the paper does not give;
* MACs are 7% (26) and 5% (50) below the paper because the paper counts the geometric
  prior at every output position. The prior depends only on the offset p' - p, so this
  layer evaluates its MLP once per layer (k*k inputs); a kernel that evaluates it for
  each output position spends k*k * (2*hidden + hidden*C/m) MACs there: 0.127 G (26)
  and 0.228 G (50). With them and the relation logits (C/m * k*k per position, 0.012 G
  and 0.018 G), ``vtrain.tools.table.macs.lrnet_paper_macs`` gives 2.56 G and 4.32 G, the paper's 2.6 G and 4.3 G at
  its precision (``tests/test_backbones.py`` holds both within 2%). Alternatives that
  do not reproduce both figures: the stride in the first 1x1 conv (about 3.6 G /
  2.0 G), a value projection at the input resolution instead of the closing
  projection (about 4.5 G / 2.8 G), the stem's relation layer at full resolution
  (4.34 G / 2.69 G).

No pretrained LR-Net checkpoint exists; ``checkpoint_filter`` is ResNet's.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from vtrain.backbones.resnet import ResNet
from vtrain.layers.local_relation import LocalRelation2d


class LRNet(ResNet):
    """LR-Net backbone; ``forward`` returns C2..C5 like ``ResNet``.

    Args:
        depth: 26 or 50.
        lr: local relation options ``{kernel_size: 7, m: 8, composability:
            squared_difference | dot}``.
        drop_path_rate, output_stride, frozen_stages, out_indices, zero_init_last: as ``ResNet``.
    """

    def __init__(
        self,
        depth: int = 50,
        lr: dict | None = None,
        drop_path_rate: float = 0.0,
        output_stride: int = 32,
        frozen_stages: int = -1,
        out_indices: Sequence[int] | None = None,
        zero_init_last: bool = True,
    ):
        super().__init__(
            depth=depth, drop_path_rate=drop_path_rate, output_stride=output_stride, out_indices=out_indices,
            base_width=100, zero_init_last=zero_init_last,
        )
        lr = dict(lr or {})
        options = dict(
            kernel_size=lr.get("kernel_size", 7), m=lr.get("m", 8),
            composability=lr.get("composability", "squared_difference"),
        )
        stem_width = self.conv1.out_channels
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, kernel_size=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            LocalRelation2d(stem_width, stride=2, **options),
        )
        for stage in self.stages:
            for block in stage:
                conv = block.conv2
                block.conv2 = LocalRelation2d(conv.in_channels, stride=conv.stride[0], dilation=conv.dilation[0], **options)
        for module in self.modules():
            if isinstance(module, LocalRelation2d):
                for conv in (module.key, module.query, module.proj):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.conv1[0].weight, mode="fan_out", nonlinearity="relu")

        self.freeze_stages(frozen_stages)
