"""Checkpoint and run-file safety: nothing is unpickled, saves are atomic beside their target, last.ckpt is the
newest state, and a resumed run keeps its metrics.csv."""
from __future__ import annotations

import csv
import errno
import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import ROOT, TINY_CLS, compose, run_cli, run_in_process
from vtrain.config import ConfigError
from vtrain.training.checkpoint import RefusedCheckpoint, newest_valid_checkpoint, read_checkpoint


class _Payload:
    """What a hostile checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 10**6, "state_dict": {}, "payload": _Payload(f"touch {marker}")}, path)


def _lines_naming(output: str, path) -> list[str]:
    return [line for line in output.splitlines() if "refused checkpoint" in line and str(path) in line]


# ---------------------------------------------------------------------------------------------- never unpickled
def test_refusal_names_what_was_refused_and_never_suggests_switching_the_check_off(tmp_path):
    marker = tmp_path / "executed"
    _plant(tmp_path / "hostile.ckpt", marker)
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"model": _Payload(f"touch {marker}")}))
    for name, refused in [("hostile.ckpt", "its pickle would call posix.system"),
                          ("legacy.pth", "its pickle uses an instruction the weights-only reader does not run")]:
        with pytest.raises(RefusedCheckpoint) as error:
            read_checkpoint(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"refused checkpoint {tmp_path / name}: {refused}"), message
        assert message.endswith("vtrain reads checkpoints with torch.load(weights_only=True) only and will not unpickle it")
        assert "\n" not in message and "\x1b" not in message
        assert "False" not in message and "add_safe_globals" not in message and "trust" not in message
    assert not marker.exists()


def test_newest_valid_checkpoint_skips_a_refused_pickle(tmp_path, caplog):
    marker = tmp_path / "executed"
    torch.save({"global_step": 6, "state_dict": {}}, tmp_path / "epoch000-step0000006.ckpt")
    _plant(tmp_path / "last.ckpt", marker)
    assert newest_valid_checkpoint(tmp_path).name == "epoch000-step0000006.ckpt"
    assert not marker.exists()
    assert len(_lines_naming(caplog.text, tmp_path / "last.ckpt")) == 1


def test_a_planted_pickle_is_never_run_by_training_resume_or_evaluation(imagenet_root, tmp_path, monkeypatch, caplog):
    """A hostile last.ckpt in a run directory: ckpt_path=auto (training and evaluation) skips it with one line, and
    passed explicitly (Lightning's own resume, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set) it is a one-line
    error. The command inside never runs. The last resume is the command line's, its output free of Lightning's
    weights_only warning."""
    run, marker = tmp_path / "run", tmp_path / "executed"
    args = [*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "trainer.limit_val_batches=1"]
    run_in_process(*args)  # a good checkpoint at step 6
    hostile = run / "checkpoints" / "last.ckpt"
    _plant(hostile, marker)
    unsafe_env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    with pytest.raises(ConfigError) as error:
        run_in_process(*args, f"ckpt_path={hostile}", "trainer.max_epochs=2")
    assert str(error.value).startswith(f"refused checkpoint {hostile}: its pickle would call") and not marker.exists()

    caplog.set_level(logging.INFO, logger="vtrain")
    run_in_process(*args, "ckpt_path=auto", "mode=eval")
    assert not marker.exists()
    assert len(_lines_naming(caplog.text, hostile)) == 1 and "epoch000-step0000006.ckpt" in caplog.text

    result = run_cli(*args, "ckpt_path=auto", "trainer.max_epochs=2", env=unsafe_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not marker.exists(), output[-3000:]
    assert len(_lines_naming(output, hostile)) == 1
    assert "weights_only` set to `False`" not in output and "\x1b[1m" not in output
    assert read_checkpoint(hostile)["global_step"] == 12  # resumed from step 6 and replaced the planted file


@pytest.fixture(scope="session")  # once per worker: pytest-xdist interleaves modules, a module fixture is remade
def mid_epoch_run(imagenet_root, tmp_path_factory):
    """A tiny run stopped mid-epoch at step 4 with its checkpoints (read, never changed, by the tests that use it)."""
    run = tmp_path_factory.mktemp("mid_epoch") / "run"
    run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "trainer.limit_val_batches=1",
                   "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.save_top_k=-1",
                   "trainer.max_steps=4")  # stops mid-epoch: the loader's position is in the checkpoint
    return run


@pytest.mark.xdist_group("mid_epoch_run")
def test_checkpoints_vtrain_writes_need_no_allow_listed_class(mid_epoch_run):
    """Everything a real run saves (weights, optimizer and scheduler state, loops, callbacks, the data loader's
    position) loads with torch.load(weights_only=True) and no add_safe_globals."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    run = mid_epoch_run
    paths = sorted((run / "checkpoints").glob("*.ckpt"))
    assert paths
    for path in paths:
        assert get_unsafe_globals_in_checkpoint(path) == [], path
        assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == 4


# ----------------------------------------------------------------------------------------------- atomic writes
def _configured_checkpoint_io(tmp_path):
    """The checkpoint I/O of the trainer a run builds from conf/trainer."""
    from hydra.utils import instantiate

    cfg = compose(*TINY_CLS, f"output_dir={tmp_path}")
    return instantiate(cfg.trainer, logger=False, enable_progress_bar=False).strategy.checkpoint_io


@pytest.fixture
def watched_tmpdir(tmp_path, monkeypatch):
    """$TMPDIR for this test: it must stay empty."""
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


def test_checkpoint_save_writes_its_temporary_file_beside_the_target(tmp_path, monkeypatch, watched_tmpdir):
    checkpoint_io = _configured_checkpoint_io(tmp_path)
    target = tmp_path / "checkpoints" / "last.ckpt"
    seen, real_save = [], torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        seen.append(sorted(p.name for p in target.parent.iterdir()))  # where the bytes just went

    monkeypatch.setattr(torch, "save", save)
    checkpoint_io.save_checkpoint({"w": torch.ones(3)}, target)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith(".last.ckpt.") and seen[0][0].endswith(".tmp")
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert list(watched_tmpdir.iterdir()) == []
    assert read_checkpoint(target)["w"].sum() == 3


def test_a_failed_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch, watched_tmpdir):
    """The checkpoint directory's filesystem fills up half-way through the save; $TMPDIR is another filesystem (a
    rename from it fails with EXDEV, so a file written there would have to be copied into place)."""
    import shutil

    checkpoint_io = _configured_checkpoint_io(tmp_path)
    target = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io.save_checkpoint({"w": torch.zeros(1000)}, target)
    good = target.read_bytes()

    real_rename, real_save = os.rename, torch.save

    def rename(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(src)) == str(watched_tmpdir):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    def save_until_full(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):  # an in-memory buffer fills no disk
            return real_save(obj, f, *args, **kwargs)
        f.write(good[: len(good) // 2])  # written straight into the checkpoint directory
        raise OSError(errno.ENOSPC, "No space left on device")

    def copy_until_full(src, dst, *args, **kwargs):  # copied into the checkpoint directory
        with open(src, "rb") as source, open(dst, "wb") as destination:
            destination.write(source.read()[: len(good) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(shutil, "copyfile", copy_until_full)
    with pytest.raises(ConfigError, match=r"last.ckpt: not written \(No space left on device\); the file there is "
                                          r"still the previous whole one .*ckpt_path=auto resumes a run") as raised:
        checkpoint_io.save_checkpoint({"w": torch.ones(1000)}, target)
    assert "\n" not in str(raised.value)  # the command line's one line (cli: a ConfigError in fit ends it so)
    assert target.read_bytes() == good
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert list(watched_tmpdir.iterdir()) == []


KILLED_MID_WRITE = """
import sys, time
from vtrain.training.atomic import atomic_write

def write(f):
    f.write(b"x" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

atomic_write(sys.argv[1], write)
"""


def test_sigkill_mid_write_leaves_the_previous_file_whole(tmp_path):
    """The kill lands while the new bytes are being written: the target is the previous file, and the leftover
    temporary file sits beside it under a name no reader of checkpoints or metrics picks up."""
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    torch.save({"global_step": 6, "state_dict": {}}, target)
    good = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.read_bytes() == good
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")
    assert newest_valid_checkpoint(target.parent) == target


# --------------------------------------------------------------------------------------------------- last.ckpt
def test_last_ckpt_is_the_final_state_when_the_last_validation_is_not_the_best(imagenet_root, tmp_path):
    """Monitoring the step with mode=min makes the first validation the best and every later one worse."""
    run = tmp_path / "run"
    run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "trainer.max_epochs=2",
                   "trainer.limit_val_batches=1", "callbacks.model_checkpoint.monitor=step",
                   "callbacks.model_checkpoint.mode=min")
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["epoch000-step0000006.ckpt", "last.ckpt"]
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (last["global_step"], last["epoch"]) == (12, 1)


# ------------------------------------------------------------------------------------------------- metrics.csv
def _validated_epochs(path) -> list[int]:
    with open(path, newline="") as f:
        return sorted(int(row["epoch"]) for row in csv.DictReader(f) if row["val/top1"])


def test_a_resumed_run_appends_to_metrics_csv(imagenet_root, tmp_path):
    """2 epochs without the learning-rate column, then resumed to 4 with it: all 4 epochs' rows in one table."""
    run = tmp_path / "run"
    args = [*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1"]
    run_in_process(*args, "trainer.max_epochs=2", "callbacks.lr_monitor=null")
    assert _validated_epochs(run / "metrics.csv") == [0, 1]
    run_in_process(*args, "trainer.max_epochs=4", "ckpt_path=auto")
    assert _validated_epochs(run / "metrics.csv") == [0, 1, 2, 3]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert "lr-AdamW/pg1" in rows[0] and all(len(row) == len(rows[0]) for row in rows)
    steps = [int(row[rows[0].index("step")]) for row in rows[1:] if row[rows[0].index("train/loss_step")]]
    assert steps == list(range(24))  # every training step once, in order


def test_a_checkpoint_monitoring_the_step_loss_mid_epoch_ranks_by_that_steps_own_loss(imagenet_root, tmp_path):
    """The module logs ``train/loss_step`` at the end of a batch whose values anything reads; a checkpoint saved
    mid-epoch (before that, in Lightning's order of hooks) has it logged first. Its scores are each step's loss as
    ``metrics.csv`` has it when every step is logged, and the same when only every 50th is."""
    args = [*TINY_CLS, f"data.root={imagenet_root}", "trainer.limit_val_batches=1", "trainer.max_epochs=2",
            "trainer.deterministic=true", "callbacks.model_checkpoint.monitor=train/loss_step",
            "callbacks.model_checkpoint.mode=min", "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.model_checkpoint.every_n_train_steps=1"]
    scores = {}
    for every in (1, 50):
        run = tmp_path / f"every{every}"
        run_in_process(*args, f"hydra.run.dir={run}", f"trainer.log_every_n_steps={every}")
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
        (saved,) = [value for key, value in state.items() if key.startswith("ModelCheckpoint")]
        scores[every] = {int(path.rsplit("step", 1)[1][:7]): float(score)
                         for path, score in saved["best_k_models"].items()}
    with open(tmp_path / "every1" / "metrics.csv", newline="") as f:  # a row per step: step s ends at global step s+1
        logged = {int(row["step"]) + 1: float(row["train/loss_step"]) for row in csv.DictReader(f)
                  if row["train/loss_step"]}
    assert sorted(scores[1]) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]  # none at an epoch's last batch: its validation's
    assert len(set(scores[1].values())) == 10
    assert scores[1] == pytest.approx({step: logged[step] for step in scores[1]}, rel=1e-6)
    assert scores[50] == pytest.approx(scores[1], rel=1e-6)


def test_metrics_csv_writer_continues_a_file_with_a_torn_last_row(tmp_path):
    from vtrain.training.loggers import AppendingMetricsWriter

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,val/top1\r\n0,5,0.5\r\n1,11,0.6\r\n2,1")  # killed mid-append
    writer = AppendingMetricsWriter(str(tmp_path))
    writer.log_metrics({"epoch": 2, "val/top1": 0.7, "val/top5": 1.0}, step=17)
    writer.save()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"], r["val/top1"], r["val/top5"]) for r in rows] == [
        ("0", "5", "0.5", ""), ("1", "11", "0.6", ""), ("2", "17", "0.7", "1.0")]


# ------------------------------------------------------------------------------------ weights of another model
TINY_SWIN = dict(img_size=32, embed_dim=16, num_heads=[1, 2, 4, 8], window_size=4, drop_path_rate=0.0)


def _swin_file(tmp_path, depths, num_classes=4):
    """A timm-layout Swin classifier file (backbone keys plus ``head.fc.*``)."""
    from vtrain.backbones import SwinTransformer

    torch.manual_seed(0)
    state_dict = SwinTransformer(depths=depths, **TINY_SWIN).state_dict()
    state_dict.update({"head.fc.weight": torch.randn(num_classes, 128), "head.fc.bias": torch.randn(num_classes)})
    path = tmp_path / f"swin_{'-'.join(map(str, depths))}_{num_classes}.pth"
    torch.save(state_dict, path)
    return path


def test_weights_of_a_smaller_model_stop_the_run_with_one_line(tmp_path, caplog):
    """A Swin-T-like file for a Swin-S-like model (a deeper third stage) used to load the tensors that fit and
    leave the rest at their initialisation, said at INFO; now it stops, unless pretrained_strict=false."""
    from vtrain.training.checkpoint import load_backbone_weights
    from vtrain.backbones import SwinTransformer

    path = _swin_file(tmp_path, depths=[1, 1, 2, 1])
    deeper = SwinTransformer(depths=[1, 1, 4, 1], **TINY_SWIN)
    with pytest.raises(ConfigError, match=r"^\d+ of the \d+ backbone tensors do not come from .*swin_1-1-2-1_4\.pth "
                                          r"\(layers\.2\.blocks\.2\..*\): is it a checkpoint of this backbone\? "
                                          r"pretrained_strict=false loads the \d+ that fit"):
        load_backbone_weights(deeper, path)
    with caplog.at_level("WARNING", logger="vtrain.training.checkpoint"):
        report = load_backbone_weights(deeper, path, strict=False)
    assert report["missing"] and all(k.startswith("layers.2.blocks.") for k in report["missing"])
    assert "keep their initialisation (pretrained_strict=false)" in caplog.text
    # the same file for the model it was written for, and for that model's feature maps (out_norms.0-2 new)
    assert load_backbone_weights(SwinTransformer(depths=[1, 1, 2, 1], **TINY_SWIN), path)["missing"] == []
    dense = SwinTransformer(depths=[1, 1, 2, 1], out_indices=(0, 1, 2, 3), **TINY_SWIN)
    assert load_backbone_weights(dense, path)["missing"] == []


def test_a_classifier_of_another_size_is_a_warning_with_both_shapes(tmp_path, caplog):
    from omegaconf import OmegaConf

    from vtrain.tasks.classification.module import ClassificationTask

    path = _swin_file(tmp_path, depths=[1, 1, 2, 1], num_classes=21)  # e.g. an ImageNet-22K release
    backbone = OmegaConf.create({"_target_": "vtrain.backbones.SwinTransformer", "depths": [1, 1, 2, 1], **TINY_SWIN})
    task = ClassificationTask(backbone, {"_target_": "torch.optim.AdamW", "lr": 1e-3},
                              {"_target_": "vtrain.training.optim.cosine"}, num_classes=4)
    before = task.head.weight.clone()
    with caplog.at_level("WARNING", logger="vtrain.training.checkpoint"):
        task.load_pretrained(str(path))
    assert f"the classifier of {path} is (21, 128), this model's (4, 128): it starts from its initialisation" in caplog.text
    assert torch.equal(task.head.weight, before)


@pytest.mark.xdist_group("mid_epoch_run")
def test_resuming_a_checkpoint_of_another_model_is_one_line(imagenet_root, tmp_path, mid_epoch_run):

    last = mid_epoch_run / "checkpoints" / "last.ckpt"
    for mode in ("train", "eval"):
        with pytest.raises(ConfigError) as error:
            run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={tmp_path / mode}", f"mode={mode}",
                           "backbone.depths=[1,1,1,1]", f"ckpt_path={last}")
        message = str(error.value)
        assert "\n" not in message, message
        assert message.startswith(f"checkpoint {last} is not of this experiment's model (0 of its ") and \
            "unexpected" in message, message


# ------------------------------------------------------------------------------------------------ corrupt files
def _one_line_error(path, call):
    from vtrain.config import ConfigError

    with pytest.raises(ConfigError) as error:
        call(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_cut_or_foreign_safetensors_file_is_one_line(tmp_path):
    """Like a .pth file that does not read: one line naming the file, whatever safetensors says."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1000)}, tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save({"w": torch.zeros(3)}, tmp_path / "zip.safetensors")  # a .pth renamed
    torch.save({"w": torch.zeros(3)}, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    for name in ("cut", "empty"):
        message = _one_line_error(tmp_path / f"{name}.safetensors", read_checkpoint)
        assert message.startswith(f"cannot read checkpoint {tmp_path / name}.safetensors as safetensors (")
        assert message.endswith("is it a complete weights file?")
    for name in ("zip", "legacy"):
        message = _one_line_error(tmp_path / f"{name}.safetensors", read_checkpoint)
        assert message.startswith(f"cannot read checkpoint {tmp_path / name}.safetensors: it is a torch.save file, "
                                  "not safetensors") and message.endswith("rename it .pth")


def _official_swin(depths, embed_dim=16, num_heads=(1, 2, 4, 8)):
    """A tiny Swin classifier in the official release's layout: ``{'model': ...}``, each stage's patch merging at its
    end (timm puts it at the next stage's start), classifier ``head.*``."""
    import re

    from vtrain.backbones import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer(depths=depths, **{**TINY_SWIN, "embed_dim": embed_dim, "num_heads": list(num_heads)})
    official = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
                for k, v in swin.state_dict().items() if not k.endswith(("relative_position_index", "attn_mask"))}
    official.update({"head.weight": torch.randn(4, swin.num_features), "head.bias": torch.randn(4)})
    return {"model": official}


def test_reference_files_of_another_model_are_one_line(tmp_path):
    """An official Swin-S-layout file (stage 2 deeper) for a Swin-T-layout model used to stop inside timm's filter
    (AttributeError looking up a block the model lacks); a Swin-B-like one (wider, more heads) went through a
    resize of its position tables; a ResNet-50 file for a ResNet-26 loaded its first blocks. Each is now one line,
    and the file of the model itself still loads."""
    from omegaconf import OmegaConf

    from vtrain.backbones import ResNet
    from vtrain.training.checkpoint import load_backbone_weights, load_task_weights
    from vtrain.tasks.classification.module import ClassificationTask

    backbone = OmegaConf.create({"_target_": "vtrain.backbones.SwinTransformer", "depths": [1, 1, 2, 1], **TINY_SWIN})
    task = ClassificationTask(backbone, {"_target_": "torch.optim.AdamW", "lr": 1e-3},
                              {"_target_": "vtrain.training.optim.cosine"}, num_classes=4)
    files = {}
    for name, depths, width, heads in [("swin_s", [1, 1, 4, 1], 16, (1, 2, 4, 8)), ("swin_b", [1, 1, 2, 1], 24, (2, 3, 6, 12)),
                                        ("swin_t", [1, 1, 2, 1], 16, (1, 2, 4, 8))]:
        files[name] = tmp_path / f"{name}.pth"
        torch.save(_official_swin(depths, width, heads), files[name])

    message = _one_line_error(files["swin_s"], lambda path: load_task_weights(task, path))
    assert message.startswith(f"26 tensors of {files['swin_s']} are of blocks the backbone does not have "
                              "(layers.2.blocks.2.norm1.weight, ") and "is it a checkpoint of this backbone?" in message
    message = _one_line_error(files["swin_b"], lambda path: load_task_weights(task, path))
    assert "is it a checkpoint of this architecture?" in message or "is it a checkpoint of this backbone?" in message
    load_task_weights(task, files["swin_t"])
    torch.testing.assert_close(task.head.weight, torch.load(files["swin_t"], weights_only=True)["model"]["head.weight"])
    # feature maps up to level 2 only: the file's stage 3 is left out, not looked up in a model that does not build it
    from vtrain.backbones import SwinTransformer

    shallow = SwinTransformer(depths=[1, 1, 2, 1], out_indices=(0, 1, 2), **TINY_SWIN)
    assert load_backbone_weights(shallow, files["swin_t"]) == {"missing": [], "unexpected": [], "mismatched": []}

    torch.save(ResNet(depth=50).state_dict(), tmp_path / "r50.pth")
    message = _one_line_error(tmp_path / "r50.pth", lambda path: load_backbone_weights(ResNet(depth=26), path))
    assert "are of blocks the backbone does not have (layer1.2." in message
