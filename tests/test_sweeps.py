"""Sweeps: a failing point does not stop the others, submitit's local launcher, Optuna, the SLURM launcher config."""
from __future__ import annotations

import json

import yaml

from conftest import TINY_CLS, run_cli, run_forked
from vtrain.training.sweep import finished_points, record_failure, summarize, summary_lines


def test_a_failing_point_is_reported_and_the_others_finish(imagenet_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_forked("-m", *TINY_CLS, f"data.root={imagenet_root}", "data.num_classes=7,4", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "set data.num_classes=4" in rows[0]["error"] and rows[1]["monitor"] == "val/top1"
    assert 0.0 <= rows[1]["best"] <= 1.0
    assert "1/2 points ok" in result.stdout


def test_sweep_points_are_read_in_job_order_by_the_summary_and_the_sweep_table(tmp_path):
    """One reader for both: the summary lists every job (failed, died, ok); the sweep table every metrics.json
    below a folder, sweeps of sweeps included, numbered directories by number."""
    sweep = tmp_path / "day" / "10-00-00"
    metrics = {"monitor": "val/top1", "best": {"val/top1": 0.5}, "final": {"val/top1": 0.4}}
    for job in (0, 2, 10):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (sweep / str(job) / "metrics.json").write_text(json.dumps(metrics))
    record_failure(sweep / "1", ValueError("bad value\nmore"))
    (sweep / "3").mkdir()
    other = tmp_path / "day" / "11-00-00" / "0"
    other.mkdir(parents=True)
    (other / "metrics.json").write_text(json.dumps(metrics))

    rows = summarize(sweep)
    assert [(r["point"], r["status"]) for r in rows] == [(0, "ok"), (1, "failed"), (2, "ok"), (3, "failed"), (10, "ok")]
    assert rows[1]["error"] == "ValueError: bad value" and rows[3]["error"].startswith("no metrics.json")
    assert rows[4]["overrides"] == "seed=10" and rows[4]["best"] == 0.5
    points = finished_points(tmp_path / "day")
    assert [p.path.relative_to(tmp_path / "day").parts for p in points] == [
        ("10-00-00", "0"), ("10-00-00", "2"), ("10-00-00", "10"), ("11-00-00", "0")]
    assert points[0].overrides == ["seed=0"] and points[-1].overrides is None and points[0].error is None


def test_the_summary_lines_name_only_the_overrides_that_differ_between_points(tmp_path):
    """What every point shares is said once; each point's line names what sets it apart (here optim.lr and seed)."""
    metrics = {"monitor": "val/top1", "best": {"val/top1": 0.5}, "final": {"val/top1": 0.4}}
    for job, (lr, seed) in enumerate([("1e-3", 0), ("3e-3", 0), ("3e-3", 1)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(
            f"- experiment=quickstart\n- data.root=/data/imagenet\n- optim.lr={lr}\n- seed={seed}\n")
        if job != 1:
            (tmp_path / str(job) / "metrics.json").write_text(json.dumps(metrics))
    record_failure(tmp_path / "1", ValueError("bad value"))
    assert summary_lines(tmp_path, summarize(tmp_path)) == [
        f"sweep {tmp_path}: 2/3 points ok",
        "  every point: experiment=quickstart data.root=/data/imagenet",
        "  [0] ok     val/top1 best 0.5000  (optim.lr=1e-3 seed=0)",
        "  [1] failed ValueError: bad value  (optim.lr=3e-3 seed=0)",
        "  [2] ok     val/top1 best 0.5000  (optim.lr=3e-3 seed=1)",
    ]


def test_submitit_local_launcher_runs_a_two_point_sweep(imagenet_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/launcher=local", *TINY_CLS, f"data.root={imagenet_root}", "optim.lr=1e-3,3e-3",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((sweep / p / "metrics.json").is_file() for p in ("0", "1"))
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # the jobs really went through submitit
    assert [r["status"] for r in json.loads((sweep / "summary.json").read_text())] == ["ok", "ok"]


def test_optuna_search_reads_the_objective_from_metrics_json(imagenet_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_forked("-m", *TINY_CLS, f"data.root={imagenet_root}", "hparams_search=quickstart_optuna",
                     "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    tops = [json.loads((sweep / p / "metrics.json").read_text())["best"]["val/top1"] for p in ("0", "1")]
    assert best["best_value"] == max(tops)
    assert 3e-4 <= best["best_params"]["optim.lr"] <= 1e-2


def test_slurm_launcher_counts_follow_the_trainer():
    result = run_forked("hydra/launcher=slurm", "experiment=swin_t_imagenet", "trainer.num_nodes=2", "trainer.devices=8",
                     "--cfg", "all", "--resolve")
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 8, 8)
    assert launcher["_target_"].endswith("SlurmLauncher") and "account" in launcher
