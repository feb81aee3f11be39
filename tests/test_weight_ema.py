"""The average of the weights (``callbacks.weight_ema``, DeiT's EMA) on a tiny Lightning fit: each update is timm's
ModelEmaV2's, validation sees the average, a resumed run continues it exactly and an evaluation loads it."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vtrain.config import ConfigError
from vtrain.training.callbacks.weight_ema import WeightEMA
from vtrain.training.checkpoint import load_task_weights

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY = 0.75  # far from 1, so that four updates move the average visibly


class Tiny(pl.LightningModule):
    """Two batches of 4 per epoch, SGD at a large lr; records the weights after every optimizer step and those
    each validation sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        generator = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_train_start(self):
        self.steps.append(self._weights())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.steps.append(self._weights())

    def validation_step(self, batch, batch_idx):
        self.validated.append(self._weights())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=8)


def _fit(max_steps: int, ckpt_path=None) -> tuple[Tiny, WeightEMA, pl.Trainer]:
    module, average = Tiny(), WeightEMA(decay=DECAY)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.callbacks.append(average)
    trainer.fit(module, ckpt_path=ckpt_path, weights_only=True)
    return module, average, trainer


def test_average_is_timms_validated_resumed_and_evaluated(tmp_path):
    module, average, trainer = _fit(max_steps=4)  # two epochs, a validation after each

    # timm's ModelEmaV2 replayed over the weights after each of the four optimizer steps
    replica = copy.deepcopy(module.net)
    replica.load_state_dict({k[len("net."):]: v for k, v in module.steps[0].items()})
    reference = ModelEmaV2(replica, decay=DECAY)
    after = []
    for weights in module.steps[1:]:
        replica.load_state_dict({k[len("net."):]: v for k, v in weights.items()})
        reference.update(replica)
        after.append({f"net.{k}": v.clone() for k, v in reference.module.state_dict().items()})
    assert len(after) == 4
    for key, value in average.average.items():
        torch.testing.assert_close(value, after[-1][key], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(value, module.steps[-1][key])  # the average is not the weights

    # each validation saw the average of its time (after steps 2 and 4), and training went on from its weights
    assert len(module.validated) == 2
    for seen, expected in zip(module.validated, (after[1], after[3])):
        for key in expected:
            torch.testing.assert_close(seen[key], expected[key], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(v, module.steps[-1][k]) for k, v in module.state_dict().items())

    # a checkpoint written during a validation (a preemption) holds the trained weights, not the average
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    average.on_validation_start(trainer, module)
    assert all(torch.equal(v, average.average[k]) for k, v in module.state_dict().items())
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    average.on_save_checkpoint(trainer, module, checkpoint)
    average.on_validation_end(trainer, module)
    for weights in (checkpoint["state_dict"], module.state_dict()):
        assert all(torch.equal(v, trained[k]) for k, v in weights.items())

    # stopped after step 2 and resumed to step 4: the same weights and the same average, exactly
    _, _, first = _fit(max_steps=2)
    path = tmp_path / "step2.ckpt"
    first.save_checkpoint(path)
    resumed, resumed_average, _ = _fit(max_steps=4, ckpt_path=path)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in resumed.state_dict().items())
    assert all(torch.equal(v, average.average[k]) for k, v in resumed_average.average.items())

    # an evaluation of the checkpoint loads the average its run validated
    evaluated = Tiny()
    load_task_weights(evaluated, path)
    assert all(torch.equal(v, after[1][k]) for k, v in evaluated.state_dict().items())


def test_a_decay_outside_zero_one_is_one_line():
    with pytest.raises(ConfigError, match=r"^callbacks.weight_ema.decay=1.5 is not an average's decay: give one in"):
        WeightEMA(decay=1.5)
