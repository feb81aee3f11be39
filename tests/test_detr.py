"""DETR against references: the Hungarian matching against a brute-force minimum and its costs against a hand
computation; the architecture against the official one (facebookresearch/detr, rebuilt below from torch modules
in the official layout): the same parameter count, and an official checkpoint loads and gives the same
detections; the loss decreases on a fixed batch; every parameter gets a gradient on a ResNet and a Swin; the
table's sizes."""
from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d, box_convert, box_iou

from conftest import ROOT, run_forked
from vtrain.config import ConfigError
from vtrain.tasks.detection.detr import COCO_CATEGORY_IDS, convert_official_state_dict
from vtrain.tasks.detection.detr_loss import HungarianMatcher, SetCriterion, average_box_count
from test_detection_models import RESNET50, TINY_SWIN, detector_config
from vtrain.tasks.detection.module import DetectionTask

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIM = dict(_target_="torch.optim.AdamW", lr=1e-4, weight_decay=1e-4)
SCHED = dict(_target_="vtrain.training.optim.multistep", milestones_epochs=[400])
TINY_DETR = dict(hidden_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                 num_queries=6)


def detr_task(backbone: dict, num_classes: int, model: dict | None = None, **kwargs) -> DetectionTask:
    """DETR of ``conf/task/detector/detr.yaml`` on ``backbone``; ``model``: DETR's options
    (``task.detector.model.<key>``), ``kwargs`` the task's arguments."""
    spec = detector_config("detr", *(f"+task.detector.model.{k}={v}" for k, v in (model or {}).items()))
    return DetectionTask(OmegaConf.create(backbone), OPTIM, SCHED, num_classes=num_classes, detector=spec, **kwargs)


# ----------------------------------------------------------------------------------------------- matching
def random_predictions(generator: torch.Generator, queries: int, classes: int):
    logits = torch.randn(1, queries, classes + 1, generator=generator)
    centres = torch.rand(1, queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(1, queries, 2, generator=generator) * 0.3 + 0.05
    return logits, torch.cat([centres, sizes], -1)


def test_hungarian_matching_is_the_brute_force_minimum():
    """On small sets, the matched pairs' total cost equals the minimum over every one-to-one assignment (more
    queries than targets, as DETR has; and more targets than queries)."""
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    for queries, num_targets in [(5, 3), (6, 1), (4, 4), (3, 5)] * 3:
        logits, boxes = random_predictions(generator, queries, 3)
        _, target_boxes = random_predictions(generator, num_targets, 3)
        target = {"labels": torch.randint(0, 3, (num_targets,), generator=generator), "boxes": target_boxes[0]}
        cost = matcher.cost(logits[0], boxes[0], target)
        rows, cols = matcher(logits, boxes, [target])[0]
        assert len(rows) == min(queries, num_targets) == len(set(rows.tolist())) == len(set(cols.tolist()))
        if queries >= num_targets:
            best = min(sum(cost[q, t] for t, q in enumerate(perm))
                       for perm in itertools.permutations(range(queries), num_targets))
        else:
            best = min(sum(cost[q, t] for q, t in enumerate(perm))
                       for perm in itertools.permutations(range(num_targets), queries))
        assert cost[rows, cols].sum().item() == pytest.approx(float(best), abs=1e-5)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    rows, cols = matcher(*random_predictions(generator, 4, 3), [empty])[0]
    assert len(rows) == len(cols) == 0


def test_matching_cost_equals_a_hand_computation():
    """One query, one target: cost = 1 x (-p(class)) + 5 x L1 + 2 x (-GIoU), computed by hand."""
    logits = torch.tensor([[[math.log(2.0), 0.0, 0.0]]])  # softmax: 0.5, 0.25, 0.25
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])  # (0.4, 0.4)-(0.6, 0.6)
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.4]])}  # (0.45, 0.3)-(0.65, 0.7)
    # L1 = 0.05 + 0 + 0 + 0.2; intersection 0.15 x 0.2 = 0.03, union 0.04 + 0.08 - 0.03 = 0.09, enclosing box
    # 0.25 x 0.4 = 0.1: GIoU = 0.03 / 0.09 - (0.1 - 0.09) / 0.1 = 1/3 - 0.1
    expected = 1 * -0.25 + 5 * 0.25 + 2 * -(1 / 3 - 0.1)
    assert HungarianMatcher(1, 5, 2).cost(logits[0], boxes[0], target).item() == pytest.approx(expected, abs=1e-6)


def test_loss_terms_equal_their_definitions():
    """Perfect boxes give zero L1 and GIoU losses; the cross-entropy weighs the no-object class by 0.1 and is
    averaged over the weights (the official SetCriterion); the box losses are divided by the box count."""
    criterion = SetCriterion(2, HungarianMatcher(1, 5, 2), 1, 5, 2, no_object_weight=0.1, aux_loss=False)
    logits = torch.randn(1, 1, 3, 3)
    boxes = torch.tensor([[[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1]]]])
    target = {"labels": torch.tensor([1, 0]), "boxes": boxes[0, 0, :2].clone()}
    losses = criterion(logits, boxes, [target])
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    nll = -logits[0, 0].log_softmax(-1)
    expected = (nll[0, 1] + nll[1, 0] + 0.1 * nll[2, 2]) / 2.1
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    moved = boxes.clone()
    moved[..., 0] += 0.1  # every centre 0.1 to the right: L1 = 0.1 per box, x 5 / 2 boxes
    assert criterion(logits, moved, [target])["loss_bbox"].item() == pytest.approx(5 * 0.1, rel=1e-4)


# ----------------------------------------------------------------------------------------------- the official model
class OfficialEncoderLayer(nn.Module):
    """models/transformer.py TransformerEncoderLayer.forward_post (its names, its calls)."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=2048):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, src, mask, pos):
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, key_padding_mask=mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class OfficialDecoderLayer(nn.Module):
    """models/transformer.py TransformerDecoderLayer.forward_post."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=2048):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.1)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, tgt, memory, mask, pos, query_pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt)[0])
        tgt = self.norm2(tgt + self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory,
                                                   key_padding_mask=mask)[0])
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


def official_nested_tensor(images):
    """util/misc.py nested_tensor_from_tensor_list: the images padded to the largest, the mask True on padding."""
    h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    tensor = torch.zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for image, padded, m in zip(images, tensor, mask):
        padded[:, :image.shape[1], :image.shape[2]].copy_(image)
        m[:image.shape[1], :image.shape[2]] = False
    return tensor, mask


class OfficialDETR(nn.Module):
    """hubconf.py detr_resnet50 (``depth``/``dilation``: detr_resnet101, detr_resnet50_dc5, detr_resnet101_dc5):
    torchvision's ResNet with FrozenBatchNorm2d (models/backbone.py; only layer2-4 train; ``dilation``:
    replace_stride_with_dilation=[False, False, True]), Transformer(d_model=256, return_intermediate_dec=True),
    100 queries, ``num_classes`` + 1 outputs (91 + 1 for COCO: the ids 0..90), in the official module layout."""

    def __init__(self, num_classes=91, depth=50, dilation=False):
        super().__init__()
        resnet = getattr(torchvision.models, f"resnet{depth}")(norm_layer=FrozenBatchNorm2d,
                                                              replace_stride_with_dilation=[False, False, dilation])
        body = nn.Module()
        body.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        for name, parameter in body.named_parameters():
            if "layer2" not in name and "layer3" not in name and "layer4" not in name:
                parameter.requires_grad_(False)
        self.backbone = nn.ModuleList([body])  # Joiner(backbone, position encoding): keys backbone.0.body.*
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(OfficialEncoderLayer() for _ in range(6))
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.layers = nn.ModuleList(OfficialDecoderLayer() for _ in range(6))
        self.transformer.decoder.norm = nn.LayerNorm(256)
        self.class_embed = nn.Linear(256, num_classes + 1)
        self.bbox_embed = nn.Module()
        self.bbox_embed.layers = nn.ModuleList([nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 4)])
        self.query_embed = nn.Embedding(100, 256)
        self.input_proj = nn.Conv2d(2048, 256, kernel_size=1)

    @staticmethod
    def sine(mask, num_pos_feats=128, temperature=10000):
        """position_encoding.py PositionEmbeddingSine(normalize=True)."""
        not_mask = ~mask
        y_embed, x_embed = not_mask.cumsum(1, dtype=torch.float32), not_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos_x, pos_y = x_embed[:, :, :, None] / dim_t, y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def forward(self, images):
        """util/misc.py nested_tensor_from_tensor_list (normalised images padded to the largest, mask True on
        padding), then DETR.forward; returns the last layer's logits and (cx, cy, w, h) boxes."""
        tensor, mask = official_nested_tensor(images)
        src = self.backbone[0].body(tensor)["0"]
        mask = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        pos = self.sine(mask).flatten(2).permute(2, 0, 1)
        src = self.input_proj(src).flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, len(images), 1)
        memory = src
        for layer in self.transformer.encoder.layers:
            memory = layer(memory, mask, pos)
        tgt = torch.zeros_like(query_pos)
        for layer in self.transformer.decoder.layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
        hs = self.transformer.decoder.norm(tgt).transpose(0, 1)
        x = hs
        for i, layer in enumerate(self.bbox_embed.layers):
            x = F.relu(layer(x)) if i < 2 else layer(x)
        return self.class_embed(hs), x.sigmoid()


def seeded_official(**kwargs) -> OfficialDETR:
    torch.manual_seed(0)
    model = OfficialDETR(**kwargs).eval()
    for module in model.modules():  # statistics and affine of an ImageNet model, not the identity
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def official():
    return seeded_official()


@pytest.fixture(scope="module")
def ours91():
    """The detr_r50_coco model with the official COCO classifier's 91 ids as categories, batches padded as the
    official pads them."""
    return detr_task(RESNET50, num_classes=91, batch_norm="frozen", test_size=96,
                     model=dict(size_divisible=1)).eval()


def test_parameter_count_equals_the_official_detr_r50(official, ours91):
    """41,524,768 parameters, of which 41,302,368 train (what the official main.py prints as "number of params":
    the stem and layer1 are frozen, FrozenBatchNorm2d's tensors are buffers), with the official COCO classifier
    (91 ids + no-object); 2,827 fewer with a classifier of COCO's 80 categories (41,521,941)."""
    task = ours91
    ours = sum(p.numel() for p in task.parameters()), sum(p.numel() for p in task.parameters() if p.requires_grad)
    reference = (sum(p.numel() for p in official.parameters()),
                 sum(p.numel() for p in official.parameters() if p.requires_grad))
    assert ours == reference == (41_524_768, 41_302_368)


def official_detections(official, images):
    """models/detr.py PostProcess on the official model's output for images normalised as datasets/coco.py does."""
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        logits, boxes = official([(image - mean) / std for image in images])
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    scale = torch.tensor([[image.shape[2], image.shape[1]] * 2 for image in images], dtype=torch.float32)
    return logits, scores, labels, box_convert(boxes, "cxcywh", "xyxy") * scale[:, None]


def test_an_official_checkpoint_loads_and_gives_the_official_detections(official, ours91, tmp_path):
    """An official checkpoint ({"model": state_dict}, official keys) through ``pretrained=`` / ``ckpt_path=``: the
    same 100 detections per image as the official model and PostProcess, in original image coordinates (two
    images of different shapes in one padded batch, at the test size so that nothing is resized). Into an
    80-category model, the classifier keeps COCO's rows: the logits are the official ones of those ids."""
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": official.state_dict()}, path)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=generator), torch.rand(3, 128, 96, generator=generator)]
    logits, scores, labels, boxes = official_detections(official, images)

    ours91.load_pretrained(str(path))
    with torch.no_grad():
        outputs = ours91(images)
    for out, s, l, b in zip(outputs, scores, labels, boxes):
        assert torch.equal(out["labels"], l + 1)  # our labels 1..91 are the official rows 0..90
        torch.testing.assert_close(out["scores"], s, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["boxes"], b, rtol=1e-4, atol=1e-3)

    coco = detr_task(RESNET50, num_classes=80, batch_norm="frozen", test_size=96,
                     model=dict(size_divisible=1)).eval()
    coco.load_pretrained(str(path))
    with torch.no_grad():
        outputs = coco(images)
    kept = logits[..., [*COCO_CATEGORY_IDS, 91]]
    expected_scores, expected_labels = kept.softmax(-1)[..., :-1].max(-1)
    for out, s, l in zip(outputs, expected_scores, expected_labels):
        assert torch.equal(out["labels"], l + 1)
        torch.testing.assert_close(out["scores"], s, rtol=1e-4, atol=1e-5)
    # the recipes' default: COCO's 80 categories on the rows of their ids, the checkpoint loaded as it is; a query
    # whose best row no category uses gives label 0, which the evaluator drops (as COCO ignores such an id)
    rows = detr_task(RESNET50, num_classes=80, batch_norm="frozen", test_size=96,
                     model=dict(size_divisible=1, class_rows="coco")).eval()
    rows.load_pretrained(str(path))
    with torch.no_grad():
        outputs = rows(images)
    label_of_row = torch.zeros(91, dtype=torch.int64)
    label_of_row[list(COCO_CATEGORY_IDS)] = torch.arange(1, 81)
    for out, s, l in zip(outputs, scores, labels):
        assert torch.equal(out["labels"], label_of_row[l])
        torch.testing.assert_close(out["scores"], s, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"classifier has 91 classes, this model 3 categories: give their category "
                                          r"ids \(task.detector.release_category_ids"):
        convert_official_state_dict(official.state_dict(), num_classes=3)
    learned = {**official.state_dict(), "backbone.1.row_embed.weight": torch.zeros(50, 128)}
    with pytest.raises(ConfigError, match="this DETR checkpoint has learned position embeddings"):
        convert_official_state_dict(learned, num_classes=91)


def test_dc5_and_r101_equal_the_official_models(tmp_path):
    """DETR-DC5 (backbone.output_stride=16: the last stage dilated, its first block at the previous dilation, as
    torchvision's replace_stride_with_dilation) gives the official DETR-DC5's detections from its checkpoint; the
    R101 models (detr_r101_coco, detr_r101_dc5_coco) have the official parameter count, and train what the official
    main.py trains (all but the stem and layer1)."""
    official = seeded_official(dilation=True)
    path = tmp_path / "detr-r50-dc5.pth"
    torch.save({"model": official.state_dict()}, path)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=generator)]
    _, scores, labels, boxes = official_detections(official, images)
    ours = detr_task({**RESNET50, "output_stride": 16}, num_classes=91, batch_norm="frozen", test_size=96,
                     model=dict(size_divisible=1)).eval()
    ours.load_pretrained(str(path))
    with torch.no_grad():
        out = ours(images)[0]
    assert torch.equal(out["labels"], labels[0] + 1)
    torch.testing.assert_close(out["scores"], scores[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["boxes"], boxes[0], rtol=1e-4, atol=1e-3)

    with torch.device("meta"):
        reference = OfficialDETR(depth=101)
        r101 = detr_task({**RESNET50, "depth": 101}, num_classes=91, batch_norm="frozen")
    counts = [(sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad))
              for m in (reference, r101)]
    assert counts[0] == counts[1] == (60_464_672, 60_242_272)  # paper: 60M


# ----------------------------------------------------------------------------------------------- training
def test_classifier_rows_map_labels_to_category_id_rows_and_back():
    """class_rows=coco: label k trains row COCO_CATEGORY_IDS[k - 1] (person 1 -> 1, toothbrush 80 -> 90), the
    classifier has 91 classes (ids 0..90); a row maps back to its label, an unused id's row (0, 12, 83) to 0."""
    from vtrain.tasks.detection.detr import ClassifierRows

    rows = ClassifierRows(80, "coco")
    assert rows.num_rows == 91
    target = {"boxes": torch.tensor([[0.0, 0, 10, 20], [5, 5, 15, 15], [0, 0, 20, 20]]), "labels": torch.tensor([1, 12, 80])}
    relative = rows.relative_targets([target], [(20, 20)])[0]
    assert relative["labels"].tolist() == [1, 13, 90]
    torch.testing.assert_close(relative["boxes"][0], torch.tensor([0.25, 0.5, 0.5, 1.0]))
    assert rows.label_of_row[torch.tensor([1, 13, 90, 0, 12, 83])].tolist() == [1, 12, 80, 0, 0, 0]
    assert ClassifierRows(3).relative_targets([{"boxes": torch.zeros(1, 4) + 1, "labels": torch.tensor([3])}],
                                              [(4, 4)])[0]["labels"].tolist() == [2]
    with pytest.raises(ConfigError, match="class_rows=coco puts COCO's 80 categories on their ids' rows; this data "
                                          "has 2 categories: set task.detector.model.class_rows=null"):
        ClassifierRows(2, "coco")


def fixed_batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=generator), torch.rand(3, 72, 64, generator=generator)]
    targets = [{"boxes": torch.tensor([[8.0, 8, 40, 36], [44, 20, 76, 60]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 30, 50, 70]]), "labels": torch.tensor([1])}]
    return images, targets


@pytest.mark.parametrize("backbone", [RESNET50, TINY_SWIN], ids=["resnet50", "swin"])
def test_every_parameter_gets_a_gradient(backbone):
    """DDP's condition (no search for unused parameters): the loss reaches every trainable parameter, the
    auxiliary losses' layers and the shared heads included; the backbone is built with C5 only (no C2-C4
    output norms on a Swin), and the recipe's frozen ResNet stem and layer1 get none."""
    torch.manual_seed(0)
    task = detr_task(backbone, num_classes=2, batch_norm="frozen" if backbone is RESNET50 else "train",
                     test_size=64, model=TINY_DETR).train()
    losses = task(*fixed_batch())
    assert len(losses) == 3 * TINY_DETR["num_decoder_layers"] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    reached = {n for n, p in task.named_parameters() if p.grad is not None}
    assert reached == {n for n, p in task.named_parameters() if p.requires_grad}
    assert task.backbone.out_indices == (3,)
    if backbone is RESNET50:
        assert not task.backbone.conv1.weight.requires_grad and not task.backbone.layer1[0].conv1.weight.requires_grad
    else:
        assert list(task.backbone.out_norms) == ["3"]


def test_loss_decreases_on_a_fixed_batch():
    """A tiny DETR fits two images: the summed Hungarian loss of both decoder layers falls, and each object's
    best-scored box of its class lands on it, in original image coordinates (measured: loss 10.2 at step 0,
    0.71 after 60 AdamW steps at lr 1e-3; IoUs 0.98, 0.90, 0.96)."""
    torch.manual_seed(0)
    task = detr_task(TINY_SWIN, num_classes=2, test_size=64, model=dict(TINY_DETR, dropout=0.0)).train()
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    images, targets = fixed_batch()
    history = []
    for _ in range(61):
        loss = sum(task(images, targets).values())
        assert torch.isfinite(loss)
        history.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[-1] < history[0] / 4, history[::10]
    task.eval()
    with torch.no_grad():
        outputs = task(images)
    for out, target in zip(outputs, targets):
        for box, label in zip(target["boxes"], target["labels"]):
            scores = torch.where(out["labels"] == label, out["scores"], 0)
            assert box_iou(out["boxes"][scores.argmax()][None], box[None]).item() > 0.7


def test_box_count_is_averaged_over_processes(monkeypatch):
    """The official normalisation: the boxes of all processes (all_reduce), over the world size, at least 1."""
    import torch.distributed as dist

    other_rank_boxes = 5.0
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.add_(other_rank_boxes))
    targets = [{"labels": torch.tensor([0, 1])}, {"labels": torch.tensor([1])}]
    assert average_box_count(targets, torch.device("cpu")) == (3 + 5) / 2
    other_rank_boxes = 0.0
    assert average_box_count([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0


def test_unknown_detr_options_are_one_line():
    with pytest.raises(ConfigError, match=r"task.detector.model.rpn_batch_size_per_image: vtrain.tasks.detection.detr."
                                          r"DETR does not take it .* drop it with ~task.detector.model.rpn_batch"):
        detr_task(TINY_SWIN, num_classes=2, model=dict(rpn_batch_size_per_image=64))


# ----------------------------------------------------------------------------------------------- the table
def test_table_sizes_are_the_models_at_the_papers_input():
    """python -m vtrain.tools.table table=detr_coco: params of the experiment's model (the official 91-id classifier:
    the official count, see test_parameter_count_equals_the_official_detr_r50) and its MACs on one 800x1066 image, which equal torchvision's ResNet-50 trunk plus the transformer counted by hand."""
    from vtrain.config.compose import compose_config
    from vtrain.profiling import count_macs
    from vtrain.tools.table.paper import fill_table

    table = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "table" / "detr_coco.yaml"))
    table["rows"] = {"detr_r50": table["rows"]["detr_r50"]}
    row = fill_table(table, compose_config("table_main", ["throughput.enabled=false"]))["rows"][0]
    assert round(row["cells"]["params"]["measured"] * 1e6) == 41_524_768
    with torch.device("meta"):
        trunk = IntermediateLayerGetter(torchvision.models.resnet50(), {"layer4": "0"})
    hw, d, ffn, queries = 25 * 34, 256, 2048, 100  # C5 of 800x1066 is 25x34
    transformer = 6 * (4 * hw * d * d + 2 * hw * hw * d + 2 * hw * d * ffn)  # encoder: projections, QK^T and AV, FFN
    transformer += 6 * (4 * queries * d * d + 2 * queries * queries * d  # decoder self-attention
                        + 2 * queries * d * d + 2 * hw * d * d + 2 * queries * hw * d  # cross-attention
                        + 2 * queries * d * ffn)
    heads = hw * 2048 * d + queries * d * 92 + queries * (2 * d * d + 4 * d)  # input_proj; last layer's heads
    expected = count_macs(trunk, (1, 3, 800, 1066)) + transformer + heads
    assert row["cells"]["flops"]["measured"] == pytest.approx(expected * 1e-9, rel=1e-9)
    assert not row["cells"]["params"]["differs"] and not row["cells"]["flops"]["differs"]  # 41.5 / 81.2 vs 41 / 86


# ----------------------------------------------------------------------------------------------- the quickstart
# What quickstart_detr says to write: 16 training images of 96x96, two categories, up to two objects each.
QUICKSTART_SET = dict(train_images=16, val_images=8, num_classes=2, max_objects=2, min_side=96, max_side=96)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """quickstart_detr as it is (60 epochs of 2 steps), in 2-process CPU DDP: the Swin is built with C5 only and
    trains without DDP's search for unused parameters; the loss is normalised over both processes' boxes."""
    from vtrain.tasks.detection.synthetic import write

    root = tmp_path_factory.mktemp("coco_detr")
    write(root, seed=0, **QUICKSTART_SET)
    run_dir = tmp_path_factory.mktemp("quickstart_detr")
    result = run_forked("experiment=quickstart_detr", f"data.root={root}", "trainer=ddp_cpu", "callbacks.progress_bar=null",
                     f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_quickstart_detr_learns_under_ddp(quickstart):
    """It fits its 16 training images, on which it is evaluated (COCO AP through the task's evaluator, labels
    mapped back to the file's category ids). Measured (2 shared cores): val/bbox_AP 0.826 (seeds 1 and 2: 0.847,
    0.486; untrained: 0.000); about 25 s on a busy machine."""
    run_dir, metrics = quickstart
    assert metrics["global_step"] == 120 and metrics["coco_num_images"] == 16
    assert metrics["final"]["val/bbox_AP"] > 0.3, metrics["final"]
    with open(run_dir / "metrics.csv") as f:  # measured: 13.6 in the first epoch, 1.25 in the last (0.85, 1.91)
        losses = [float(row["train/loss_epoch"]) for row in csv.DictReader(f) if row.get("train/loss_epoch")]
    assert len(losses) == 60 and losses[-1] < losses[0] / 4, losses[::10]
    results = json.loads((run_dir / "detections_bbox.json").read_text())
    assert len(results) == 16 * 8 and {r["category_id"] for r in results} <= {1, 4}  # 8 queries per image


def test_the_evaluation_resize_is_the_official_rule():
    """The official get_size_with_aspect_ratio rounds a capped short side (torchvision's detectors floor it): a 45x170
    image is 353x1333; a 480x640 one 800x1066; a square one 800x800; a portrait one as the landscape, transposed."""
    from vtrain.tasks.detection.detr import official_size

    assert official_size(45, 170, 800, 1333) == (353, 1333)
    assert official_size(170, 45, 800, 1333) == (1333, 353)
    assert official_size(480, 640, 800, 1333) == (800, 1066)
    assert official_size(500, 500, 800, 1333) == (800, 800)
    assert official_size(800, 1200, 800, 1333) == (800, 1200)  # already at size: unchanged
    task = detr_task(TINY_SWIN, num_classes=2, test_size=800, model=dict(TINY_DETR, size_divisible=1)).eval()
    batch, _ = task.detector.transform([torch.rand(3, 45, 170)])
    assert batch.image_sizes == [(353, 1333)]
