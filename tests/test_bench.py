"""vtrain.tools.bench: figures of a tiny model against its timm twin, outputs, reference resolution, loader and layers."""
from __future__ import annotations

import csv
import json

import pytest
import timm
import torch

from conftest import run_forked
from vtrain.config import ConfigError
from vtrain.profiling import count_macs, count_params
from vtrain.tools.bench.cli import run, vs_to_override
from vtrain.tools.bench.models import timm_reference
from vtrain.config.compose import compose_config

TINY_SWIN = ["backbone=swin_t", "backbone.embed_dim=32", "backbone.depths=[1,1,2,1]", "backbone.num_heads=[1,2,4,8]",
             "backbone.window_size=4", "backbone.img_size=64", "backbone.drop_path_rate=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_tiny_swin_vs_timm_writes_json_and_csv_rows(tmp_path):
    """Two runs of a multirun (batch 2 and 4) against timm's Swin of the same architecture, interleaved."""
    csv_path = tmp_path / "bench.csv"
    result = run_forked(
        "-m", *TINY_SWIN, "--vs", "timm", "bench.batch_size=2,4", "bench.warmup=1", "bench.iters=2",
        "bench.repeats=3", f"bench.csv={csv_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}", module="vtrain.tools.bench",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timm:swin_tiny_patch4_window7_224" in result.stdout and "ours/ref" in result.stdout

    with torch.device("meta"):
        twin = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=32, depths=(1, 1, 2, 1),
                                 num_heads=(1, 2, 4, 8), window_size=4)
    reports = [json.loads((tmp_path / "sweep" / str(i) / "bench.json").read_text()) for i in (0, 1)]
    for report, batch in zip(reports, (2, 4)):
        ours, ref = report["ours"], report["reference"]
        assert report["settings"]["batch_size"] == batch and report["torch"] == torch.__version__
        assert report["device"] and report["settings"]["precision"] == "fp32"
        # Same architecture: identical size, counted independently on timm's own model.
        assert ours["params"] == ref["params"] == count_params(twin) == 1_682_571
        assert ours["macs"] == ref["macs"] == count_macs(twin, (1, 3, 64, 64))
        for result_ in (ours, ref):
            assert result_["inference_ips"] > 0 and result_["train_ips"] > 0
            assert result_["train_ips"] < result_["inference_ips"]  # backward and the step cost more than eval
            assert result_["train_peak_mb"] > result_["inference_peak_mb"] > 0
            assert len(result_["train_blocks_s"]) == 3
        # Same model on both sides: the ratio is near 1 (loose: the CPU is shared by parallel tests).
        assert 0.4 < report["ratio"]["train_ips"] < 2.5 and report["ratio"]["params"] == 1.0
        assert report["ours"]["train_mfu"] is None  # no peak FLOP/s for a CPU

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["batch_size"] for r in rows] == ["2", "4"]
    assert rows[0]["reference"] == "timm:swin_tiny_patch4_window7_224" and rows[0]["torch"] == torch.__version__
    assert float(rows[1]["ratio_params"]) == 1.0 and float(rows[1]["train_ips"]) > 0


@pytest.mark.parametrize("backbone, expected", [
    ("resnet50", "resnet50"), ("resnet101", "resnet101"), ("resnext101_64x4d", "resnext101_64x4d"),
    ("swin_t", "swin_tiny_patch4_window7_224"),
    ("swin_b_384", "swin_base_patch4_window12_384"), ("vit_s16", "vit_small_patch16_224"),
    ("vit_b16", "vit_base_patch16_224"), ("gcnet_r50", None), ("dnl_r50", None), ("lrnet50", None),
])
def test_timm_twin_of_each_backbone(backbone, expected):
    found = timm_reference(compose_config("bench", [f"backbone={backbone}"]).backbone)
    assert (found[0] if found else None) == expected


def test_an_input_size_the_backbone_cannot_take_is_one_line_before_any_model_is_built(tmp_path):
    """The backbone's class decides (``check_input_size``); the command line prints the message as its one line
    (test_bench_tiny_swin_vs_timm_writes_json_and_csv_rows runs the command line)."""
    with pytest.raises(ConfigError, match=r"^inputs of 240x240 but backbone.img_size=224: .* set backbone.img_size=240$"):
        run(compose_config("bench", ["backbone=swin_t", "bench.img_size=240"]))
    with pytest.raises(ConfigError) as raised:
        run(compose_config("bench", ["backbone=vit_s16", "bench.img_size=100", f"hydra.run.dir={tmp_path}"]))
    assert str(raised.value) == "inputs of 100x100 are not whole 16x16 patches: use a multiple of 16 (e.g. 96)"


def test_vs_flag_becomes_an_override():
    assert vs_to_override(["backbone=swin_t", "--vs", "timm", "-m"]) == ["backbone=swin_t", "bench.reference=timm", "-m"]
    assert vs_to_override(["--vs=resnet50"]) == ["bench.reference=resnet50"]


def test_loader_throughput_and_bottleneck(imagenet_root, tmp_path):
    cfg = compose_config("bench", [
        *TINY_SWIN, "backbone.img_size=32", "bench.batch_size=4", "bench.modes=[train]", "bench.warmup=1",
        "bench.iters=1", "bench.repeats=1", "bench.loader=true", "bench.loader_warmup=1", "bench.loader_batches=3",
        f"data.root={imagenet_root}", "data.num_classes=4", "data.num_workers=0", f"bench.json={tmp_path}/b.json",
        f"bench.csv={tmp_path}/b.csv",
    ])
    report = run(cfg)
    loader = report["loader"]
    assert loader["ips"] > 0 and loader["mixup"] and loader["num_workers"] == 0
    assert loader["augment"]["auto_augment"] == "rand-m9-mstd0.5-inc1"  # the Swin recipe's pipeline
    assert loader["bottleneck"] == ("loader" if loader["ips"] < report["ours"]["train_ips"] else "model")
    assert "inference_ips" not in report["ours"]


def test_layer_against_another_implementation(tmp_path):
    """A layer (bench.module) against a module config reference: the two local relation implementations."""
    layer = "{_target_:vtrain.layers.local_relation.LocalRelation2d,channels:16,kernel_size:3,implementation:%s}"
    cfg = compose_config("bench", [
        f"bench.module={layer % 'fast'}", f"bench.reference={layer % 'reference'}", "bench.input_shape=[16,8,8]",
        "bench.warmup=1", "bench.iters=1", "bench.repeats=1", f"bench.json={tmp_path}/b.json",
        f"bench.csv={tmp_path}/b.csv",
    ])
    report = run(cfg)
    ours, ref = report["ours"], report["reference"]
    assert ours["name"].startswith("LocalRelation2d(") and "implementation=reference" in ref["name"]
    assert ours["params"] == ref["params"] > 0
    assert ours["train_ips"] > 0 and ref["train_ips"] > 0


# ------------------------------------------------------------------------------------- vtrain against a bare loop
def _tiny_run(imagenet_root, tmp_path, *overrides):
    from conftest import TINY_CLS

    return compose_config("train", [*TINY_CLS, f"data.root={imagenet_root}", "trainer.log_every_n_steps=1",
                                    "optim.batch_per_step=null", *overrides])


@pytest.mark.parametrize("overrides", [[], ["trainer.gradient_clip_val=0.05", "data.batch_size=4",
                                             "optim.batch_per_step=8"]], ids=["plain", "clipped_accumulated"])
def test_the_bare_loop_trains_as_vtrain_does(imagenet_root, tmp_path, overrides):
    """--vs bare compares like with like: from the same weights, seed and batches, three optimizer steps of the run's
    own trainer and three of the bare loop end with the same weights (the schedule's lr, clipping, accumulation,
    the loader's batches and the loss all agree), and each block yields one start per step and its end. Both free a
    step's gradients before the next forward pass (Lightning alone would keep them until the next backward): a
    forward finds gradients only while an accumulation is under way."""
    import copy

    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from vtrain.tools.bench.overhead import bare_block, prepared, vtrain_block
    from vtrain.training.build import build_task

    cfg = prepared(_tiny_run(imagenet_root, tmp_path, *overrides), str(tmp_path / "run"))
    datamodule = instantiate(cfg.data)
    pl.seed_everything(0, verbose=False)
    first = build_task(cfg)
    first.use_dataset(datamodule.info())
    second = copy.deepcopy(first)
    ends, held = [], {}
    for block, module in ((vtrain_block, first), (bare_block, second)):
        if block is bare_block:
            second.training_steps = first.training_steps
        step = module.training_step
        held[block] = []

        def recording_step(*args, module=module, step=step, held=held[block]):
            held.append(any(p.grad is not None for p in module.parameters()))
            return step(*args)

        module.training_step = recording_step
        pl.seed_everything(1, verbose=False)
        starts = block(cfg, module, datamodule, 3, torch.device("cpu"))
        del module.training_step
        assert len(starts) == 4 and starts == sorted(starts)
        ends.append({k: v.clone() for k, v in module.state_dict().items()})
    accumulate = 2 if overrides else 1
    assert held[vtrain_block] == held[bare_block] == [i % accumulate > 0 for i in range(3 * accumulate)]
    for key, value in ends[0].items():
        torch.testing.assert_close(ends[1][key], value, rtol=0, atol=1e-6, msg=key)
    initial = build_task(cfg).state_dict()  # not the identity: the steps did change the weights
    assert any(not torch.equal(initial[k], v) for k, v in ends[0].items() if v.is_floating_point())


def test_the_bare_loop_runs_epoch_after_epoch_as_lightning_orders_them():
    """A block may outrun a small dataset's epoch: the bare loop starts the next one, its sampler told the epoch
    (Lightning's set_epoch), so each epoch has its own order; a loader without batches is one line."""
    from vtrain.config import ConfigError
    from vtrain.tools.bench.overhead import epochs

    class Sampler:
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

    class Loader:
        def __init__(self, size):
            self.sampler, self.size = Sampler(), size

        def __iter__(self):
            return iter([(self.sampler.epoch, i) for i in range(self.size)])

    batches = epochs(Loader(3))
    assert [next(batches) for _ in range(7)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    with pytest.raises(ConfigError, match="the training loader gave no batch"):
        next(epochs(Loader(0)))


def test_overhead_report_pairs_the_blocks(imagenet_root, tmp_path, monkeypatch):
    """The report's ratio is the median of vtrain's speed over the bare loop's in each pair of blocks, and its
    steps/s the median block's; both paths ran every block (clocked here by their own step lists), and then one
    untimed block each, for their peak memory."""
    import vtrain.tools.bench.overhead as overhead

    memory_block = [0.0, 9.0, 18.0, 27.0]  # left out of the timing: a ratio or rate with it would be off
    blocks = {"vtrain": iter([[0.0, 1.0, 2.0, 3.5], [0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 4.0, 6.0], memory_block]),
              "bare": iter([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 2.5], [0.0, 1.0, 2.0, 3.0], memory_block])}
    monkeypatch.setattr(overhead, "vtrain_block", lambda *a: next(blocks["vtrain"]))
    monkeypatch.setattr(overhead, "bare_block", lambda *a: next(blocks["bare"]))
    from omegaconf import OmegaConf

    report = overhead.run_overhead(_tiny_run(imagenet_root, tmp_path), OmegaConf.create(
        {"warmup": 1, "steps": 2, "repeats": 3, "profile": False}), "quickstart")
    # steps after the warm-up: vtrain 2.5, 2.0, 4.0 s; bare 2.0, 1.5, 2.0 s (blocks 1 and 3 run vtrain first)
    assert report["steps_per_s"] == {"vtrain": pytest.approx(2 / 2.5), "bare": pytest.approx(2 / 2.0)}
    assert report["ratio"] == pytest.approx(0.75)  # ratios 0.8, 0.75, 0.5
    assert report["ratio_quartiles"] == pytest.approx([0.625, 0.775])
    assert report["step_seconds"]["vtrain"][2] == [2.0, 2.0]
    # steps paired: vtrain 1.0, 1.5 | 1.0, 1.0 | 2.0, 2.0 against bare 1.0, 1.0 | 1.0, 0.5 | 1.0, 1.0
    assert report["extra_ms"] == {"within_epochs": pytest.approx(500.0),  # of 0, 500, 0, 500, 1000, 1000
                                  "within_epochs_quartiles": pytest.approx([125.0, 875.0]), "epoch_end": None}
    assert "steps paired: +500.00 ms (quartiles +125.00 to +875.00)\n" in overhead.format_overhead(report) + "\n"
    assert next(blocks["vtrain"], None) is None and next(blocks["bare"], None) is None


def test_overhead_report_gives_the_ratio_within_epochs_too(imagenet_root, tmp_path, monkeypatch):
    """An epoch's end falls in the timed steps (the tiny run's epochs are 6 steps: 48 images, batch 8): the report
    gives the ratio again with the epoch's last step and the one after left out on both sides, where vtrain ends an
    epoch (its hooks, last.ckpt) and a plain loop starts its next loader."""
    import vtrain.tools.bench.overhead as overhead
    from omegaconf import OmegaConf

    assert overhead.epoch_end_steps(6, warmup=1, steps=6) == {4, 5}  # block steps 5 (the epoch's last) and 6
    assert overhead.epoch_end_steps(6, warmup=0, steps=6) == {5}
    assert overhead.epoch_end_steps(6, warmup=0, steps=5) == set()
    # after the warm-up step: vtrain 1, 1, 1, 1, 3 (the epoch's end), 1 s; bare 1, 1, 1, 1, 1, 2 (its next loader)
    blocks = {"vtrain": iter([[0.0, 1, 2, 3, 4, 5, 8, 9], [0.0] * 8]), "bare": iter([[0.0, 1, 2, 3, 4, 5, 6, 8], [0.0] * 8])}
    monkeypatch.setattr(overhead, "vtrain_block", lambda *a: next(blocks["vtrain"]))
    monkeypatch.setattr(overhead, "bare_block", lambda *a: next(blocks["bare"]))
    report = overhead.run_overhead(_tiny_run(imagenet_root, tmp_path), OmegaConf.create(
        {"warmup": 1, "steps": 6, "repeats": 1, "profile": False}), "quickstart")
    assert report["steps_per_epoch"] == 6 and report["ratio"] == pytest.approx(7 / 8)
    assert report["within_epochs"] == {"ratio": pytest.approx(1.0), "ratio_quartiles": pytest.approx([1.0, 1.0]),
                                       "steps_left_out": [4, 5]}
    assert "within epochs: 1.000 (quartiles 1.000-1.000), the 2 steps at the ends of 6-step epochs" in \
        overhead.format_overhead(report)
    assert report["extra_ms"] == {"within_epochs": 0.0, "within_epochs_quartiles": [0.0, 0.0],
                                  "epoch_end": pytest.approx(500.0)}  # of +2 s and -1 s
    assert "steps paired: +0.00 ms (quartiles +0.00 to +0.00), at an epoch's end +500.00 ms" in \
        overhead.format_overhead(report)


def test_vs_bare_splits_the_bench_settings_from_the_experiment(tmp_path, monkeypatch):
    """``experiment=... <overrides> --vs bare bench.overhead.steps=3``: the bench.* arguments set the bench, the others
    compose the experiment; the report is printed and appended to bench.overhead.jsonl."""
    import vtrain.tools.bench.cli as cli
    import vtrain.tools.bench.overhead as overhead

    seen = {}

    def fake_run(cfg, bench, experiment):
        seen.update(cfg=cfg, bench=bench, experiment=experiment)
        return {"steps_per_s": {"vtrain": 1.0, "bare": 2.0}, "peak_mb": {"vtrain": None, "bare": None},
                "ratio": 0.5, "ratio_quartiles": [0.4, 0.6], "device": "cpu",
                "settings": {"steps": 3, "repeats": 2, "warmup": 1, "batch_size": 8, "precision": "32-true"}}

    monkeypatch.setattr(overhead, "run_overhead", fake_run)
    argv = cli.vs_to_override(["experiment=quickstart", "data.batch_size=8", "--vs", "bare", "bench.overhead.steps=3",
                               f"bench.overhead.jsonl={tmp_path / 'o.jsonl'}"])
    assert "bench.reference=bare" in argv
    cli.overhead([a for a in argv if a != "bench.reference=bare"])
    assert seen["experiment"] == "quickstart" and seen["cfg"].data.batch_size == 8
    assert seen["cfg"].backbone.embed_dim == 32  # the quickstart's, composed from the train config
    assert seen["bench"].steps == 3 and seen["bench"].repeats == 4
    [line] = (tmp_path / "o.jsonl").read_text().splitlines()
    assert json.loads(line)["overrides"] == ["experiment=quickstart", "data.batch_size=8"]
