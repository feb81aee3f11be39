"""``python -m vtrain.eval experiment=... ckpt_path=...``: evaluate a checkpoint (same as ``mode=eval``); the training
stack is imported once the config is composed, as ``python -m vtrain`` does."""
import hydra
from omegaconf import DictConfig

from vtrain.config.command import check_hydra_command_line
from vtrain.config.compose import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def evaluate(cfg: DictConfig) -> float | None:
    from vtrain.cli import evaluate_job  # the training stack, once there is a config to run

    return evaluate_job(cfg)


if __name__ == "__main__":
    check_hydra_command_line("train")  # a mistyped name: one line with the nearest one, before Hydra's message
    evaluate()
