"""MoBY (Xie et al., "Self-Supervised Learning with Swin Transformers", arXiv:2105.04553): MoCo v2's key queue and
momentum encoder with BYOL's asymmetric predictor, as the official ``models/moby.py`` of
SwinTransformer/Transformer-SSL builds it.

The online branch is ``backbone -> projector -> predictor``; the target branch ``backbone_momentum ->
projector_momentum`` follows it by a momentum average (no gradient). Each view's prediction is contrasted with the
other view's target key (the positive) and with a queue of past target keys of that other view (the negatives).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from vtrain.config import ConfigError
from vtrain.training.module import TaskModule


class MoBYMLP(nn.Module):
    """The official ``MoBYMLP``: ``layers - 1`` blocks of Linear -> BatchNorm1d -> ReLU (width ``hidden_dim``),
    then a Linear to ``out_dim``. Projector and predictor: 2 layers, 4096 hidden, 256 out (paper Sec. 3.1)."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256, layers: int = 2):
        super().__init__()
        hidden: list[nn.Module] = [nn.Identity()]
        for i in range(layers - 1):
            hidden += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                       nn.ReLU(inplace=True)]
        self.linear_hidden = nn.Sequential(*hidden)
        self.linear_out = nn.Linear(in_dim if layers == 1 else hidden_dim, out_dim) if layers >= 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.linear_hidden(x))


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of the official ``contrastive_loss``: logits ``[q.k, q.queue] / temperature`` (queries and keys
    L2-normalised, ``queue`` (dim, K) of normalised keys), the positive at index 0."""
    positive = (query * key).sum(dim=1, keepdim=True)
    negative = query @ queue.detach().clone()  # a copy: the queue is overwritten before backward (enqueue)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """The official momentum schedule: ``1 - (1 - base) * (cos(pi k / K) + 1) / 2``, from ``base`` at step 0 to
    1 at the last step ``K`` (MoBY's Sec. 3.1, BYOL's schedule)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0


class MoBYTask(TaskModule):
    """MoBY pre-training of ``backbone`` (any vtrain classifier trunk: ``forward_pooled`` gives its embedding).

    Args:
        backbone: the backbone config; the online encoder keeps its ``drop_path_rate`` (the official
            ``ONLINE_DROP_PATH_RATE``), the momentum encoder is built with ``target_drop_path_rate``.
        momentum: the momentum at the first step (``CONTRAST_MOMENTUM``), raised to 1 by :func:`momentum_at`.
        temperature: of the contrastive loss (``CONTRAST_TEMPERATURE``).
        queue_size: keys kept per view (``CONTRAST_NUM_NEGATIVE``); a multiple of the batch over all devices.
        proj_layers, pred_layers, hidden_dim, out_dim: the projector and predictor (:class:`MoBYMLP`).
    Its checkpoint's ``backbone.*`` weights are the online encoder, which a linear evaluation loads with
    ``pretrained=<checkpoint>`` (the official ``load_pretrained`` takes ``encoder.*`` alike).
    """

    def __init__(self, backbone: Mapping[str, Any], optim: Mapping[str, Any], sched: Mapping[str, Any],
                 target_drop_path_rate: float = 0.0, momentum: float = 0.99, temperature: float = 0.2,
                 queue_size: int = 4096, proj_layers: int = 2, pred_layers: int = 2, hidden_dim: int = 4096,
                 out_dim: int = 256, monitor: str = "val/loss", monitor_mode: str = "min"):
        super().__init__(optim, sched, monitor, monitor_mode)
        self.backbone = instantiate(backbone)
        self.backbone_momentum = instantiate(backbone, drop_path_rate=target_drop_path_rate)
        features = self.backbone.num_features
        self.projector = MoBYMLP(features, hidden_dim, out_dim, proj_layers)
        self.projector_momentum = MoBYMLP(features, hidden_dim, out_dim, proj_layers)
        self.predictor = MoBYMLP(out_dim, hidden_dim, out_dim, pred_layers)
        for online, target in self._encoder_pairs():
            target.load_state_dict(online.state_dict())
            target.requires_grad_(False)  # moved by the momentum average only
        self.base_momentum, self.temperature, self.queue_size = momentum, temperature, queue_size
        # one queue of target keys per view, random unit vectors at the start (the official __init__)
        self.register_buffer("queue1", F.normalize(torch.randn(out_dim, queue_size), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(out_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _encoder_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projector, self.projector_momentum)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The online encoder's embedding (what a linear evaluation reads)."""
        return self.backbone.forward_pooled(x)

    # ------------------------------------------------------------------ the official MoBY.forward, in parts
    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """target <- target * m + online * (1 - m), parameter by parameter (``_momentum_update_key_encoder``)."""
        for online, target in self._encoder_pairs():
            for p_online, p_target in zip(online.parameters(), target.parameters()):
                p_target.mul_(momentum).add_(p_online.detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def enqueue(self, keys1: torch.Tensor, keys2: torch.Tensor) -> None:
        """Each view's keys (of every device: the official ``dist_collect``) replace the oldest columns of its
        queue, at one shared pointer that wraps at ``queue_size`` (``_dequeue_and_enqueue``)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            keys1, keys2 = (self.all_gather(k).flatten(0, 1) for k in (keys1, keys2))
        batch, ptr = keys1.shape[0], int(self.queue_ptr)
        if self.queue_size % batch:
            raise ConfigError(f"task.queue_size={self.queue_size} is not a multiple of the batch over all devices "
                              f"({batch}): the official queue takes whole batches; set it to a multiple of {batch}")
        self.queue1[:, ptr:ptr + batch] = keys1.T
        self.queue2[:, ptr:ptr + batch] = keys2.T
        self.queue_ptr[0] = (ptr + batch) % self.queue_size

    def queries(self, view: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.projector(self.backbone.forward_pooled(view))), dim=1)

    @torch.no_grad()
    def keys(self, view: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector_momentum(self.backbone_momentum.forward_pooled(view)), dim=1)

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The symmetric loss (the two directions summed, as the official code) and the two views' keys."""
        q1, q2 = self.queries(view1), self.queries(view2)
        k1, k2 = self.keys(view1), self.keys(view2)
        loss = (contrastive_loss(q1, k2, self.queue2, self.temperature)
                + contrastive_loss(q2, k1, self.queue1, self.temperature))
        return loss, k1, k2

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        view1, view2 = batch
        # the official forward moves the target before computing its keys, at step k of K (k from 0)
        total = self.training_steps.total if self.training_steps is not None else self.trainer.estimated_stepping_batches
        self.momentum_update(momentum_at(self.global_step, int(total), self.base_momentum))
        loss, k1, k2 = self.loss(view1, view2)
        self.enqueue(k1, k2)
        self.log_train_loss(loss, view1.shape[0])
        return loss

    def validation_step(self, batch: list[torch.Tensor] | None, batch_idx: int) -> None:
        if batch is None:
            return
        view1, view2 = batch
        loss, _, _ = self.loss(view1, view2)  # the queue and the target stay as training left them
        self.log("val/loss", loss, sync_dist=True, batch_size=view1.shape[0])
