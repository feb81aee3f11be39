"""ResNet-50/101 (He et al., CVPR 2016), ResNeXt (Xie et al., CVPR 2017) and the GCNet / NLNet / DNLNet variants.

The network is timm's ``ResNet`` with ``Bottleneck`` blocks (the torchvision / "v1.5"
layout: stride in the 3x3 conv, 7x7 stem), whose modules are adopted as this
backbone's own so that the keys are timm's and torchvision's (``conv1``, ``bn1``,
``layer1..4``; the classifier ``fc`` is split off by ``checkpoint_filter``).

``deep_stem=True`` is ResNetV1c (Bag of Tricks, He et al. 2019, "ResNet-C"; mmseg's ``ResNetV1c``, timm's
``resnet50c``): the 7x7 stem conv becomes three 3x3 convs of 32, 32 and 64 channels, each followed by BN + ReLU
(timm keys ``conv1.0/1/3/4/6`` and ``bn1``). mmseg's R50-D8 models start from its ``resnet50_v1c`` weights,
whose stem keys (``stem.0 .. stem.7``) ``checkpoint_filter`` converts. ResNet-50-C: 25.58M params with a
1000-class classifier, as timm's ``resnet50c``.

Sizes with a 1000-class linear classifier at 224x224 (``vtrain.profiling``):
ResNet-50 25.56M params / 4.09 GMACs, ResNet-101 44.55M / 7.80 GMACs, as the
torchvision/timm references. The ResNet paper's Table 1 gives 3.8 / 7.6 GFLOPs
(multiply-adds) for the original "v1" block with the stride in the first 1x1 conv;
putting the stride in the 3x3 conv (v1.5, used here) costs the extra ~0.3 G.

ResNeXt ("aggregated residual transformations", ``cardinality`` groups in each 3x3 conv of ``base_width`` channels
per group in stage 1, doubling per stage): timm's / torchvision's ``resnext<depth>_<cardinality>x<base_width>d``, the
same layout and keys as mmdet's ``ResNeXt`` (``style='pytorch'``; the group width ``floor(planes * base_width / 64)
* cardinality`` in all three). With a 1000-class classifier: X50-32x4d 25.03M, X101-32x4d 44.18M, X101-64x4d
83.46M params, equal to timm's and torchvision's models.

Context blocks, each a nested config key with ``stages`` (4 bools, c2..c5):

* ``gc`` (GCNet, Sec. 4.1 and Fig. 5): a ``GlobalContextBlock`` in every bottleneck
  of the chosen stages, after conv3/bn3 and before the residual add. timm's
  ``Bottleneck`` calls its attention slot ``se`` exactly there, so the block lives in
  that slot (keys ``layerN.i.se.*``). Default ratio 1/16 in c3-c5: +2.52M params on
  ResNet-50 (GCNet Table 2a: 28.08M vs 25.56M).
* ``nl`` / ``dnl``: a ``NonLocalBlock`` / ``DisentangledNonLocalBlock`` after the
  *output* of chosen bottlenecks (after the residual add and ReLU), the placement of
  mmaction2's ResNet3d ``non_local`` and of the NL paper (Sec. 4, "inserted after
  residual blocks"). ``after_blocks`` lists block indices per chosen stage (negative
  counts from the end); the default ``[-2]`` in c4 is the single block "right before
  the last residual block of c4" that GCNet (Table 2) and DNL (Sec. 5.3) use for
  detection. Keys ``non_local.layerN_i.*`` (so ResNet keys stay untouched).
  ``dnl.pairwise`` / ``dnl.unary`` select DNL's ablation variants (pairwise alone, unary alone, shared key).
* ``snl`` (GCNet Sec. 3.2, Eq. 3), and ``gc`` with ``after_blocks``: a ``SimplifiedNonLocalBlock`` or one
  ``GlobalContextBlock`` placed as ``nl``, GCNet Table 2(a)'s "+1 SNL" / "+1 GC" rows ("right before the last
  residual block of c4", as its "+1 NL"): +1.05M / +0.13M params in c4 (the paper's detectors: 45.4M / 44.5M vs
  44.4M).
* ``se`` (SENet, Hu et al. CVPR 2018; GCNet Table 2(a)'s SE row): timm's ``SEModule`` (reduction 16) in every
  bottleneck of the chosen stages, in the same slot as the GC block: with all four stages, timm's ``seresnet50``
  (28.09M params with a 1000-class classifier).

All of these but ``se`` start as the identity: plain ResNet weights load into these variants and
the new blocks stay at their initialisation. as the identity: plain ResNet weights load into these variants and
the new blocks stay at their initialisation.

Deformable convolution, ``dcn`` (mmdet's ``dcn`` / ``stage_with_dcn``): ``{stages: [4 bools], modulated: bool,
deform_groups: int}`` replaces the 3x3 conv of every bottleneck of the chosen stages (mmdet's ``c3-c5``:
``[false, true, true, true]``; strided ones too, mmdet's ``fallback_on_stride=False``) by a
:class:`~vtrain.layers.deform_conv.DeformableConv2d` (v1, or v2 with ``modulated: true``). Its weight keeps the
conv's key, so plain ResNet weights load; its offset conv (``conv2.conv_offset.*``, mmdet's key) starts at zero.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from timm.layers import SEModule
from timm.models.resnet import Bottleneck
from timm.models.resnet import ResNet as TimmResNet
from torch import nn
from torch.utils.checkpoint import checkpoint

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError
from vtrain.layers.deform_conv import DeformableConv2d
from vtrain.layers.global_context import GlobalContextBlock, SimplifiedNonLocalBlock
from vtrain.layers.non_local import DisentangledNonLocalBlock, NonLocalBlock

# bottlenecks per stage for each depth (also the I3D ResNets' in tasks/video)
DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def after_block_names(stages: Sequence[bool], after_blocks: Sequence[int], depths: Sequence[int]) -> list[str]:
    """Where a relation block goes: ``layer<stage>_<block>`` for each enabled stage and each index of
    ``after_blocks`` (negative from the end; out-of-range indices skipped), e.g. the NL paper's c4 blocks 1, 3, 5.
    ``after_blocks`` may instead hold one list per stage, where stages differ (the NL paper's R101: c3 blocks 1, 3
    and c4 blocks 6, 13, 20)."""
    per_stage = [list(b) for b in after_blocks] if after_blocks and not isinstance(after_blocks[0], int) else None
    if per_stage is not None and len(per_stage) != len(depths):
        raise ConfigError(f"after_blocks has {len(per_stage)} lists: give one per stage ({len(depths)}) or one list of ints")
    names = []
    for stage_index, (enabled, depth) in enumerate(zip(stages, depths)):
        if not enabled:
            continue
        wanted = after_blocks if per_stage is None else per_stage[stage_index]
        indices = sorted({i % depth for i in wanted if -depth <= i < depth})
        names += [f"layer{stage_index + 1}_{i}" for i in indices]
    return names


def non_local_blocks(nl: Mapping | None, dnl: Mapping | None, depths: Sequence[int], out_channels: Sequence[int],
                     dim: int = 2, snl: Mapping | None = None, gc: Mapping | None = None) -> nn.ModuleDict:
    """``NonLocalBlock`` / ``DisentangledNonLocalBlock`` / ``SimplifiedNonLocalBlock`` / ``GlobalContextBlock`` by
    the bottleneck whose output they take (``{"layer3_4": block}``), from ``{stages: [4 bools], after_blocks: [ints],
    ...}`` options whose other keys (``reduction``, ``temperature``, ``pairwise``, ``unary``, ``sub_sample``,
    ``use_scale``, ``ratio``) go to the block. ``dim=3``: the I3D ResNet's."""
    blocks = nn.ModuleDict()
    kinds = (("nl", nl, NonLocalBlock), ("dnl", dnl, DisentangledNonLocalBlock), ("snl", snl, SimplifiedNonLocalBlock),
             ("gc", gc, GlobalContextBlock))
    for kind, options, block_type in kinds:
        if options is None:
            continue
        kwargs = {k: v for k, v in options.items() if k not in ("stages", "after_blocks")}
        known = [p for p in inspect.signature(block_type).parameters if p not in ("channels", "dim")]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ConfigError(f"{kind} has no option {', '.join(unknown)}: its options are stages, after_blocks, "
                              f"{', '.join(known)}")
        for name in after_block_names(options["stages"], options.get("after_blocks", [-2]), depths):
            if name in blocks:
                raise ConfigError(f"{kind} asks for a block after {name}, where another relation block is: "
                                  "choose other stages or after_blocks")
            blocks[name] = block_type(out_channels[int(name[5]) - 1], dim=dim, **kwargs)
    return blocks


class ResNet(Backbone):
    """ResNet backbone; ``forward`` returns C2..C5.

    Args:
        depth: 50, 101 (or 26, 152).
        layers: bottlenecks per stage, in place of ``depth``'s (:data:`DEPTHS`): SAN's ResNet-26 is
            ``[1, 2, 4, 1]`` and ResNet-38 ``[2, 3, 5, 2]`` (Zhao et al., CVPR 2020, Table 1), not timm's
            ResNet-26 (2-2-2-2). None: ``DEPTHS[depth]``.
        drop_path_rate: stochastic depth, linearly increasing over blocks (timm).
        output_stride: 32, 16 or 8. At 8 (the "-D8" segmentation variant), stages 3
            and 4 keep stride 1 and use dilation 2 and 4 (timm's dilation rule, as
            mmseg's ``strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)``; the first block of
            a dilated stage keeps the previous dilation, as torchvision's
            ``replace_stride_with_dilation`` and mmseg's ``contract_dilation``); the stem is
            unchanged. ``feature_info`` reports the real strides.
        frozen_stages: -1 none; 0 the stem; N the stem and stages 1..N (mmdet): their
            parameters stop requiring grad and their BatchNorms stay in eval mode.
        gc: ``{stages: [4 bools], ratio: float}`` (in every bottleneck), ``{..., after_blocks: [ints]}``
            (after the chosen bottlenecks, as ``nl``) or None.
        snl: GCNet's simplified NL block, placed as ``nl``: ``{stages: [4 bools], after_blocks: [ints]}`` or None.
        se: ``{stages: [4 bools]}``: timm's ``SEModule`` (reduction 16) in every bottleneck of those stages, or None.
        nl: ``{stages: [4 bools], after_blocks: [ints], reduction: int}`` (optionally ``sub_sample``,
            ``use_scale``: ``NonLocalBlock``'s) or None.
        dnl: like ``nl`` plus ``temperature``, ``pairwise`` and ``unary`` (DNL's ablation variants).
        dcn: ``{stages: [4 bools], modulated: bool, deform_groups: int}`` or None (the module doc).
        out_indices: the levels ``forward`` returns (``base.Backbone``); None: a classifier's trunk. Stages
            past the deepest level are not built.
        base_width: inner width of the stage-1 bottleneck per group, doubling per stage
            (timm's ``base_width``): 64 gives ResNet's 64/128/256/512, LR-Net uses 100, ResNeXt 4.
        cardinality: groups of the 3x3 convs (ResNeXt's; 1: ResNet).
        deep_stem: the ResNetV1c stem of three 3x3 convs (32, 32, 64 channels) instead of the 7x7 conv.
        zero_init_last: start each bottleneck's last BN at weight 0, so that every residual block starts as the
            identity (timm's default, Goyal et al. 2017); torchvision's ``resnet50()`` and its classification
            reference leave it at 1 (``zero_init_residual=False``). Pretrained weights overwrite it either way.
    """

    def __init__(
        self,
        depth: int = 50,
        drop_path_rate: float = 0.0,
        output_stride: int = 32,
        frozen_stages: int = -1,
        gc: Mapping | None = None,
        nl: Mapping | None = None,
        snl: Mapping | None = None,
        se: Mapping | None = None,
        dnl: Mapping | None = None,
        dcn: Mapping | None = None,
        out_indices: Sequence[int] | None = None,
        base_width: int = 64,
        cardinality: int = 1,
        deep_stem: bool = False,
        zero_init_last: bool = True,
        layers: Sequence[int] | None = None,
    ):
        super().__init__()
        depths = tuple(int(n) for n in layers) if layers is not None else DEPTHS[depth]
        if len(depths) != 4 or min(depths) < 1:
            raise ConfigError(f"backbone.layers={list(depths)}: give 4 bottleneck counts of at least 1, one per stage "
                              "(SAN's ResNet-26: [1, 2, 4, 1])")
        resnet = TimmResNet(
            block=Bottleneck,
            layers=depths,
            base_width=base_width,
            cardinality=cardinality,
            num_classes=0,
            output_stride=output_stride,
            drop_path_rate=drop_path_rate,
            stem_type="deep" if deep_stem else "",
            stem_width=32 if deep_stem else 64,
            zero_init_last=zero_init_last,
        )
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        channels = [stage[-1].conv3.out_channels for stage in self.stages]
        self.num_features = channels[-1]
        self._set_out_indices(out_indices, channels, [min(4 * 2**i, output_stride) for i in range(4)])

        # In every bottleneck's attention slot (timm's ``se``, after bn3 and before the residual add): GC blocks
        # without ``after_blocks``, SE modules. With ``after_blocks``, GC blocks go after whole bottlenecks below.
        gc_in_blocks = gc is not None and "after_blocks" not in gc
        if gc_in_blocks and se is not None:
            raise ConfigError("gc (without after_blocks) and se both fill each bottleneck's attention slot: "
                              "choose one, or place the GC blocks with gc.after_blocks")
        if se is not None and sorted(se) != ["stages"]:
            raise ConfigError(f"se has no option {', '.join(sorted(set(se) - {'stages'}))}: its option is stages")
        if gc_in_blocks:
            ratio = gc.get("ratio", 1 / 16)
            self._fill_attention_slots(gc["stages"], channels, lambda width: GlobalContextBlock(width, ratio))
        if se is not None:
            # timm's SEModule defaults (rd_ratio 1/16, ReLU, sigmoid gate) are seresnet50's
            self._fill_attention_slots(se["stages"], channels, SEModule)

        if dcn is not None:
            unknown = sorted(set(dcn) - {"stages", "modulated", "deform_groups"})
            if unknown:
                raise ConfigError(f"dcn has no option {', '.join(unknown)}: its options are stages, modulated, "
                                  "deform_groups")
            for enabled, stage in zip(dcn["stages"], self.stages):
                if enabled:
                    for block in stage:
                        block.conv2 = DeformableConv2d.from_conv(block.conv2, int(dcn.get("deform_groups", 1)),
                                                                 bool(dcn.get("modulated", False)))

        # Blocks applied after a whole bottleneck: {"layer3_4": block}.
        self.non_local = non_local_blocks(nl, dnl, depths, channels, snl=snl, gc=None if gc_in_blocks else gc)
        self._prune_stages()

        self.freeze_stages(frozen_stages)

    def _fill_attention_slots(self, stages: Sequence[bool], channels: Sequence[int], make) -> None:
        for enabled, stage, width in zip(stages, self.stages, channels):
            if enabled:
                for block in stage:
                    block.se = make(width)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(4) if hasattr(self, f"layer{i + 1}")]

    def _prune_stages(self) -> None:
        """Drop the stages (and their non-local blocks) past the deepest requested level: no output needs them."""
        for index in range(self.num_stages, 4):
            delattr(self, f"layer{index + 1}")
            for name in [name for name in self.non_local if int(name[5]) == index + 1]:
                del self.non_local[name]

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.conv1, self.bn1]
        modules += self.stages[: self.frozen_stages]
        modules += [m for name, m in self.non_local.items() if int(name[5]) <= self.frozen_stages]
        return modules

    def run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` (0 = C2's) with its non-local blocks on ``x``: also what the C4 detector runs its stage 5 on
        each RoI with (``tasks/detection/c4.py``)."""
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block_index, block in enumerate(self.stages[index]):
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
            name = f"layer{index + 1}_{block_index}"
            if name in self.non_local:
                x = self.non_local[name](x)
        return x

    def init_only(self, key: str) -> bool:
        # GC blocks, NL / DNL blocks, deformable convs' offsets
        return ".se." in key or key.startswith("non_local.") or ".conv_offset." in key

    def _stage_outputs(self, x: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        outputs = []
        for index in range(len(self.stages) if num_stages is None else num_stages):
            x = self.run_stage(index, x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self._require_out_indices()
        outputs = self._stage_outputs(x)
        return [outputs[level] for level in levels]

    def forward_level(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Output ``level`` alone, the stages past it not run (the C4 detector's trunk: its stage 5 runs on RoIs)."""
        return self._stage_outputs(x, level + 1)[-1]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self._stage_outputs(x)[-1].mean(dim=(2, 3))

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """timm and torchvision ResNet checkpoints share keys; ``fc.*`` is the classifier. mmseg / mmcv ResNetV1c
        checkpoints (``open-mmlab://resnet50_v1c``: ``stem.0 .. stem.7``, otherwise torchvision's keys) get timm's
        stem keys."""
        state_dict = state_dict.get("state_dict", state_dict)
        backbone, classifier = {}, {}
        for key, value in state_dict.items():
            if key.startswith("fc."):
                classifier[key[len("fc."):]] = value
            else:
                backbone[_timm_stem_key(key)] = value
        return backbone, classifier


# mmseg's ResNetV1c stem (nn.Sequential of conv, BN, ReLU x 3) -> timm's deep stem (conv1 = the first 7 modules,
# bn1 the last BN): stem.<index>. -> <timm module>.
_MMSEG_STEM = {"0": "conv1.0.", "1": "conv1.1.", "3": "conv1.3.", "4": "conv1.4.", "6": "conv1.6.", "7": "bn1."}


def _timm_stem_key(key: str) -> str:
    """``stem.7.running_mean`` -> ``bn1.running_mean``; any other key unchanged."""
    if not key.startswith("stem."):
        return key
    _, index, rest = key.split(".", 2)
    return _MMSEG_STEM[index] + rest
