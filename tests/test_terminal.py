"""What the terminal shows: the run's summary (wall time, throughput), plain output where stdout is not a terminal,
vtrain's own ``--help``, and a "did you mean" for a mistyped name."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vtrain.training.callbacks.metrics_json import MetricsJSON
from vtrain.training.terminal import duration, summary_table


def test_summary_shows_wall_time_and_the_throughput_of_the_training_steps(tmp_path):
    record = {"monitor": "val/top1", "final": {"val/top1": 0.5, "val/top5": 0.75}, "best": {"val/top1": 0.625},
              "best_epoch": {"val/top1": 1}, "final_epoch": 2,
              "training": {"steps": 18, "seconds": 12.0, "samples": 18 * 32, "samples_per_second": 18 * 32 / 12.0,
                           "sample_name": "clips"}}
    rows = summary_table(record, tmp_path, wall_seconds=125.4).splitlines()
    assert rows[6:8] == ["  wall time      2 min 05 s",
                         "  throughput     48.0 clips/s  (576 clips in 18 training steps, 12.0 s; validation not counted)"]
    evaluated = summary_table({**record, "training": {}}, tmp_path, evaluated="x.ckpt", wall_seconds=3.04)
    assert "  wall time      3.0 s" in evaluated and "throughput" not in evaluated
    assert [duration(s) for s in (59.96, 60, 3599, 3600 * 2 + 7 * 60 + 59)] == ["60.0 s", "1 min 00 s", "59 min 59 s",
                                                                               "2 h 07 min"]


def test_metrics_json_times_the_training_steps_without_the_validations(tmp_path, monkeypatch):
    """Training from step 6 (a resumed run) to step 18 at 32 samples a step, 100 s after its start with 30 s of
    validation inside: 12 steps, 384 samples in 70 s."""
    clock = iter([1000.0, 1040.0, 1070.0, 1100.0])  # train start, validation start, its end, train end
    monkeypatch.setattr("vtrain.training.callbacks.metrics_json.time.monotonic", lambda: next(clock))
    metrics = MetricsJSON(str(tmp_path))
    trainer = SimpleNamespace(global_step=6, sanity_checking=False, callback_metrics={}, current_epoch=0,
                              state=SimpleNamespace(fn="fit"), checkpoint_callback=None, is_global_zero=True)
    module = SimpleNamespace(monitor="val/top1", training_steps=SimpleNamespace(batch_size=32), SAMPLES="images")
    metrics.on_train_start(trainer, module)
    metrics.on_validation_start(trainer, module)
    metrics.on_validation_end(trainer, module)
    trainer.global_step = 18
    metrics.on_train_end(trainer, module)
    assert metrics.payload["training"] == {"steps": 12, "seconds": 70.0, "samples": 384,
                                           "samples_per_second": pytest.approx(384 / 70), "sample_name": "images"}
