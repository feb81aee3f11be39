"""SETR (Zheng et al., CVPR 2021): the naive, PUP and MLA heads (with the MLA neck and the auxiliary heads) against
mmseg 0.x's ``SETRUPHead`` / ``SETRMLAHead`` / ``MLANeck`` / ``FCNHead`` and ViT block outputs, written out below in
mmseg's own module layout (plain torch, tiny widths), loaded into vtrain through the same key mapping a
``pretrained=`` mmseg release goes through; the ViT-L models' sizes at the recipes' crops against mmseg's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose
from vtrain.backbones.vit import VisionTransformer
from vtrain.config import ConfigError
from vtrain.training.build import build_task

CLASSES, SIZE = 5, 64
TINY = ["backbone.embed_dim=32", "backbone.depth=4", "backbone.num_heads=2", f"backbone.img_size={SIZE}",
        "backbone.block_indices=[0,1,2,3]"]


# ------------------------------------------------------------------ mmseg 0.x, re-stated in its layout
class ConvModule(nn.Module):
    """mmcv ConvModule with a norm: bias-free conv ``conv``, BN ``bn``, ReLU."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def token_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """NCHW -> NLC, LayerNorm, back (mmseg SETRUPHead / MLANeck.forward)."""
    n, c, h, w = x.shape
    return norm(x.reshape(n, c, h * w).transpose(2, 1)).transpose(1, 2).reshape(n, c, h, w)


class SETRUPHead(nn.Module):
    def __init__(self, cin, channels, in_index, num_convs, up_scale, kernel_size):
        super().__init__()
        self.in_index, self.norm = in_index, nn.LayerNorm(cin, eps=1e-6)
        self.up_convs = nn.ModuleList(
            nn.Sequential(ConvModule(cin if i == 0 else channels, channels, kernel_size),
                          nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False))
            for i in range(num_convs))
        self.conv_seg = nn.Conv2d(channels, CLASSES, 1)

    def forward(self, inputs):
        x = token_norm(self.norm, inputs[self.in_index])
        for up_conv in self.up_convs:
            x = up_conv(x)
        return self.conv_seg(x)


class MLAModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.channel_proj = nn.ModuleList(ConvModule(cin, cout, 1) for _ in range(4))
        self.feat_extract = nn.ModuleList(ConvModule(cout, cout, 3) for _ in range(4))

    def forward(self, inputs):
        feat_list = [conv(x) for x, conv in zip(inputs, self.channel_proj)][::-1]
        mid_list = []
        for feat in feat_list:
            mid_list.append(feat if not mid_list else mid_list[-1] + feat)
        return tuple(conv(mid) for mid, conv in zip(mid_list, self.feat_extract))


class MLANeck(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.ModuleList(nn.LayerNorm(cin, eps=1e-6) for _ in range(4))
        self.mla = MLAModule(cin, cout)

    def forward(self, inputs):
        return self.mla([token_norm(norm, x) for norm, x in zip(self.norm, inputs)])


class SETRMLAHead(nn.Module):
    def __init__(self, cin, mla_channels, up_scale=4):
        super().__init__()
        self.up_convs = nn.ModuleList(
            nn.Sequential(ConvModule(cin, mla_channels, 3), ConvModule(mla_channels, mla_channels, 3),
                          nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False))
            for _ in range(4))
        self.conv_seg = nn.Conv2d(4 * mla_channels, CLASSES, 1)

    def forward(self, inputs):
        return self.conv_seg(torch.cat([up(x) for x, up in zip(inputs, self.up_convs)], dim=1))


class FCNHead0(nn.Module):
    """mmseg FCNHead(num_convs=0, concat_input=False): the classifier on its input."""

    def __init__(self, cin, in_index):
        super().__init__()
        self.in_index, self.conv_seg = in_index, nn.Conv2d(cin, CLASSES, 1)

    def forward(self, inputs):
        return self.conv_seg(inputs[self.in_index])


def mmseg_setr(head: str, dim: int):
    """(decode head, auxiliary heads, neck) as configs/_base_/models/setr_*.py + the ADE20K configs build them."""
    if head == "naive":
        return SETRUPHead(dim, 16, 3, 1, 4, 1), [SETRUPHead(dim, 16, i, 2, 4, 1) for i in range(3)], None
    if head == "pup":
        return SETRUPHead(dim, 16, 3, 4, 2, 3), [SETRUPHead(dim, 16, i, 2, 4, 3) for i in range(3)], None
    return SETRMLAHead(24, 8), [FCNHead0(24, i) for i in range(4)], MLANeck(dim, 24)


def vit2mmseg(state):
    """mmseg's tools/model_converters/vit2mmseg.py convert_vit (timm keys -> mmseg's ViT)."""
    out = {}
    for k, v in state.items():
        if k.startswith("head"):
            continue
        if k.startswith("norm"):
            k = k.replace("norm.", "ln1.")
        elif k.startswith("patch_embed"):
            k = k.replace("proj", "projection")
        elif k.startswith("blocks"):
            for old, new in (("norm", "ln"), ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1"),
                             ("attn.qkv.", "attn.attn.in_proj_"), ("attn.proj", "attn.attn.out_proj")):
                if old in k:
                    k = k.replace(old, new)
                    break
            k = k.replace("blocks.", "layers.")
        out[k] = v
    return out


def randomize(module: nn.Module) -> None:
    """Every parameter and BN statistic away from its initial value (so a wrong key or order shows)."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.2)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_setr_heads_load_and_equal_mmseg(head, tmp_path):
    torch.manual_seed(0)
    backbone = "vit_l16_setr_mla" if head == "mla" else "vit_l16_setr"
    task = build_task(compose("task=segmentation", "data=ade20k", f"data.num_classes={CLASSES}", f"backbone={backbone}",
                              f"task/head=setr_{head}", *TINY, "task.head.channels=" + ("8" if head == "mla" else "16"),
                              *([f"task.aux_heads.{i}.channels=16" for i in range(3)] if head != "mla" else
                                ["task.neck.channels=24"] + [f"task.aux_heads.{i}.channels=24" for i in range(4)]),
                              "output_dir=/tmp/vtrain-test-setr")).eval()
    decode, aux, neck = mmseg_setr(head, 32)
    mmseg = nn.ModuleDict({"decode_head": decode, "auxiliary_head": nn.ModuleList(aux), **({"neck": neck} if neck else {})})
    timm_vit = VisionTransformer(img_size=SIZE, embed_dim=32, depth=4, num_heads=2)  # a timm-keyed ViT
    randomize(mmseg.eval()), randomize(timm_vit.eval())
    state = {f"backbone.{k}": v for k, v in vit2mmseg(timm_vit.state_dict()).items()} | mmseg.state_dict()
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "setr.pth")
    task.load_pretrained(str(tmp_path / "setr.pth"))  # strict: every tensor of the model comes from the file
    del state["decode_head.conv_seg.bias"]  # a file short of one tensor stops with one line
    torch.save({"state_dict": state}, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match=r"1 of the \d+ segmenter tensors do not come from .*short.pth \(head.classifier.bias\)"):
        task.load_pretrained(str(tmp_path / "short.pth"))

    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        # mmseg ViT(out_indices=(0, 1, 2, 3), final_norm=False): each block's patch tokens; MLA without the class token
        tokens = timm_vit._embedded(x)
        tokens = tokens if head != "mla" else tokens[:, 1:]
        maps = []
        for block in timm_vit.blocks:
            tokens = block(tokens)
            patches = tokens[:, 1:] if head != "mla" else tokens
            maps.append(patches.transpose(1, 2).reshape(2, 32, SIZE // 16, SIZE // 16))
        inputs = neck(maps) if neck else maps
        expected = [F.interpolate(h(inputs), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
                    for h in [decode, *aux]]
        got = task._logits(x, with_aux=True)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_position_table_resized_bilinearly_as_mmseg():
    """mmseg's resize_pos_embed (bilinear, align_corners=False) takes the 384 release's 24x24 table to a 512 crop's
    32x32; here 3x3 -> 4x4, the class token kept."""
    vit = VisionTransformer(img_size=64, embed_dim=8, depth=1, num_heads=2, block_indices=[0, 0, 0, 0],
                            out_indices=[0, 1, 2, 3], pos_embed_interpolation="bilinear")
    table = torch.randn(1, 10, 8)
    grid = table[:, 1:].reshape(1, 3, 3, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    got, _ = vit.checkpoint_filter({"pos_embed": table})
    torch.testing.assert_close(got["pos_embed"], torch.cat([table[:, :1], expected], dim=1))


def vit_l_mmseg_params(img_size: int, final_norm: bool = False) -> int:
    """mmseg 0.x VisionTransformer(embed_dims=1024, num_layers=24, patch 16), by its modules' shapes."""
    d, grid = 1024, (img_size // 16) ** 2
    layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return (3 * 16 * 16 * d + d) + d + (grid + 1) * d + 24 * layer + (2 * d if final_norm else 0)


@pytest.mark.parametrize("experiment, head, size, classes", [
    ("setr_naive_vit_l_ade20k", "naive", 512, 150), ("setr_pup_vit_l_ade20k", "pup", 512, 150),
    ("setr_mla_vit_l_ade20k", "mla", 512, 150), ("setr_pup_vit_l_cityscapes", "pup", 768, 19)])
def test_vit_l_setr_sizes_equal_mmseg(experiment, head, size, classes):
    """Every parameter of the recipe's model (auxiliary heads included, as mmseg's checkpoints hold them) against
    mmseg's ViT-L and its SETR heads at the recipe's width, on the meta device."""
    global CLASSES
    with torch.device("meta"):
        task = build_task(compose(f"experiment={experiment}", "pretrained=null", "output_dir=/tmp/vtrain-test-setr"))
        keep, CLASSES = CLASSES, classes
        try:
            if head == "mla":
                parts = [SETRMLAHead(256, 128), MLANeck(1024, 256), *[FCNHead0(256, i) for i in range(4)]]
            else:
                k, convs, up = (1, 1, 4) if head == "naive" else (3, 4, 2)
                parts = [SETRUPHead(1024, 256, 3, convs, up, k), *[SETRUPHead(1024, 256, i, 2, 4, k) for i in range(3)]]
        finally:
            CLASSES = keep
    count = sum(p.numel() for p in task.parameters())
    assert count == vit_l_mmseg_params(size) + sum(p.numel() for m in parts for p in m.parameters())


def test_mla_reads_a_pyramid_too():
    """On a Swin's four levels (strides 4..32) the MLA neck resizes its running sum to each level and the head its
    levels to the largest before concatenating: the model trains, every parameter gets a gradient."""
    torch.manual_seed(0)
    task = build_task(compose("task=segmentation", "data=ade20k", f"data.num_classes={CLASSES}", "task/head=setr_mla",
                              "backbone=swin_t", "backbone.embed_dim=16", "backbone.depths=[1,1,1,1]",
                              "backbone.num_heads=[1,1,1,1]", "backbone.window_size=4", f"backbone.img_size={SIZE}",
                              "task.neck.channels=8", "task.head.channels=8",
                              *[f"task.aux_heads.{i}.channels=8" for i in range(4)], "output_dir=/tmp/vtrain-test-setr"))
    losses = task.losses(torch.randn(2, 3, SIZE, SIZE), torch.randint(0, CLASSES, (2, SIZE, SIZE)))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert not [name for name, p in task.named_parameters() if p.grad is None]
