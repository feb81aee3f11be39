"""The whole flow of a run: compose config -> validate -> build data, model, trainer -> fit / evaluate -> metrics.json."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vtrain.config import ConfigError
from vtrain.config.command import fail
from vtrain.config.compose import compose_config, ensure_output_dir
from vtrain.config.stored import trusted_config
from vtrain.config.validate import check_values, keys_not_taken, validate
from vtrain.training.build import build_task
from vtrain.training.callbacks.metrics_json import MetricsJSON
from vtrain.training.checkpoint import (
    description,
    load_task_weights,
    newest_valid_checkpoint,
    read_checkpoint,
    require_fit,
    unwrap_state_dict,
)
from vtrain.training.lightning_internals import check_version
from vtrain.training.pretrained import download_weights
from vtrain.training.rundir import RunDirectoryLock, is_first_process
from vtrain.training.steps import training_steps
from vtrain.training.sweep import record_failure
from vtrain.training.terminal import quiet_third_parties, summary_table
from vtrain.training.trainer import build_trainer, hydra_ddp_job

log = logging.getLogger("vtrain")


def run(cfg: DictConfig) -> float | None:
    """Train (``mode=train``) or evaluate (``mode=eval``) the composed experiment; return the monitored metric.

    Called by ``python -m vtrain`` (Hydra's app) or from Python with a config of :func:`vtrain.compose`: then the
    run directory is ``cfg.output_dir`` (``outputs/runs/<date>/<time>`` unless set), locked and given the config
    as ``.hydra/config.yaml``, and bad input raises :class:`vtrain.ConfigError` instead of ending the process.
    """
    check_version()
    quiet_third_parties()
    if not HydraConfig.initialized():
        return _run_outside_hydra(cfg)
    return _run(cfg)


def _run_outside_hydra(cfg: DictConfig) -> float | None:
    output_dir = ensure_output_dir(cfg)
    lock = RunDirectoryLock(output_dir) if is_first_process() else None
    try:
        (output_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / ".hydra" / "config.yaml")
        return _run(cfg)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig) -> float | None:
    started = time.monotonic()  # the summary's wall time: from here (the training stack imported) to the summary
    try:
        check_values(cfg)  # types and ranges, before anything is built with them
        datamodule = instantiate(cfg.data)
        if cfg.mode == "train" and not cfg.get("ckpt_path"):
            _refuse_a_finished_run(Path(cfg.output_dir))
        if cfg.get("ckpt_path") == "auto":  # resume this run directory's newest valid checkpoint, if any
            with open_dict(cfg):
                found = newest_valid_checkpoint(Path(cfg.output_dir) / "checkpoints")
                cfg.ckpt_path = str(found) if found else None
            log.info("ckpt_path=auto: %s", cfg.ckpt_path or "no checkpoint yet, starting from scratch")
        validate(cfg, datamodule, download_weights)  # before any worker or DDP process starts
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        log.info("seed %d", cfg.seed)
        module = build_task(cfg)
        module.use_dataset(datamodule.info())
        strict = bool(cfg.get("pretrained_strict", True))
        if cfg.mode == "train" and cfg.get("pretrained") and not cfg.get("ckpt_path"):  # a resumed run has its weights
            module.load_pretrained(cfg.pretrained, strict=strict)
        resumed_step = _resumed_step(cfg, module) if cfg.mode == "train" else None
        if cfg.mode == "eval" and cfg.get("ckpt_path"):
            load_task_weights(module, cfg.ckpt_path, strict=strict)
        if cfg.get("grad_checkpointing"):
            module.set_grad_checkpointing()
        if cfg.get("compile"):  # true, or torch.compile's arguments: {mode: max-autotune}, {backend: ...}
            options = OmegaConf.to_container(cfg.compile) if isinstance(cfg.compile, DictConfig) else {}
            module.compile_backbone(**options)
    except Exception as e:  # noqa: BLE001 - Hydra wraps errors raised in constructors: find ours inside
        cause = _config_error_inside(e, cfg)
        if cause is None or not HydraConfig.initialized():
            raise
        return fail(cause)

    with hydra_ddp_job():
        trainer, metrics = build_trainer(cfg)
        try:  # a checkpoint that cannot be read or is refused, data files that cannot be read: one line
            if cfg.mode == "train":
                module.training_steps = training_steps(trainer, datamodule)
                # weights_only: the resumed checkpoint too (vtrain.training.checkpoint.CheckpointIO reads it so anyway)
                trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
                if resumed_step is not None and trainer.global_step == resumed_step and not trainer.interrupted:
                    log.warning("%s is the end of a finished run (step %d): nothing to train (raise trainer.max_epochs "
                                "or trainer.max_steps to train longer)", cfg.ckpt_path, resumed_step)
                if _final_weights_unvalidated(trainer, metrics):
                    trainer.validate(module, datamodule=datamodule)  # metrics.json's "final" is of the final weights
            else:
                trainer.validate(module, datamodule=datamodule)
        except ConfigError as e:
            if not HydraConfig.initialized():
                raise
            return fail(e)
        record = _metrics_record(cfg, metrics)
        if trainer.is_global_zero and record is not None:
            evaluated = cfg.get("ckpt_path") if cfg.mode == "eval" else None
            print(summary_table(record, cfg.output_dir, evaluated, time.monotonic() - started), flush=True)
    return _monitored_value(record, module)


def _resumed_step(cfg: DictConfig, module: pl.LightningModule) -> int | None:
    """The step a resumed training run starts from (None: not a resume), once its checkpoint is found to fit the
    model and ``trainer.max_epochs``: one line each, not Lightning's list of keys or its traceback."""
    if not cfg.get("ckpt_path") or not Path(cfg.ckpt_path).is_file():
        return None
    resumed = read_checkpoint(cfg.ckpt_path)
    require_fit(module, unwrap_state_dict(resumed), cfg.ckpt_path)
    max_epochs, epoch = cfg.trainer.get("max_epochs"), resumed.get("epoch")
    if max_epochs not in (None, -1) and isinstance(epoch, int) and epoch > max_epochs:  # Lightning's condition
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is at epoch {epoch}, past trainer.max_epochs={max_epochs}: "
                          f"give trainer.max_epochs={epoch + 1} or more to resume it")
    return resumed.get("global_step")


def _config_error_inside(error: BaseException, cfg: DictConfig) -> ConfigError | None:
    """The ``ConfigError`` an exception wraps (Hydra wraps what constructors raise), or one for a constructor given a
    key it does not take (a key an experiment set for another choice of a group: ``experiment=quickstart
    backbone=resnet26`` keeps the quickstart's ``backbone.img_size``)."""
    cause: BaseException | None = error
    where = None  # the key of the innermost config being instantiated (Hydra's full_key)
    while cause is not None and not isinstance(cause, ConfigError):
        if "\nfull_key: " in str(cause):
            where = str(cause).rsplit("\nfull_key: ", 1)[-1].strip() or where
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause) and where:
            stray = keys_not_taken(OmegaConf.select(cfg, where)) or [str(cause).rsplit("argument ", 1)[-1].strip("'")]
            return ConfigError(f"{where}: {cause} (set for another choice of that group, by the experiment?): drop "
                               f"{'it' if len(stray) == 1 else 'them'} with {' '.join(f'~{where}.{k}' for k in stray)}")
        cause = cause.__cause__
    return cause


def _refuse_a_finished_run(output_dir: Path) -> None:
    """A new run (no ``ckpt_path``) in a directory that holds another run would append to its log and write its
    checkpoints beside the other's: one line instead."""
    held = [name for name in ("metrics.json", "checkpoints") if (output_dir / name).exists()
            and (name != "checkpoints" or any((output_dir / name).glob("*.ckpt")))]
    if held:
        raise ConfigError(f"{output_dir} holds a run already ({', '.join(held)}): resume it with ckpt_path=auto, or "
                          "start the new run in another directory (hydra.run.dir=... / output_dir=...)")


def _final_weights_unvalidated(trainer: pl.Trainer, metrics: MetricsJSON | None) -> bool:
    """True when training ended without a validation of its last weights: the validation interval does not
    divide the run, or the run resumed from a checkpoint written after its last step but before that step's
    validation (Lightning then considers the loop done)."""
    return (
        metrics is not None and trainer.global_step > 0 and bool(trainer.limit_val_batches)
        and metrics.validated_step != trainer.global_step and not trainer.interrupted
    )


def _metrics_record(cfg: DictConfig, metrics: MetricsJSON | None) -> dict | None:
    """What ``metrics.json`` holds: in memory where this process wrote it, else (another DDP rank) the file."""
    if metrics is not None and metrics.payload is not None:
        return metrics.payload
    path = Path(cfg.output_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _monitored_value(record: dict | None, module: pl.LightningModule) -> float | None:
    if record is None:
        return None
    return record.get("best", {}).get(module.monitor, record.get("final", {}).get(module.monitor))


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job. In a sweep a failing point is recorded and the others go on; the sweep's summary
    (:class:`vtrain.training.sweep.SweepSummary`) lists each point's status and metric."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return run(cfg)  # its directory was locked by vtrain.training.rundir.LockRunDirectory
    lock = None
    try:
        lock = RunDirectoryLock(cfg.output_dir) if is_first_process() else None
        return run(cfg)
    except Exception as e:  # noqa: BLE001 - any failure of one point
        log.exception("sweep point failed: %s", e)
        record_failure(cfg.output_dir, e)
        return float("nan")  # what optimisation sweepers (Optuna) read as a failed trial
    finally:
        if lock is not None:
            lock.release()


def evaluate_job(cfg: DictConfig) -> float | None:
    """``python -m vtrain.eval``'s job: :func:`run_job` in ``mode=eval``, on the model a checkpoint describes when no
    ``experiment=`` is given, on the CPU when the recipe's GPUs are not here."""
    with open_dict(cfg):
        cfg.mode = "eval"
    overrides = list(HydraConfig.get().overrides.task)
    try:
        model_from_checkpoint(cfg, overrides)
    except ConfigError as e:
        return fail(e)
    evaluate_on_available_device(cfg, overrides)
    return run_job(cfg)


def evaluate_on_available_device(cfg: DictConfig, overrides: list[str]) -> None:
    """A recipe's GPU trainer (``trainer=ddp``) on a machine without CUDA, for an evaluation whose command line
    chose no trainer: ``trainer=cpu`` instead (an evaluation gives the same numbers on either)."""
    import torch

    chosen = any(o.lstrip("+~").split("=", 1)[0].split(".")[0] in ("trainer", "trainer/") for o in overrides)
    if chosen or cfg.trainer.get("accelerator") not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    with open_dict(cfg):
        cfg.trainer = compose_config("train", ["trainer=cpu"]).trainer
    log.info("no CUDA device: evaluating on the CPU (trainer=cpu; trainer=... chooses another)")


def model_keys(stored: DictConfig) -> list[str]:
    """What a stored config says about its model: ``task``, ``data``, and each top-level group the task's config
    holds a copy of (it is stored resolved: ``backbone: ${backbone}``, video's ``model: ${video_backbone}``)."""
    parts = [value for value in stored.task.values() if isinstance(value, DictConfig)]
    return ["task", "data"] + [key for key, value in stored.items_ex(resolve=False) if key not in ("task", "data")
                               and isinstance(value, DictConfig) and any(value == part for part in parts)]


def model_from_checkpoint(cfg: DictConfig, overrides: list[str]) -> None:
    """``python -m vtrain.eval ckpt_path=FILE`` without ``experiment=``: the model and data the checkpoint describes
    (its stored config's task, data and backbone), with the command line's changes to them (``data.root=...``)."""
    path = cfg.get("ckpt_path")
    if not path or path == "auto" or not Path(path).is_file() or any(o.startswith("experiment=") for o in overrides):
        return
    stored = description(read_checkpoint(path, mmap=True), Path(path)).get("config")
    if not stored:
        return
    described = trusted_config(stored, path)  # data: it does not choose what runs
    keys = model_keys(described)
    changes = [o.lstrip("+~") for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] in keys
               and "." in o.split("=", 1)[0]]
    with open_dict(cfg):
        for key in keys:
            cfg[key] = described[key]
        cfg.merge_with_dotlist(changes)
    log.info("evaluating the model and data %s describes (experiment= would replace them)", path)
