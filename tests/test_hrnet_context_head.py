"""The DNL paper's HRNetV2-W48 NL / DNL heads (task/head=hrnet_nl, hrnet_dnl) against its official code, rebuilt
here (DNL-Semantic-Segmentation: model/seg/nets/nonlocalbn_single.py ``NLModule``, model/seg/ops/nonlocal_block.py
``NonLocal2d_bn``, model/seg/loss/ohem_ce_loss.py ``OhemCELoss``), and a tiny HRNet run of the recipe."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from conftest import compose
from vtrain.tasks.segmentation.module import ohem_cross_entropy
from vtrain.training.build import build_task


# ------------------------------------------------------------------------------------ the official code, restated
class NonLocal2d_bn(nn.Module):
    """nonlocal_block.py ``_NonLocalNd_bn`` for 2-D inputs, without downsampling (the HRNet configs'), its
    whiten_type list tested by membership as there."""

    def __init__(self, inplanes, planes, use_out, out_bn, whiten_type, temperature, with_gc):
        super().__init__()
        self.conv_query = nn.Conv2d(inplanes, planes, kernel_size=1)
        self.conv_key = nn.Conv2d(inplanes, planes, kernel_size=1)
        if use_out:
            self.conv_value = nn.Conv2d(inplanes, planes, kernel_size=1)
            self.conv_out = nn.Conv2d(planes, inplanes, kernel_size=1, bias=False)
        else:
            self.conv_value = nn.Conv2d(inplanes, inplanes, kernel_size=1, bias=False)
            self.conv_out = None
        self.out_bn = nn.BatchNorm2d(inplanes) if out_bn else None
        if with_gc:
            self.conv_mask = nn.Conv2d(inplanes, 1, kernel_size=1)
        self.softmax = nn.Softmax(dim=2)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.scale = math.sqrt(planes)
        self.whiten_type, self.temperature, self.with_gc = whiten_type, temperature, with_gc

    def forward(self, x):
        residual = x
        query = self.conv_query(x).view(x.size(0), -1, x.size(2) * x.size(3))
        key = self.conv_key(x).view(x.size(0), -1, x.size(2) * x.size(3))
        value = self.conv_value(x)
        value = value.view(value.size(0), value.size(1), -1)
        if 'channel' in self.whiten_type:
            key = key - key.mean(2).unsqueeze(2)
            query = query - query.mean(2).unsqueeze(2)
        sim_map = torch.bmm(query.transpose(1, 2), key)
        sim_map = sim_map / self.scale
        sim_map = sim_map / self.temperature
        sim_map = self.softmax(sim_map)
        out_sim = torch.bmm(sim_map, value.transpose(1, 2)).transpose(1, 2)
        out_sim = out_sim.reshape(out_sim.size(0), out_sim.size(1), *x.size()[2:])
        out_sim = self.gamma * out_sim
        if self.with_gc:
            mask = self.softmax(self.conv_mask(x).view(x.size(0), 1, -1))
            out_sim = out_sim + torch.bmm(value, mask.permute(0, 2, 1)).unsqueeze(-1)
        if self.conv_out is not None:
            out_sim = self.conv_out(out_sim)
        if self.out_bn:
            out_sim = self.out_bn(out_sim)
        return out_sim + residual


def bn_relu(channels):
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())  # ModuleHelper.BNReLU, norm_type batchnorm


class NLModule(nn.Module):
    """nonlocalbn_single.py ``NLModule`` (``inter_channels = in_channels // 2``; out_channels was 512)."""

    def __init__(self, in_channels, out_channels, num_classes, block):
        super().__init__()
        inter_channels = in_channels // 2
        self.conva = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 3, padding=1, bias=False),
                                   bn_relu(inter_channels))
        self.ctb = NonLocal2d_bn(inter_channels, inter_channels // 2, **block)
        self.convb = nn.Sequential(nn.Conv2d(inter_channels, inter_channels, 3, padding=1, bias=False),
                                   bn_relu(inter_channels))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + inter_channels, out_channels, kernel_size=3, padding=1, dilation=1, bias=False),
            bn_relu(out_channels), nn.Dropout2d(0.1), nn.Conv2d(out_channels, num_classes, kernel_size=1))

    def forward(self, x):
        output = self.convb(self.ctb(self.conva(x)))
        return self.bottleneck(torch.cat([x, output], 1))


# the official configs' "nonlocal" sections: NL_fcn_ade20k_seg.conf, and NLbn_fcn_ade20k_seg_hrnet.conf with the
# whitening its name says ("in_nostd": spatial means, written "channel" in nonlocal_block.py; hrnet_dnl.yaml)
OFFICIAL_BLOCKS = {
    "hrnet_nl": dict(whiten_type=[], temperature=1.0, with_gc=False, use_out=True, out_bn=True),
    "hrnet_dnl": dict(whiten_type=["channel"], temperature=0.1, with_gc=True, use_out=False, out_bn=False),
}
# official name -> vtrain's (a ConvModule-like Sequential: 0 conv, 1 BN)
RENAMES = {"conva.0.": "convs.0.0.", "conva.1.0.": "convs.0.1.", "ctb.": "context.", "convb.0.": "convs.1.0.",
           "convb.1.0.": "convs.1.1.", "bottleneck.0.": "conv_cat.0.", "bottleneck.1.0.": "conv_cat.1.",
           "bottleneck.3.": "classifier."}


def _vtrain_name(key: str) -> str:
    for official, ours in RENAMES.items():
        if key.startswith(official):
            return ours + key[len(official):]
    raise KeyError(key)


@pytest.mark.parametrize("head", sorted(OFFICIAL_BLOCKS))
def test_head_equals_the_official_nlmodule_on_hrnets_concatenated_branches(head):
    """Tiny widths (branches of 2, 4, 6, 8 channels: 20 concatenated, 10 inside, 16 before the classifier), the
    official module's seeded weights (gamma and BN statistics made non-trivial) loaded into vtrain's head."""
    torch.manual_seed(0)
    official = NLModule(20, 16, 5, OFFICIAL_BLOCKS[head])
    with torch.no_grad():
        for module in official.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
        official.ctb.gamma.fill_(0.7)
        for conv in (official.ctb.conv_query, official.ctb.conv_key):  # beyond N(0, 0.01): a softmax far from flat
            conv.weight.normal_(std=0.5)
    cfg = compose("task=segmentation", f"task/head={head}", "task.head.channels=10", "task.head.cat_channels=16")
    ours = instantiate(cfg.task.head, in_channels={0: 2, 1: 4, 2: 6, 3: 8}, num_classes=5)
    ours.load_state_dict({_vtrain_name(k): v for k, v in official.state_dict().items()})
    official.eval(), ours.eval()
    branches = {level: torch.randn(2, c, 12 // 2 ** level, 16 // 2 ** level) for level, c in enumerate((2, 4, 6, 8))}
    # hrnet_backbone.py: the lower-resolution branches up-sampled (bilinear) to branch 0's size and concatenated
    concat = torch.cat([branches[0]] + [F.interpolate(branches[i], size=(12, 16), mode="bilinear",
                                                      align_corners=False) for i in (1, 2, 3)], 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(branches), official(concat), rtol=1e-4, atol=1e-5)


def test_ohem_keeps_the_pixels_below_the_threshold_or_the_min_kept_hardest():
    """One image, two classes, the label's probability at each pixel known; one pixel ignored."""
    probs = torch.tensor([[0.1, 0.3, 0.6], [0.8, 0.95, 0.5]])
    labels = torch.tensor([[[0, 1, 0], [1, 0, 255]]])
    label_logit, other = probs.log(), (1 - probs).log()
    logits = torch.stack([torch.where(labels[0] == 1, other, label_logit),
                          torch.where(labels[0] == 1, label_logit, other)])[None]
    ce = -probs.log()  # each pixel's cross-entropy
    # min_kept 1: the threshold is max(0.7, 2nd smallest 0.3) = 0.7: pixels at 0.1, 0.3, 0.6
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, 255, thresh=0.7, min_kept=1),
                               (ce[0, 0] + ce[0, 1] + ce[0, 2]) / 3)
    # min_kept 4: the 5th smallest of the 5 labelled (0.95) is the threshold: all but it count
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, 255, thresh=0.7, min_kept=4),
                               (ce[0, 0] + ce[0, 1] + ce[0, 2] + ce[1, 0]) / 4)
    # a low thresh and no min_kept: only the hardest
    torch.testing.assert_close(ohem_cross_entropy(logits, labels, 255, thresh=0.2, min_kept=0), ce[0, 0])


@pytest.mark.usefixtures("one_thread")  # HRNet's many small convs stall on busy cores with more threads
def test_dnl_recipe_trains_on_a_tiny_hrnet():
    """dnl_hr48_ade20k's model and loss (OHEM) on timm's small HRNet (hrnet_w18_small), one forward and backward:
    every parameter gets a gradient (what DDP would stop on), and the loss is the OHEM one."""
    torch.manual_seed(0)
    cfg = compose("experiment=dnl_hr48_ade20k", "trainer=cpu", "backbone.variant=hrnet_w18_small", "pretrained=null",
                  "task.head.channels=8", "task.head.cat_channels=16", "task.ohem.min_kept=100", "data.num_classes=6")
    module = build_task(cfg)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32))
    module.train()
    losses = module.losses(images, labels)
    losses["loss"].backward()
    assert set(losses) == {"decode", "loss"}  # no auxiliary head
    assert not [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(ohem_cross_entropy(module(images), labels, 255, thresh=0.7, min_kept=100),
                                   module.losses(images, labels)["decode"])


def test_head_size_on_the_meta_device():
    """The official head on HRNetV2-W48's 48 + 96 + 192 + 384 channels, 150 classes, counted by hand (the paper prints
    no size; with timm's HRNetV2-W48, 65,325,120, the models are 74,140,835 and 74,140,296)."""
    sizes = {}
    for head in ("hrnet_nl", "hrnet_dnl"):
        cfg = compose("task=segmentation", f"task/head={head}")
        with torch.device("meta"):
            module = instantiate(cfg.task.head, in_channels={0: 48, 1: 96, 2: 192, 3: 384}, num_classes=150)
        sizes[head] = sum(p.numel() for p in module.parameters())
    convs = 720 * 360 * 9 + 2 * 360 + 360 * 360 * 9 + 2 * 360 + 1080 * 512 * 9 + 2 * 512 + 512 * 150 + 150
    query_key = 2 * (360 * 180 + 180)
    nl = query_key + (360 * 180 + 180) + 180 * 360 + 2 * 360 + 1  # value to 180, conv_out, out_bn, gamma
    dnl = query_key + 360 * 360 + (360 + 1) + 1  # value 360 -> 360 without bias, conv_mask, gamma
    assert sizes == {"hrnet_nl": convs + nl, "hrnet_dnl": convs + dnl}
