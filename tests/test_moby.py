"""MoBY (tasks/selfsup) against the official models/moby.py of SwinTransformer/Transformer-SSL, rebuilt here by
hand, and the linear evaluation's frozen backbone."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose, run_in_process
from vtrain.config import ConfigError
from vtrain.tasks.selfsup.moby import MoBYTask, contrastive_loss, momentum_at

# a ViT of two blocks on 32x32 images (DeiT-S's family); the official MLP shapes, narrowed
TINY_VIT = {"_target_": "vtrain.backbones.VisionTransformer", "img_size": 32, "patch_size": 8, "embed_dim": 16,
            "depth": 2, "num_heads": 2, "drop_path_rate": 0.2}
OPTIM = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.05}
SCHED = {"_target_": "vtrain.training.optim.cosine"}


def tiny_moby(queue_size: int = 8) -> MoBYTask:
    torch.manual_seed(0)
    return MoBYTask(TINY_VIT, OPTIM, SCHED, queue_size=queue_size, hidden_dim=32, out_dim=8)


def test_contrastive_loss_is_the_hand_computed_infonce():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # (dim, K): three known unit keys
    t = 0.2
    expected = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        positive = (qi[0] * ki[0] + qi[1] * ki[1]) / t
        negatives = [(qi[0] * queue[0, j].item() + qi[1] * queue[1, j].item()) / t for j in range(3)]
        expected += -positive + math.log(sum(math.exp(v) for v in [positive] + negatives))
    assert contrastive_loss(q, k, queue, t).item() == pytest.approx(expected / 2, rel=1e-6)


def test_momentum_schedule_and_update_are_the_official_formula():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    model = tiny_moby()
    for p in model.backbone.parameters():  # move the online encoder away from the target
        p.data.add_(torch.randn_like(p))
    online = [p.clone() for p in model.backbone.parameters()] + [p.clone() for p in model.projector.parameters()]
    target = ([p.clone() for p in model.backbone_momentum.parameters()]
              + [p.clone() for p in model.projector_momentum.parameters()])
    model.momentum_update(0.9)
    after = list(model.backbone_momentum.parameters()) + list(model.projector_momentum.parameters())
    assert len(after) == len(online)
    for a, o, t in zip(after, online, target):
        torch.testing.assert_close(a, t * 0.9 + o * 0.1)


def test_queue_replaces_the_oldest_keys_at_one_shared_pointer():
    model = tiny_moby(queue_size=6)
    start1, start2 = model.queue1.clone(), model.queue2.clone()
    keys = [torch.full((2, 8), float(i)) for i in range(8)]
    model.enqueue(keys[0], keys[1])  # columns 0-1
    model.enqueue(keys[2], keys[3])  # columns 2-3
    torch.testing.assert_close(model.queue1[:, 4:], start1[:, 4:])  # not reached yet
    model.enqueue(keys[4], keys[5])  # columns 4-5, the pointer wraps to 0
    model.enqueue(keys[6], keys[7])  # replaces columns 0-1
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue1[0], torch.tensor([6.0, 6, 2, 2, 4, 4]))
    torch.testing.assert_close(model.queue2[0], torch.tensor([7.0, 7, 3, 3, 5, 5]))
    assert not torch.equal(start2, model.queue2)
    with pytest.raises(ConfigError, match="queue_size=6 is not a multiple"):
        model.enqueue(torch.zeros(4, 8), torch.zeros(4, 8))


def test_loss_backward_reaches_the_online_branch_only_and_matches_the_official_forward():
    model = tiny_moby()
    model.train()
    torch.manual_seed(1)
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.manual_seed(2)
    loss, k1, k2 = model.loss(v1, v2)
    # the official MoBY.forward, step by step, with the same drop-path draws
    torch.manual_seed(2)
    p1 = F.normalize(model.predictor(model.projector(model.backbone.forward_pooled(v1))), dim=1)
    p2 = F.normalize(model.predictor(model.projector(model.backbone.forward_pooled(v2))), dim=1)
    with torch.no_grad():
        z1 = F.normalize(model.projector_momentum(model.backbone_momentum.forward_pooled(v1)), dim=1)
        z2 = F.normalize(model.projector_momentum(model.backbone_momentum.forward_pooled(v2)), dim=1)

    def official(q, k, queue):
        logits = torch.cat([torch.einsum("nc,nc->n", q, k).unsqueeze(-1), torch.einsum("nc,ck->nk", q, queue)], 1)
        return F.cross_entropy(logits / 0.2, torch.zeros(len(q), dtype=torch.long))

    torch.testing.assert_close(loss, official(p1, z2, model.queue2) + official(p2, z1, model.queue1))
    torch.testing.assert_close(k1, z1)
    loss.backward()
    assert all(p.grad is None for p in model.backbone_momentum.parameters())
    assert all(p.grad is None for p in model.projector_momentum.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # asymmetric drop path: online 0.2 ...
    assert model.backbone_momentum.blocks[-1].drop_path1.__class__.__name__ == "Identity"  # ... target none


def test_moby_pretrains_then_a_linear_evaluation_freezes_the_backbone(imagenet_root, tmp_path):
    tiny_vit = ["backbone=vit_s16", "backbone.img_size=32", "backbone.patch_size=8", "backbone.embed_dim=16",
                "backbone.depth=2", "backbone.num_heads=2", "backbone.drop_path_rate=0.2", "trainer=cpu",
                "data.num_classes=4", "data.num_workers=0", "callbacks.progress_bar=null"]
    run = tmp_path / "moby"
    run_in_process("task=moby", "data=imagenet_two_view", *tiny_vit, f"data.root={imagenet_root}",
                   "data.batch_size=8", "task.queue_size=16", "task.hidden_dim=32", "task.out_dim=8",
                   "trainer.max_epochs=1", "trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", f"hydra.run.dir={run}")
    losses = [float(row["train/loss_step"]) for row in _csv_rows(run) if row.get("train/loss_step")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] != losses[0]
    checkpoint = sorted(run.rglob("last.ckpt"))[0]

    # the linear evaluation: the pre-trained online encoder, every backbone parameter frozen
    from vtrain.training.build import build_task

    cfg = compose(*tiny_vit, "task.linear_probe=true", "task.mixup=null")
    module = build_task(cfg)
    module.load_pretrained(str(checkpoint))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in module.backbone.state_dict().items():
        torch.testing.assert_close(value, state[f"backbone.{name}"])
    before = {n: p.clone() for n, p in module.backbone.named_parameters()}
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    module.train()
    F.cross_entropy(module(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in module.backbone.parameters())
    assert module.head.weight.grad is not None
    for name, p in module.backbone.named_parameters():
        assert torch.equal(p, before[name]), name
    assert OmegaConf.select(cfg, "task.linear_probe") is True


def _csv_rows(run):
    import csv

    rows = []
    for path in run.rglob("metrics.csv"):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def test_a_linear_evaluation_without_pretrained_weights_is_one_line():
    from vtrain.config.validate import check_pretrained

    with pytest.raises(ConfigError, match="task.linear_probe=true .* pretrained is null"):
        check_pretrained(compose("experiment=moby_swin_t_linear"))
    check_pretrained(compose("experiment=moby_swin_t_linear", "pretrained=null", "task.linear_probe=false"))


def test_two_views_are_the_official_byol_transforms():
    """The official data/build.py transform_1 / transform_2 (AUG.SSL_AUG_TYPE byol), rebuilt here, give the same
    tensors from the same random state."""
    import random

    import numpy as np
    from PIL import Image, ImageFilter, ImageOps
    from torchvision import transforms as T

    from vtrain.tasks.selfsup.data import TwoViewDataModule

    class OfficialBlur:
        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))

    def official(blur, solarize):
        steps = [T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                 T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                 T.RandomApply([OfficialBlur()], p=blur)]
        steps += [T.RandomApply([ImageOps.solarize], p=0.2)] if solarize else []
        return T.Compose(steps + [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    ours = TwoViewDataModule("unused", 1, img_size=32).views()
    for seed in range(8):
        for view, reference in zip(ours, (official(1.0, False), official(0.1, True))):
            outputs = []
            for transform in (view, reference):
                random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
                outputs.append(transform(image))
            torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
