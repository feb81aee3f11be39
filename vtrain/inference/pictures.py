"""Pictures of validation predictions logged during training."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from vtrain.inference.visualize import side_by_side
from vtrain.training.module import PredictOptions


class PredictionPictures(pl.Callback):
    """A few validation inputs' predictions as pictures, logged to TensorBoard and wandb every ``every_n_epochs``
    validations: the pictures ``python -m vtrain.predict`` draws (boxes and masks with names and scores, the
    segmentation overlay with its legend, the top-5 bars, a video's frames), with the ground truth drawn the same
    way beside each where the data has it. Inactive unless one of the run's loggers
    keeps images (``logger=tensorboard`` or ``logger=wandb``; the CSV logger does not).

    Args:
        every_n_epochs: epochs between two sets of pictures (logged at the first validation of epochs 0, N, 2N...).
        num_images: the first validation files drawn, the same ones each time.
        score_threshold, max_detections, top_k: what a picture shows (:class:`vtrain.training.module.PredictOptions`).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, score_threshold: float = 0.3,
                 max_detections: int = 20, top_k: int = 5):

        self.every_n_epochs, self.num_images = max(1, every_n_epochs), num_images
        self.options = PredictOptions(top_k=top_k, score_threshold=score_threshold, max_detections=max_detections)
        self._logged_epoch: int | None = None

    @staticmethod
    def image_loggers(trainer: pl.Trainer) -> list[Any]:
        from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

        return [logger for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, WandbLogger))]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.image_loggers(trainer):
            return
        epoch = trainer.current_epoch
        if epoch % self.every_n_epochs or epoch == self._logged_epoch or trainer.datamodule is None:
            return
        self._logged_epoch = epoch
        self.log_pictures(trainer, pl_module)

    def pictures(self, datamodule: Any, pl_module: pl.LightningModule) -> list[tuple[str, torch.Tensor]]:
        """(file name, picture) of the first ``num_images`` validation files, the model in eval mode: the ground
        truth beside the prediction where the data module gives it (``example_truths``) and the task draws it
        (``truth_record``), the prediction alone otherwise."""
        dataset = datamodule.predict_set(datamodule.example_files(self.num_images))
        items = [dataset[i] for i in range(len(dataset))]
        truths = datamodule.example_truths(len(items)) or [None] * len(items)
        training = pl_module.training
        pl_module.eval()
        try:
            outputs = pl_module.predict_batch([item["input"] for item in items])
        finally:
            pl_module.train(training)
        pictures = []
        for item, output, truth in zip(items, outputs, truths):
            picture = pl_module.draw_prediction(item["original"], pl_module.prediction_record(output, self.options),
                                                self.options)
            truth_record = None if truth is None else pl_module.truth_record(truth)
            if truth_record is not None:
                drawn = pl_module.draw_prediction(item["original"], truth_record, self.options)
                picture = side_by_side([("ground truth", drawn), ("prediction", picture)])
            pictures.append((Path(item["path"]).name, picture))
        return pictures

    def log_pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        pictures = self.pictures(trainer.datamodule, pl_module)
        for logger in self.image_loggers(trainer):
            if isinstance(logger, TensorBoardLogger):
                for k, (name, picture) in enumerate(pictures):
                    logger.experiment.add_image(f"predictions/{k}", picture, global_step=trainer.global_step,
                                                dataformats="CHW")
            else:  # wandb
                logger.log_image(key="predictions", images=[p.permute(1, 2, 0).numpy() for _, p in pictures],
                                 caption=[name for name, _ in pictures])
