"""``python -m vtrain experiment=... [key=value ...]``: see :func:`vtrain.cli.run` for the whole flow.

Hydra composes the config before calling the job. The job imports the training stack (torch, Lightning,
torchmetrics: about six seconds), so ``--help``, ``--cfg job`` and a mistyped name answer before it is loaded.
"""
import hydra
from omegaconf import DictConfig

from vtrain.config.command import check_hydra_command_line
from vtrain.config.compose import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vtrain.cli import run_job  # the training stack, once there is a config to run

    return run_job(cfg)


if __name__ == "__main__":
    check_hydra_command_line("train")  # a mistyped name: one line with the nearest one, before Hydra's message
    main()
