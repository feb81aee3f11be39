"""Deformable DETR against references: multi-scale deformable attention against a direct bilinear-sampling sum
written here (points outside the maps, levels of different sizes); the whole model against the official one
(fundamentalvision/Deformable-DETR, rebuilt below in its module layout from a seeded state, at tiny widths):
an official checkpoint loads through ``pretrained=`` and gives the same encoder and decoder outputs, predictions,
detections and every loss term, plain, with box refinement and two-stage."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d, box_convert, generalized_box_iou

from conftest import ROOT, run_in_process
from test_detection_models import detector_config
from test_detr import official_nested_tensor
from vtrain.layers.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention
from vtrain.tasks.detection.module import DetectionTask

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- the attention
def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``value`` ``(H, W, C)`` at continuous (x, y) in [0, 1] of the map (pixel centres at (i + 0.5) / size): the
    four nearest pixels weighted by their distances, pixels outside the map zero."""
    h, w, _ = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = torch.zeros(value.shape[-1], dtype=value.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                total += wx * wy * value[yi, xi]
    return total


def test_deformable_attention_equals_a_direct_bilinear_sum():
    """Every query's output is sum over levels and points of weight x bilinear(value of its head, location),
    on three levels of different sizes, with locations up to half a map outside on every side."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (1, 2)]
    n, heads, channels, queries, points = 2, 2, 3, 4, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(n, queries, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64) * 2 - 0.5
    weights = torch.rand(n, queries, heads, len(shapes), points, generator=generator, dtype=torch.float64)
    assert (locations < 0).any() and (locations > 1).any()
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    starts = [0, 35, 47]
    for b in range(n):
        for q in range(queries):
            for m in range(heads):
                expected = torch.zeros(channels, dtype=torch.float64)
                for level, (h, w) in enumerate(shapes):
                    level_value = value[b, starts[level]:starts[level] + h * w, m].view(h, w, channels)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        expected += weights[b, q, m, level, p] * bilinear(level_value, x, y)
                torch.testing.assert_close(out[b, q, m * channels:(m + 1) * channels], expected, rtol=1e-10, atol=1e-10)


def test_deformable_attention_module_samples_around_its_reference_points():
    """The module: offsets over each level's (W, H) in pixels (point references) or over n_points times half the
    box (box references), softmax over a head's levels x points, padded values zeroed, then the projections;
    recomputed here from its linear layers and the direct bilinear sum."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double()
    for p in attn.parameters():  # not the initial zero offsets / uniform weights: every term matters
        torch.nn.init.normal_(p, std=0.5)
    query = torch.randn(1, 3, 8, dtype=torch.float64)
    flat = torch.randn(1, 30, 8, dtype=torch.float64)
    padding = torch.zeros(1, 30, dtype=torch.bool)
    padding[0, 5] = padding[0, 29] = True
    for refs in (torch.rand(1, 3, 2, 2, dtype=torch.float64), torch.rand(1, 3, 2, 4, dtype=torch.float64) * 0.5 + 0.2):
        out = attn(query, refs, flat, shapes, padding)
        value = attn.value_proj(flat).masked_fill(padding[..., None], 0).view(1, 30, 2, 4)
        offsets = attn.sampling_offsets(query).view(1, 3, 2, 2, 2, 2)
        weights = attn.attention_weights(query).view(1, 3, 2, 4).softmax(-1).view(1, 3, 2, 2, 2)
        expected = torch.zeros(1, 3, 8, dtype=torch.float64)
        for q in range(3):
            for m in range(2):
                for level, ((h, w), start) in enumerate(zip(shapes, (0, 24))):
                    level_value = value[0, start:start + h * w, m].view(h, w, 4)
                    for p in range(2):
                        ref = refs[0, q, level]
                        if refs.shape[-1] == 2:
                            x = ref[0] + offsets[0, q, m, level, p, 0] / w
                            y = ref[1] + offsets[0, q, m, level, p, 1] / h
                        else:
                            x = ref[0] + offsets[0, q, m, level, p, 0] / 2 * ref[2] * 0.5
                            y = ref[1] + offsets[0, q, m, level, p, 1] / 2 * ref[3] * 0.5
                        expected[0, q, m * 4:(m + 1) * 4] += weights[0, q, m, level, p] * bilinear(
                            level_value, x.item(), y.item())
        torch.testing.assert_close(out, attn.output_proj(expected), rtol=1e-10, atol=1e-10)


def test_deformable_attention_initialisation_is_the_official():
    """_reset_parameters: zero offset weights; offset biases a ring of 8 directions scaled to the unit square's
    border, k-th point k times it; uniform attention; zero projection biases."""
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=8, n_points=3)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1],
                                                            [0, -1], [1, -1]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 1, 2], 3 * bias[:, 0, 0])
    assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()


# ----------------------------------------------------------------------------------------------- the official model
# A minimal re-statement of fundamentalvision/Deformable-DETR (models/deformable_detr.py, deformable_transformer.py,
# ops/modules/ms_deform_attn.py, ops/functions/ms_deform_attn_func.py, matcher.py, segmentation.py,
# position_encoding.py, backbone.py), in its module layout and with its arithmetic, at tiny widths.
def official_core(value, value_spatial_shapes, sampling_locations, attention_weights):
    """ms_deform_attn_core_pytorch."""
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_list.append(F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros",
                                                 align_corners=False))
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return output.transpose(1, 2).contiguous()


class OfficialMSDeformAttn(nn.Module):
    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask):
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten).masked_fill(input_padding_mask[..., None], float(0))
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = reference_points[:, :, None, :, None, :] \
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        else:
            sampling_locations = reference_points[:, :, None, :, None, :2] \
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        output = official_core(value, input_spatial_shapes.tolist(), sampling_locations, attention_weights)
        return self.output_proj(output)


class OfficialEncoderLayer(nn.Module):
    def __init__(self, d, ffn, levels, heads, points):
        super().__init__()
        self.self_attn = OfficialMSDeformAttn(d, levels, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class OfficialDecoderLayer(nn.Module):
    def __init__(self, d, ffn, levels, heads, points):
        super().__init__()
        self.cross_attn = OfficialMSDeformAttn(d, levels, heads, points)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=0.0)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes, src_padding_mask):
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0].transpose(0, 1)
        tgt = self.norm2(tgt + tgt2)
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes,
                                               src_padding_mask))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def official_inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class OfficialTransformer(nn.Module):
    def __init__(self, d, ffn, layers, levels, heads, points, two_stage, num_proposals):
        super().__init__()
        self.d_model, self.two_stage, self.two_stage_num_proposals = d, two_stage, num_proposals
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(OfficialEncoderLayer(d, ffn, levels, heads, points) for _ in range(layers))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(OfficialDecoderLayer(d, ffn, levels, heads, points) for _ in range(layers))
        self.decoder.num_layers, self.decoder.bbox_embed, self.decoder.class_embed = layers, None, None
        self.level_embed = nn.Parameter(torch.randn(levels, d))
        if two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.pos_trans, self.pos_trans_norm = nn.Linear(d * 2, d * 2), nn.LayerNorm(d * 2)
        else:
            self.reference_points = nn.Linear(d, 2)

    def get_proposal_pos_embed(self, proposals):
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi  # official: 128 (= 256 // 2)
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * scale
        pos = pos[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        N_, S_, C_ = memory.shape
        proposals, _cur = [], 0
        for lvl, (H_, W_) in enumerate(spatial_shapes):
            mask_flatten_ = memory_padding_mask[:, _cur:(_cur + H_ * W_)].view(N_, H_, W_, 1)
            valid_H = torch.sum(~mask_flatten_[:, :, 0, 0], 1)
            valid_W = torch.sum(~mask_flatten_[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(torch.linspace(0, H_ - 1, H_, dtype=torch.float32),
                                            torch.linspace(0, W_ - 1, W_, dtype=torch.float32), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_W.unsqueeze(-1), valid_H.unsqueeze(-1)], 1).view(N_, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(N_, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(N_, -1, 4))
            _cur += (H_ * W_)
        output_proposals = torch.cat(proposals, 1)
        output_proposals_valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float('inf'))
        output_proposals = output_proposals.masked_fill(~output_proposals_valid, float('inf'))
        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), float(0))
        output_memory = output_memory.masked_fill(~output_proposals_valid, float(0))
        return self.enc_output_norm(self.enc_output(output_memory)), output_proposals

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios):
        reference_points_list = []
        for lvl, (H_, W_) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32),
                                          torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32), indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H_)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W_)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    @staticmethod
    def get_valid_ratio(mask):
        _, H, W = mask.shape
        valid_H, valid_W = torch.sum(~mask[:, :, 0], 1), torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        spatial_shapes = [src.shape[-2:] for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        lvl_pos_embed_flatten = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                                           for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes = torch.as_tensor([tuple(s) for s in spatial_shapes], dtype=torch.long)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        memory = src_flatten
        reference_points = self.get_reference_points(spatial_shapes.tolist(), valid_ratios)
        for layer in self.encoder.layers:
            memory = layer(memory, lvl_pos_embed_flatten, reference_points, spatial_shapes, mask_flatten)
        self.memory = memory
        bs, _, c = memory.shape
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten,
                                                                               spatial_shapes.tolist())
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            topk_proposals = torch.topk(enc_outputs_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_embed, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            enc_outputs_class = enc_outputs_coord_unact = None
            query_embed, tgt = torch.split(query_embed, c, dim=1)
            query_embed = query_embed.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_embed).sigmoid()
        init_reference_out = reference_points
        output, intermediate, intermediate_reference_points = tgt, [], []
        for lid, layer in enumerate(self.decoder.layers):
            if reference_points.shape[-1] == 4:
                reference_points_input = reference_points[:, :, None] \
                    * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                reference_points_input = reference_points[:, :, None] * valid_ratios[:, None]
            output = layer(output, query_embed, reference_points_input, memory, spatial_shapes, mask_flatten)
            if self.decoder.bbox_embed is not None:
                tmp = self.decoder.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (tmp + official_inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference_points = tmp
                    new_reference_points[..., :2] = tmp[..., :2] + official_inverse_sigmoid(reference_points)
                    new_reference_points = new_reference_points.sigmoid()
                reference_points = new_reference_points.detach()
            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return (torch.stack(intermediate), init_reference_out, torch.stack(intermediate_reference_points),
                enc_outputs_class, enc_outputs_coord_unact)


class OfficialMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < 2 else layer(x)
        return x


def official_sine(mask, num_pos_feats):
    """PositionEmbeddingSine(normalize=True) of Deformable DETR: counts minus 0.5."""
    not_mask = ~mask
    y_embed, x_embed = not_mask.cumsum(1, dtype=torch.float32), not_mask.cumsum(2, dtype=torch.float32)
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class OfficialDeformableDETR(nn.Module):
    """DeformableDETR with Joiner(Backbone(resnet, FrozenBatchNorm2d, return_interm_layers), sine): the keys
    backbone.0.body.*, input_proj.*, transformer.*, class_embed.*, bbox_embed.*, query_embed (not in two-stage)."""

    def __init__(self, num_classes, depth_layers=(3, 4, 6, 3), d=256, ffn=1024, layers=6, levels=4, heads=8,
                 points=4, queries=300, with_box_refine=False, two_stage=False):
        super().__init__()
        resnet = torchvision.models.resnet.ResNet(Bottleneck, list(depth_layers), norm_layer=FrozenBatchNorm2d)
        body = nn.Module()
        body.body = IntermediateLayerGetter(resnet, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
        for name, parameter in body.named_parameters():
            if "layer2" not in name and "layer3" not in name and "layer4" not in name:
                parameter.requires_grad_(False)
        self.backbone = nn.ModuleList([body])
        self.transformer = OfficialTransformer(d, ffn, layers, levels, heads, points, two_stage, queries)
        self.d, self.two_stage = d, two_stage
        class_embed, bbox_embed = nn.Linear(d, num_classes), OfficialMLP(d)
        if not two_stage:
            self.query_embed = nn.Embedding(queries, d * 2)
        proj = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in (512, 1024, 2048)]
        in_channels = 2048
        for _ in range(levels - 3):
            proj.append(nn.Sequential(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1),
                                      nn.GroupNorm(32, d)))
            in_channels = d
        self.input_proj = nn.ModuleList(proj)
        num_pred = layers + 1 if two_stage else layers
        if with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            self.class_embed = nn.ModuleList([class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([bbox_embed for _ in range(num_pred)])
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed

    def forward(self, images):
        """nested_tensor_from_tensor_list, then DeformableDETR.forward: every layer's logits and boxes, and
        two-stage's encoder outputs."""
        tensor, mask = official_nested_tensor(images)
        features = [x for _, x in sorted(self.backbone[0].body(tensor).items())]
        srcs, masks = [], []
        for level, proj in enumerate(self.input_proj):
            src = proj(features[level] if level < 3 else features[-1] if level == 3 else srcs[-1])
            srcs.append(src)
            masks.append(F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0])
        pos = [official_sine(m, self.d // 2) for m in masks]
        hs, init_reference, inter_references, enc_class, enc_coord = self.transformer(
            srcs, masks, pos, None if self.two_stage else self.query_embed.weight)
        classes, coords = [], []
        for lvl in range(hs.shape[0]):
            reference = official_inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            tmp = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                tmp += reference
            else:
                tmp[..., :2] += reference
            classes.append(self.class_embed[lvl](hs[lvl]))
            coords.append(tmp.sigmoid())
        return hs, torch.stack(classes), torch.stack(coords), enc_class, enc_coord


def official_matcher(logits, boxes, targets):
    """matcher.py HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)."""
    bs, num_queries = logits.shape[:2]
    out_prob, out_bbox = logits.flatten(0, 1).sigmoid(), boxes.flatten(0, 1)
    tgt_ids, tgt_bbox = torch.cat([v["labels"] for v in targets]), torch.cat([v["boxes"] for v in targets])
    alpha, gamma = 0.25, 2.0
    neg_cost_class = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
    pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    cost_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy"))
    C = (5 * cost_bbox + 2 * cost_class + 2 * cost_giou).view(bs, num_queries, -1)
    sizes = [len(v["boxes"]) for v in targets]
    indices = [linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def official_losses(logits, boxes, targets, num_classes, suffix=""):
    """SetCriterion.loss_labels (sigmoid_focal_loss x num queries) and loss_boxes, weighted 2 / 5 / 2."""
    indices = official_matcher(logits, boxes, targets)
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for (src, _) in indices])
    target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    target_classes[batch_idx, src_idx] = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
    onehot = torch.zeros([logits.shape[0], logits.shape[1], logits.shape[2] + 1])
    onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
    onehot = onehot[:, :, :-1]
    prob = logits.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * ce_loss * ((1 - p_t) ** 2)
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    src_boxes = boxes[batch_idx, src_idx]
    target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0)
    giou = torch.diag(generalized_box_iou(box_convert(src_boxes, "cxcywh", "xyxy"),
                                          box_convert(target_boxes, "cxcywh", "xyxy")))
    return {f"loss_ce{suffix}": 2 * focal.mean(1).sum() / num_boxes * logits.shape[1],
            f"loss_bbox{suffix}": 5 * F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes,
            f"loss_giou{suffix}": 2 * (1 - giou).sum() / num_boxes}


def official_post_process(logits, boxes, sizes):
    """PostProcess: top 100 of queries x classes by sigmoid."""
    prob = logits.sigmoid()
    scores, index = torch.topk(prob.view(logits.shape[0], -1), 100, dim=1)
    topk_boxes, labels = index // logits.shape[2], index % logits.shape[2]
    xyxy = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32)
    return scores, labels, xyxy * scale[:, None, :]


# ----------------------------------------------------------------------------------------------- parity
OPTIM = dict(_target_="torch.optim.AdamW", lr=2e-4, weight_decay=1e-4)
SCHED = dict(_target_="vtrain.training.optim.multistep", milestones_epochs=[40])
RESNET26 = dict(_target_="vtrain.backbones.ResNet", depth=26, frozen_stages=1)
CLASS_ROWS = [1, 3, 4, 6]  # labels 1..4 on rows 1, 3, 4, 6 of a 7-row head (as COCO's ids on the official 91)
TINY = dict(hidden_dim=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
            num_queries=20, enc_n_points=2, dec_n_points=2, dropout=0.0, size_divisible=1)
VARIANTS = {"plain": {}, "refine": dict(with_box_refine=True), "two_stage": dict(with_box_refine=True, two_stage=True)}


def ddetr_task(backbone: dict, num_classes: int, model: dict, **kwargs) -> DetectionTask:
    """Deformable DETR of ``conf/task/detector/deformable_detr.yaml`` with ``model`` options on ``backbone``."""
    overrides = [f"+task.detector.model.{k}={v}" for k, v in model.items()]
    spec = detector_config("deformable_detr", *overrides)
    return DetectionTask(OmegaConf.create(backbone), OPTIM, SCHED, num_classes=num_classes, detector=spec, **kwargs)


@torch.no_grad()
def imagenet_like_batch_norm(model: nn.Module) -> None:
    """Every FrozenBatchNorm2d of ``model`` an ImageNet-like BatchNorm (seeded by the caller), not the identity."""
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)


def seeded_official(variant: str) -> nn.Module:
    torch.manual_seed(0)
    opts = VARIANTS[variant]
    model = OfficialDeformableDETR(7, (2, 2, 2, 2), d=32, ffn=64, layers=2, levels=4, heads=2, points=2, queries=20,
                                   **opts).eval()
    with torch.no_grad():
        imagenet_like_batch_norm(model)
        for name, p in model.named_parameters():  # every offset, weight and head away from zero
            if "backbone" not in name:
                p.normal_(0, 0.3)
    return model


def parity_batch():
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 80, generator=generator), torch.rand(3, 80, 64, generator=generator)]
    targets = [{"boxes": torch.tensor([[8.0, 8, 40, 36], [44, 20, 76, 60]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[10.0, 30, 50, 70]]), "labels": torch.tensor([4])}]
    return images, targets


def official_targets(images, targets):
    out = []
    for image, target in zip(images, targets):
        h, w = image.shape[1:]
        boxes = box_convert(target["boxes"], "xyxy", "cxcywh") / torch.tensor([w, h, w, h], dtype=torch.float32)
        out.append({"boxes": boxes, "labels": torch.tensor(CLASS_ROWS)[target["labels"] - 1]})
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_official_checkpoint_gives_the_official_outputs_and_losses(variant, tmp_path):
    """The official model's state dict ({"model": ...}) through ``load_pretrained``: encoder memory, every decoder
    layer's output, logits and boxes, the 100 detections (labels mapped back from the rows), and every loss term
    (each layer's, the encoder proposals' in two-stage) equal the official to 1e-5."""
    official = seeded_official(variant)
    path = tmp_path / "ddetr.pth"
    torch.save({"model": official.state_dict()}, path)
    ours = ddetr_task(RESNET26, 4, dict(TINY, class_rows=CLASS_ROWS, **VARIANTS[variant]), batch_norm="frozen",
                      test_size=64, test_max_size=80)
    ours.load_pretrained(str(path))
    ours.eval()
    images, targets = parity_batch()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        hs, logits, boxes, enc_class, enc_coord = official([(image - mean) / std for image in images])
    captured = {}
    ours.detector.transformer.encoder.register_forward_hook(lambda m, i, o: captured.setdefault("memory", o))
    ours.detector.transformer.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    with torch.no_grad():
        detections = ours(images)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(captured["memory"], official.transformer.memory, **close)
    torch.testing.assert_close(captured["out"][0], hs, **close)
    our_logits, our_boxes = ours.detector.predictions(*captured["out"][:3])
    torch.testing.assert_close(our_logits, logits, **close)
    torch.testing.assert_close(our_boxes, boxes, **close)
    if variant == "two_stage":
        torch.testing.assert_close(captured["out"][3], enc_class, **close)
    scores, rows, xyxy = official_post_process(logits[-1], boxes[-1], [i.shape[1:] for i in images])
    label_of_row = torch.tensor([0, 1, 0, 2, 3, 0, 4])
    for out, s, r, b in zip(detections, scores, rows, xyxy):
        torch.testing.assert_close(out["scores"], s, **close)
        assert torch.equal(out["labels"], label_of_row[r])
        torch.testing.assert_close(out["boxes"], b, rtol=1e-5, atol=1e-4)

    ours.train()
    with torch.no_grad():
        losses = ours(images, targets)
    relative = official_targets(images, targets)
    expected = official_losses(logits[-1], boxes[-1], relative, 7)
    for layer in range(len(logits) - 1):
        expected.update(official_losses(logits[layer], boxes[layer], relative, 7, f"_{layer}"))
    if variant == "two_stage":
        one_class = [{**t, "labels": torch.zeros_like(t["labels"])} for t in relative]
        expected.update(official_losses(enc_class, enc_coord.sigmoid(), one_class, 7, "_enc"))
    assert sorted(losses) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, **close, msg=name)


def test_a_checkpoint_of_another_variant_is_one_line(tmp_path):
    """A box-refinement checkpoint into the plain model: one line naming the tensors that have no place."""
    from vtrain.config import ConfigError

    path = tmp_path / "refine.pth"
    torch.save({"model": seeded_official("refine").state_dict()}, path)
    plain = ddetr_task(RESNET26, 4, dict(TINY, class_rows=CLASS_ROWS), batch_norm="frozen")
    with pytest.raises(ConfigError, match=r"refine.pth: 12 tensors of this Deformable DETR checkpoint have no place in "
                                          r"the model \(detector.transformer.decoder.bbox_embed.0.layers.0.weight.*"
                                          r"with_box_refine / two_stage\)\? pretrained_strict=false loads the rest"):
        plain.load_pretrained(str(path))


def test_parameter_count_equals_the_official_deformable_detr_r50():
    """At full size (ResNet-50, d 256, FFN 1024, 300 queries, 4 levels, the 91-id COCO head) on the meta device:
    the official model's parameters and the trained ones (what its main.py prints as "number of params", stem and
    layer1 frozen, FrozenBatchNorm2d's tensors buffers): 39,847,265 (README: 40M), with box refinement 40,627,260
    and two-stage 40,959,129 (README: 41M)."""
    expected = {"plain": (40_069_665, 39_847_265), "refine": (40_849_660, 40_627_260),
                "two_stage": (41_181_529, 40_959_129)}
    resnet50 = dict(RESNET26, depth=50)
    for variant, options in VARIANTS.items():
        with torch.device("meta"):
            official = OfficialDeformableDETR(91, **options)
            ours = ddetr_task(resnet50, 80, dict(class_rows="coco", **options), batch_norm="frozen")
        counts = [(sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad))
                  for m in (official, ours)]
        assert counts[0] == counts[1] == expected[variant], variant


def test_table_row_is_the_experiments_model():
    """python -m vtrain.tools.table table=deformable_detr_coco: the R50 row measures deformable_detr_r50_coco's whole
    model (40,069,665 parameters, the official count above) and its MACs within the README's 173 G by 10%."""
    from vtrain.config.compose import compose_config
    from vtrain.tools.table.paper import fill_table

    table = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "table" / "deformable_detr_coco.yaml"))
    table["rows"] = {"ddetr_r50": table["rows"]["ddetr_r50"]}
    row = fill_table(table, compose_config("table_main", ["throughput.enabled=false"]))["rows"][0]
    assert round(row["cells"]["params"]["measured"] * 1e6) == 40_069_665
    assert not row["cells"]["params"]["differs"] and not row["cells"]["flops"]["differs"]


# ----------------------------------------------------------------------------------------------- training
TINY_SWIN = dict(_target_="vtrain.backbones.SwinTransformer", img_size=64, embed_dim=32, depths=[1, 1, 2, 1],
                 num_heads=[1, 2, 4, 8], window_size=4, drop_path_rate=0.0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_parameter_gets_a_gradient(variant):
    """DDP's condition (no search for unused parameters): on a Swin built with C3-C5 only, the loss reaches every
    parameter, each layer's heads, the extra level and (two-stage) the proposal heads included."""
    torch.manual_seed(0)
    task = ddetr_task(TINY_SWIN, 2, dict(TINY, **VARIANTS[variant]), test_size=64).train()
    images, targets = parity_batch()
    targets = [{**t, "labels": t["labels"].clamp(max=2)} for t in targets]
    losses = task(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert {n for n, p in task.named_parameters() if p.grad is None} == set()
    assert task.backbone.out_indices == (1, 2, 3)


def quickstart_two_steps(experiment: str, tmp_path) -> dict:
    """``experiment`` (a quickstart on quickstart_detr's data) in process, cut to 2 training steps and one validation
    batch of 2 images, on a synthetic set written here; returns its metrics.json, the run in ``tmp_path / "run"``."""
    import json

    from vtrain.tasks.detection.synthetic import write

    write(tmp_path / "data", seed=0, train_images=8, val_images=2, num_classes=2, max_objects=2, min_side=96,
          max_side=96)
    run_in_process(f"experiment={experiment}", f"data.root={tmp_path / 'data'}", "data.val_split=val2017",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=1",
                   "callbacks.progress_bar=null", "+trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'run'}")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["coco_num_images"] == 2
    return metrics


def test_quickstart_trains_two_steps_and_evaluates(tmp_path):
    """quickstart_ddetr in process, cut to 2 training steps and one validation batch: the focal set loss trains
    (finite, logged per term) and the COCO evaluation reads the detections. The full quickstart (60 epochs) fits its
    16 images: measured val/bbox_AP 0.628 (docs/detection.md)."""
    metrics = quickstart_two_steps("quickstart_ddetr", tmp_path)
    final = metrics["final"]
    assert math.isfinite(final["train/loss_epoch"]) and "train/loss_ce_0" in final
    assert 0.0 <= final["val/bbox_AP"] <= 1.0
