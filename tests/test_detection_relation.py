"""Relation Networks (Hu et al., CVPR 2018): the object relation module against the paper's equations written as
loops, its symmetries, its geometric prior; parameter counts against the official MXNet layer shapes; the learned
duplicate removal's targets and what it learns."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou

from vtrain.tasks.detection.relation import (
    LearnedNMS, ObjectRelation, RelationBoxHead, box_geometry, relation_parameter_count, sinusoidal_embedding,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_boxes(n, seed=0, spread=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    wh = 5 + torch.rand(n, 2, generator=g) * 40
    return torch.cat([xy, xy + wh], dim=1)


def relation(dim=32, heads=4, key_dim=8, geometry_dim=16, seed=0, std=0.3):
    torch.manual_seed(seed)
    module = ObjectRelation(dim, heads, key_dim, geometry_dim)
    for p in module.parameters():  # larger than the official N(0, 0.01), so that the relation term is not tiny
        torch.nn.init.normal_(p, std=std)
    return module


def reference_relation(module: ObjectRelation, f: torch.Tensor, boxes: torch.Tensor, prior=None) -> torch.Tensor:
    """Eq. 1-6 object by object: f_R^r(n) = sum_m w^{mn} (W_V^r f_m), w^{mn} = w_G exp(w_A) / sum_k w_G exp(w_A)
    (the official code's prior floor 1e-6), heads concatenated, added to f."""
    n, d = f.shape
    heads, dk = module.num_heads, module.key_dim
    q, k, v = module.query(f), module.key(f), module.value(f)
    if prior is None:
        prior = torch.zeros(heads, n, n)
        for a in range(n):
            for b in range(n):
                x_a, y_a = (boxes[a, 0] + boxes[a, 2]) / 2, (boxes[a, 1] + boxes[a, 3]) / 2
                x_b, y_b = (boxes[b, 0] + boxes[b, 2]) / 2, (boxes[b, 1] + boxes[b, 3]) / 2
                w_a, h_a = boxes[a, 2] - boxes[a, 0], boxes[a, 3] - boxes[a, 1]
                w_b, h_b = boxes[b, 2] - boxes[b, 0], boxes[b, 3] - boxes[b, 1]
                geometry = torch.stack([torch.log(torch.clamp(abs(x_a - x_b) / w_a, min=1e-3)),
                                        torch.log(torch.clamp(abs(y_a - y_b) / h_a, min=1e-3)),
                                        torch.log(w_a / w_b), torch.log(h_a / h_b)])
                embedding = []
                for g in geometry:
                    angles = [100 * g / 1000 ** (8 * i / module.geometry_dim) for i in range(module.geometry_dim // 8)]
                    embedding += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
                prior[:, a, b] = F.relu(module.geometric_weight(torch.tensor(embedding)))
    out = f.clone()
    for r in range(heads):
        cols = slice(r * dk, (r + 1) * dk)
        vcols = slice(r * d // heads, (r + 1) * d // heads)
        for a in range(n):
            logits = torch.stack([q[a, cols] @ k[b, cols] / math.sqrt(dk) for b in range(n)])
            weights = prior[r, a].clamp(min=1e-6) * torch.exp(logits)
            weights = weights / weights.sum()
            out[a, vcols] += sum(weights[b] * v[b, vcols] for b in range(n))
    return out


def test_relation_module_equals_the_papers_equations():
    module = relation()
    f, boxes = torch.randn(6, 32), random_boxes(6)
    with torch.no_grad():
        out, reference = module(f, boxes), reference_relation(module, f, boxes)
    assert torch.allclose(out, reference, atol=1e-5)
    assert (out - f).abs().mean() > 0.1  # the relation term is not negligible here


def test_permuting_objects_permutes_the_output():
    module = relation(seed=1)
    f, boxes = torch.randn(9, 32), random_boxes(9, seed=1)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(module(f[perm], boxes[perm]), module(f, boxes)[perm], atol=1e-5)
        # a batch of sets (one per class in the duplicate removal) is related set by set
        batch = module(torch.stack([f, f[perm]]), torch.stack([boxes, boxes[perm]]))
        assert torch.allclose(batch[1], batch[0][perm], atol=1e-5)


def test_geometric_weights_are_invariant_to_translating_and_scaling_all_boxes():
    module = relation(seed=2, geometry_dim=64).double()  # float64: the embedding multiplies logs by 100
    boxes = random_boxes(7, seed=2).double()
    moved = boxes * 3.7 + torch.tensor([13.0, -41.0, 13.0, -41.0], dtype=torch.float64)
    with torch.no_grad():
        prior, moved_prior = module.geometric_prior(boxes, boxes), module.geometric_prior(moved, moved)
    assert torch.allclose(prior, moved_prior, atol=1e-9)
    assert prior.std() > 0.1  # not a constant
    squeezed = boxes.clone()
    squeezed[:, 2] = squeezed[:, 0] + (squeezed[:, 2] - squeezed[:, 0]) * 2  # only widths change: it sees it
    assert not torch.allclose(box_geometry(boxes, boxes), box_geometry(squeezed, squeezed))


def test_a_zero_geometric_weight_kills_the_pair():
    """W_G reading one embedding dimension, cos(100 log(w_m/w_n) / 1000^(7/8)), with a bias that makes the prior 0
    for widths more than e^0.5 apart: the wide object then gets no weight from the narrow ones, whatever their
    appearance, and each narrow object's output is the relation over the narrow ones only. W_G all zero leaves the
    appearance weights alone (every prior at the same floor)."""
    module = relation(seed=3, geometry_dim=64, std=0.1)  # appearance logits within a few units: 1e-6 prior is nil
    cos_dw_slowest = 2 * 16 + 8 + 7  # coordinate 2 (log w ratio), cosines after 8 sines, slowest frequency k=7
    angle = 100 * 0.5 / 1000 ** (7 / 8)
    with torch.no_grad():
        module.geometric_weight.weight.zero_()
        module.geometric_weight.weight[:, cos_dw_slowest] = 100.0
        module.geometric_weight.bias.fill_(-100.0 * math.cos(angle))
    narrow = torch.tensor([[0, 0, 10, 10], [20, 5, 30, 16], [3, 40, 13, 49], [50, 50, 61, 60.0]])
    wide = torch.tensor([[10, 10, 40, 30.0]])  # three times as wide
    boxes, f = torch.cat([narrow, wide]), torch.randn(5, 32)
    with torch.no_grad():
        prior = module.geometric_prior(boxes, boxes)
        assert (prior[:, :4, 4] == 0).all() and (prior[:, :4, :4] > 0).all()
        out = module(f, boxes)
        alone = module(f[:4], boxes[:4])
    assert torch.allclose(out[:4], alone, atol=1e-5)
    assert torch.allclose(out, reference_relation(module, f, boxes), atol=1e-5)
    with torch.no_grad():
        module.geometric_weight.bias.fill_(-90.0)  # every pair's prior positive: the wide object counts again
        assert (module(f, boxes)[:4] - alone).abs().max() > 1e-2
    with torch.no_grad():
        module.geometric_weight.weight.zero_()
        module.geometric_weight.bias.zero_()
        plain = module(f, boxes)
    q, k, v = (layer(f).view(5, 4, -1).transpose(0, 1) for layer in (module.query, module.key, module.value))
    appearance_only = f + (torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v).transpose(0, 1).reshape(5, 32)
    assert torch.allclose(plain, appearance_only, atol=1e-5)


def test_sinusoidal_embedding_layout():
    """Per coordinate: 8 sines of 100 g / 1000^(k/8), then the 8 cosines (official extract_position_embedding)."""
    g = torch.tensor([[0.3, -1.2, 0.0, 2.0]])
    e = sinusoidal_embedding(g, 64)
    assert e.shape == (1, 64)
    assert e[0, 16 + 3] == pytest.approx(math.sin(100 * -1.2 / 1000 ** (3 / 8)), abs=1e-5)
    assert e[0, 16 + 8 + 3] == pytest.approx(math.cos(100 * -1.2 / 1000 ** (3 / 8)), abs=1e-5)


# Layer shapes of the official MXNet symbols (relation_rcnn/symbols/..._fpn_attention_1024_pairwise_position_multi_
# head_16_learn_nms.py): per relation module (attention_module_multi_head, fc_dim=16, dim=(1024, 1024, 1024)) and the
# learned NMS (the test-time variables' shapes, 5 thresholds).
OFFICIAL_RELATION = {"query_1": [(1024, 1024), (1024,)], "key_1": [(1024, 1024), (1024,)],
                     "linear_out_1": [(1024, 1024, 1, 1), (1024,)],  # grouped 1x1 conv, 16 groups of 1024 -> 64
                     "pair_pos_fc1_1": [(16, 64, 1, 1), (16,)]}
OFFICIAL_LEARN_NMS = {"nms_rank": [(128, 1024), (128,)], "roi_feat_embedding": [(128, 1024), (128,)],
                      "nms_pair_pos_fc1_1": [(16, 64), (16,)], "nms_query_1": [(1024, 128), (1024,)],
                      "nms_key_1": [(1024, 128), (1024,)], "nms_linear_out_1": [(128, 128, 1, 1), (128,)],
                      "nms_logit": [(5, 128), (5,)]}


def count(shapes: dict) -> int:
    return sum(math.prod(shape) for layer in shapes.values() for shape in layer)


def test_parameter_counts_equal_the_official_layers():
    with torch.device("meta"):
        module, head, learned = ObjectRelation(1024), RelationBoxHead(256 * 49, 1024), LearnedNMS()
    assert sum(p.numel() for p in module.parameters()) == count(OFFICIAL_RELATION) == 3_149_840
    # the paper's N_r (2 d_f d_k + d_g) + d_f^2 is the same without the biases (3 x 1024 + 16)
    assert relation_parameter_count(1024, 16, 64, 64) == 3_149_840 - 3 * 1024 - 16 == 3_146_752
    fc = (256 * 49 + 1) * 1024 + 1025 * 1024  # TwoMLPHead
    assert sum(p.numel() for p in head.parameters()) == fc + 2 * 3_149_840
    assert sum(p.numel() for p in learned.parameters()) == count(OFFICIAL_LEARN_NMS) == 544_789


def test_duplicate_removal_targets_by_hand():
    """One class, two ground truths; at IoU 0.5 the best-scoring detection of each object is positive, a detection
    overlapping one object but best matching another counts for that other; at 0.9 only a near-exact box is."""
    learned = LearnedNMS(feature_dim=8, thresholds=(0.5, 0.9), first_n=5, embed_dim=16, rank_dim=16, num_heads=2,
                         key_dim=4, geometry_dim=16)
    gt = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10.0]])
    dets = torch.tensor([[0, 0, 10, 10],  # exact, object 0, score 0.6
                         [1, 0, 11, 10],  # IoU 0.82 with object 0, score 0.9
                         [20, 0, 30, 11],  # IoU 0.91 with object 1, score 0.5
                         [21, 0, 31, 10],  # IoU 0.82 with object 1, score 0.7
                         [50, 50, 60, 60.0]])  # nothing, score 0.95
    s0 = torch.tensor([[0.6, 0.9, 0.5, 0.7, 0.95]])
    targets = learned.targets(s0, dets[None], torch.tensor([1]), gt, torch.tensor([1, 1]))
    assert targets[0, :, 0].tolist() == [0, 1, 0, 1, 0]
    assert targets[0, :, 1].tolist() == [1, 0, 1, 0, 0]
    other_class = learned.targets(s0, dets[None], torch.tensor([2]), gt, torch.tensor([1, 1]))
    assert other_class.sum() == 0


def crowded_duplicates(g: torch.Generator, objects: int = 4, copies: int = 4, dim: int = 16):
    """Objects in overlapping pairs (IoU 0.6: greedy NMS at 0.5 merges each pair), each detected ``copies`` times as
    near-identical boxes (2% jitter); a copy's feature is its object's code plus noise, its score random."""
    gt = []
    for _ in range(objects // 2):
        x, y, w = (float(torch.rand(1, generator=g)) * 100, float(torch.rand(1, generator=g)) * 100,
                   20 + float(torch.rand(1, generator=g)) * 20)
        gt += [[x, y, x + w, y + w], [x + w / 4, y, x + w / 4 + w, y + w]]
    gt = torch.tensor(gt)
    size = (gt[:, 2:] - gt[:, :2]).repeat_interleave(copies, 0).repeat(1, 2)
    boxes = gt.repeat_interleave(copies, 0) + 0.02 * size * torch.randn(objects * copies, 4, generator=g)
    codes = torch.randn(objects, dim, generator=g)
    features = codes.repeat_interleave(copies, 0) + 0.3 * torch.randn(objects * copies, dim, generator=g)
    scores = 0.3 + 0.7 * torch.rand(objects * copies, generator=g)
    class_scores = torch.stack([1 - scores, scores], dim=1)  # background, the one class
    return class_scores, torch.stack([boxes, boxes], dim=1), features, gt, torch.ones(objects, dtype=torch.long)


def average_precision(detections: list[tuple[torch.Tensor, torch.Tensor]], truths: list[torch.Tensor]) -> float:
    """AP at IoU 0.5 (all-point interpolation): each ground truth matched once, highest score first."""
    scored = []
    for image, (boxes, scores) in enumerate(detections):
        scored += [(float(s), image, b) for b, s in zip(boxes, scores)]
    scored.sort(key=lambda x: -x[0])
    used = [torch.zeros(len(t), dtype=torch.bool) for t in truths]
    tp = []
    for _, image, box in scored:
        iou = box_iou(box[None], truths[image])[0]
        iou[used[image]] = 0
        best = int(iou.argmax())
        hit = bool(iou[best] >= 0.5)
        if hit:
            used[image][best] = True
        tp.append(hit)
    total = sum(len(t) for t in truths)
    tp = torch.tensor(tp, dtype=torch.float)
    recall = tp.cumsum(0) / total
    precision = tp.cumsum(0) / torch.arange(1, len(tp) + 1)
    precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    return float(((recall - torch.cat([torch.zeros(1), recall[:-1]])) * precision).sum())


def test_learned_duplicate_removal_keeps_one_box_per_object_as_well_as_nms():
    """Trained 150 steps on crowded scenes of near-identical duplicates, on new scenes it keeps one box per object
    better than greedy NMS at 0.5, which also removes the second object of each overlapping pair. AP50 measured:
    learned 0.88, NMS 0.51 (these seeds)."""
    torch.manual_seed(0)
    learned = LearnedNMS(feature_dim=16, thresholds=(0.5,), first_n=40, embed_dim=32, rank_dim=32, num_heads=4,
                         key_dim=8, geometry_dim=64, class_score_threshold=0.0)
    optimizer = torch.optim.Adam(learned.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = learned.loss(*crowded_duplicates(g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    g = torch.Generator().manual_seed(1)
    learned_dets, nms_dets, truths = [], [], []
    for _ in range(40):
        scores, boxes, features, gt, labels = crowded_duplicates(g)
        out_boxes, out_scores, _ = learned.detect(scores, boxes, features)
        learned_dets.append((out_boxes, out_scores))
        keep = batched_nms(boxes[:, 1], scores[:, 1], torch.ones(len(scores)), 0.5)
        nms_dets.append((boxes[keep, 1], scores[keep, 1]))
        truths.append(gt)
    learned_ap, nms_ap = average_precision(learned_dets, truths), average_precision(nms_dets, truths)
    assert learned_ap >= nms_ap + 0.2, (learned_ap, nms_ap)
    assert learned_ap > 0.8


@pytest.mark.slow
def test_quickstart_relation_learns_under_ddp(tmp_path_factory):
    """quickstart_relation (Swin, Faster R-CNN, 2fc+RM, learned duplicate removal) on 2 CPU processes with plain DDP
    (an unused parameter would stop it), 3 epochs on 64 synthetic images, 2 per process in aspect-ratio groups;
    COCO AP by the evaluator. Measured (2 shared cores, 30 s of CPU time): val/bbox_AP50 0.0022 after the first
    epoch, 0.020 after the second, 0.047 after the third (AP 0.015): it learns, slowly at this size."""
    import csv
    import json

    from conftest import run_forked
    from vtrain.tasks.detection.synthetic import write

    root, run_dir = tmp_path_factory.mktemp("coco"), tmp_path_factory.mktemp("run")
    write(root, seed=0, train_images=64, val_images=15)
    result = run_forked("experiment=quickstart_relation", f"data.root={root}", "trainer=ddp_cpu", "trainer.max_epochs=3",
                     "data.batch_size=2", "data.group_by_aspect_ratio=true", "data.num_workers=0",
                     "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 58 training images (6 are empty) in aspect-ratio groups of 31 and 27, padded per group to multiples of
    # 2 ranks x 2: 32 + 28, 30 per rank, 15 batches per epoch
    assert metrics["coco_num_images"] == 15 and metrics["global_step"] == 3 * 15
    first_epoch = next(r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["val/bbox_AP50"])
    assert metrics["final"]["val/bbox_AP50"] > 0.025 and metrics["final"]["val/bbox_AP"] > 0.005
    assert metrics["final"]["val/bbox_AP50"] > 5 * float(first_epoch["val/bbox_AP50"])
    detections = json.loads((run_dir / "detections_bbox.json").read_text())
    assert {d["category_id"] for d in detections} <= {1, 4, 7, 10}


@pytest.mark.parametrize("backbone", ["resnet50", "swin"])
def test_relation_detector_trains_every_parameter_and_is_evaluated(backbone, tmp_path):
    """Faster R-CNN with 2fc+RM and the learned duplicate removal on ResNet-50 and Swin: one training step reaches
    every trainable parameter (DDP's condition: the ddp_cpu quickstart above runs it for Swin), and its detections
    go through the COCO evaluator."""
    import json


    from test_detection_models import RESNET50, TINY_SWIN, _batch, _task
    from vtrain.tasks.detection.evaluation import CocoEvaluator

    torch.manual_seed(0)
    task = _task(RESNET50 if backbone == "resnet50" else TINY_SWIN, "faster_rcnn", "task/detector/box_head=relation",
                 "task/detector/nms=learned", "+task.detector.model.box_score_thresh=0.001")
    images, targets = _batch()
    task.train()
    losses = task(images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_duplicate_removal", "loss_objectness",
                           "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    reached = {n for n, p in task.named_parameters() if p.grad is not None}
    assert reached == {n for n, p in task.named_parameters() if p.requires_grad}
    assert any("duplicate_removal.relation" in n for n in reached) and any("relation7" in n for n in reached)
    task.eval()
    with torch.no_grad():
        outputs = task(images)
    assert all(len(o["boxes"]) for o in outputs)
    annotations = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [8, 8, 32, 28], "area": 896.0, "iscrowd": 0}]
    ground_truth = tmp_path / "instances.json"
    ground_truth.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "height": 64, "width": 80},
                   {"id": 2, "file_name": "2.jpg", "height": 72, "width": 64}],
        "annotations": annotations, "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}))
    evaluator = CocoEvaluator(ground_truth, [5, 9], ["a", "b"], ("bbox",))
    evaluator.update([1, 2], outputs)
    assert 0.0 <= evaluator.compute()["bbox"]["AP"] <= 1.0


def test_relationnet_table_sizes():
    """The table's "FPN: 2fc + RM" row: torchvision's Faster R-CNN R101-FPN (BatchNorm affine, 81 classes) plus the
    two relation modules, 2 x 3,149,840 parameters; their MACs at the 1000 test RoIs, against the same detector
    with the 2fc head, are the paper's 12.0B within 5%."""
    from omegaconf import OmegaConf
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from conftest import CONF
    from test_detection_models import detector_config
    from vtrain.config.compose import compose_config
    from vtrain.tasks.detection.module import DetectionTask
    from vtrain.tools.table.macs import task_macs
    from vtrain.tools.table.paper import fill_table

    table = OmegaConf.to_container(OmegaConf.load(CONF / "table" / "relationnet_coco.yaml"))
    table["rows"] = {"fpn_rm": table["rows"]["fpn_rm"]}
    cells = fill_table(table, compose_config("table_main", ["throughput.enabled=false"]))["rows"][0]["cells"]
    with torch.device("meta"):
        backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, norm_layer=nn.BatchNorm2d)
        torchvision_count = sum(p.numel() for p in FasterRCNN(backbone, num_classes=81).parameters())
        two_fc = DetectionTask(OmegaConf.load(CONF / "backbone" / "resnet101.yaml"), {}, {}, num_classes=80,
                               detector=detector_config("faster_rcnn"))
    assert torchvision_count == 60_749_284
    assert round(cells["params"]["measured"] * 1e6) == torchvision_count + 2 * 3_149_840
    assert cells["flops"]["measured"] - task_macs(two_fc, (3, 800, 1024)) / 1e9 == pytest.approx(12.0, rel=0.05)
