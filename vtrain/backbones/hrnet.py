"""HRNetV2 (Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition", TPAMI 2020) as a
dense backbone: timm's ``HighResolutionNet`` (``timm.create_model("hrnet_w48", features_only=True,
feature_location="")``), whose modules are adopted as this backbone's own so that the keys are timm's and the
official HRNet-Image-Classification release's (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``layer1``,
``transition1..3``, ``stage2..4``).

The four parallel branches at strides 4, 8, 16, 32 (HRNet-W48: 48, 96, 192, 384 channels) are outputs 0..3 of
vtrain's feature contract. HRNetV2's representation, the four branches upsampled to stride 4 and concatenated
(paper Sec. 3, Fig. 4(b); mmseg's ``input_transform="resize_concat"``), is made by the head that reads them
(``FCNHead`` with a list of ``out_indices``), as mmseg's ``fcn_hr48`` configs do. The classification head of the
ImageNet model (``incre_modules``, ``downsamp_modules``, ``final_layer``) is not built: no segmentation head reads it.

Size: HRNet-W48 without that head, 65,325,120 parameters, timm's ``hrnet_w48`` features model with
``feature_location=""`` (= the backbone of mmseg's ``fcn_hr48``, which adds its 720-channel FCN head).
"""
from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

from vtrain.backbones.base import OUT_INDICES, Backbone
from vtrain.config import ConfigError

# Modules of the ImageNet classifier that no dense head reads (HRNet-Image-Classification's head, timm's
# ``head="classification"``): dropped when a classification checkpoint is loaded.
_CLASSIFIER_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.")


class HRNet(Backbone):
    """HRNetV2 backbone; ``forward`` returns the four branches (strides 4, 8, 16, 32).

    Args:
        variant: timm's HRNet name (``hrnet_w48``; ``hrnet_w18_small`` etc.).
        out_indices: must be all four levels: every branch's last fuse layer feeds only its own output, so a
            subset would leave parameters without a gradient.
        frozen_stages: -1 none; 0 the stem; N the stem and stages 1..N (stage N>1 with the transition before it).
    """

    def __init__(self, variant: str = "hrnet_w48", out_indices: Sequence[int] | None = OUT_INDICES,
                 frozen_stages: int = -1):
        super().__init__()
        if out_indices is None or tuple(sorted(out_indices)) != OUT_INDICES:
            raise ConfigError(f"HRNet gives its four branches together: build it with out_indices=[0, 1, 2, 3] "
                              f"(got {out_indices}); a head may read fewer")
        model = timm.create_model(variant, features_only=True, feature_location="", out_indices=(1, 2, 3, 4))
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "layer1", "transition1", "stage2",
                     "transition2", "stage3", "transition3", "stage4"):
            setattr(self, name, getattr(model, name))
        self.num_features = model.feature_info.channels()[-1]
        self._set_out_indices(out_indices, model.feature_info.channels(), model.feature_info.reduction())
        self.freeze_stages(frozen_stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        branches = self.stage2([t(self.layer1(x)) for t in self.transition1])
        # a transition either keeps a branch (Identity) or makes the next, lower resolution one from the lowest
        for transition, stage in ((self.transition2, self.stage3), (self.transition3, self.stage4)):
            branches = stage([branches[i] if isinstance(t, nn.Identity) else t(branches[-1])
                              for i, t in enumerate(transition)])
        return branches

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stem = [self.conv1, self.bn1, self.conv2, self.bn2]
        stages = [[self.layer1], [self.transition1, self.stage2], [self.transition2, self.stage3],
                  [self.transition3, self.stage4]]
        return stem + [m for stage in stages[: self.frozen_stages] for m in stage]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ConfigError("HRNet has no gradient checkpointing here: set it off for this backbone")

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """timm's and the official ImageNet HRNet checkpoints share keys; ``classifier.*`` is the classifier, the
        modules only it reads (``incre_modules``, ``downsamp_modules``, ``final_layer``) are dropped."""
        state_dict = state_dict.get("state_dict", state_dict)
        backbone, classifier = {}, {}
        for key, value in state_dict.items():
            if key.startswith("classifier."):
                classifier[key[len("classifier."):]] = value
            elif not key.startswith(_CLASSIFIER_HEAD):
                backbone[key] = value
        return backbone, classifier
