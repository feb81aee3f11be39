"""Predictions of a trained model (``vtrain.predict``, ``vtrain.Predictor``): the validation path's scores on the same
files, self-describing checkpoints, pictures, and the one-step runs (``vtrain.cli.run`` in this process) they use."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.serialization import get_unsafe_globals_in_checkpoint

import vtrain
from vtrain.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_SWIN = ["backbone.embed_dim=16", "backbone.depths=[1,1,1,1]", "backbone.num_heads=[1,1,2,2]",
             "backbone.window_size=4"]
# One optimizer step and one validation of every task's quickstart on a few synthetic files.
RUNS = {
    "classification": ("quickstart", "imagenet", ["backbone.img_size=32", "data.num_classes=4", "data.batch_size=8",
                                                  "data.num_workers=0"]),
    "detection": ("quickstart_det", "coco", ["data.num_workers=0", "data.batch_size=2", "data.val_batch_size=2",
                                             "task.detector.neck.out_channels=32", "task.detector.box_head_dim=32", "task.detector.mask_head_dims=[16]",
                                             "task.test_size=64"]),
    "segmentation": ("quickstart_seg", "ade20k", ["data.num_workers=0", "data.batch_size=2", "data.val_batch_size=2",
                                                  "task.head.channels=16", "task.aux_head.channels=8"]),
    "video": ("quickstart_video", "kinetics", ["data.batch_size=4", "data.val_batch_size=4"]),
}
WRITERS = {
    "imagenet": ("vtrain.tasks.classification.synthetic", dict(num_classes=4, train_per_class=2, val_per_class=3,
                                                               size=32)),
    "coco": ("vtrain.tasks.detection.synthetic", dict(train_images=4, val_images=4)),
    "ade20k": ("vtrain.tasks.segmentation.synthetic", dict(num_classes=6, train=4, val=4, height=64, width=80)),
    "kinetics": ("vtrain.tasks.video.synthetic", dict(num_classes=6, train_per_class=1, val_per_class=1)),
}


def one_step_run(task: str, root: Path) -> Path:
    """``vtrain.cli.run`` of the task's quickstart for one step, outside ``@hydra.main``; its run directory."""
    import importlib

    from conftest import run_in_process

    experiment, kind, overrides = RUNS[task]
    module, options = WRITERS[kind]
    importlib.import_module(module).write(root / kind, seed=0, **options)
    run_dir = root / "run"
    run_in_process(f"experiment={experiment}", f"data.root={root / kind}", f"output_dir={run_dir}", *TINY_SWIN,
                   *overrides, "trainer.max_epochs=1", "trainer.max_steps=1", "trainer.limit_train_batches=1",
                   "callbacks.progress_bar=null", "+trainer.enable_progress_bar=false", "logger=[csv,tensorboard]")
    return run_dir


@pytest.fixture(scope="module", params=list(RUNS))
def trained(request, tmp_path_factory):
    return request.param, one_step_run(request.param, tmp_path_factory.mktemp(request.param))


def validation_outputs(model, datamodule, count: int) -> list[dict[str, torch.Tensor]]:
    """What each task's ``validation_step`` computes for the first ``count`` validation samples, batch by batch."""
    datamodule.setup("validate")
    outputs = []
    with torch.no_grad():
        for counted in datamodule.val_dataloader():  # vtrain.data.datamodule.CountedBatch: the batch, with its read counts
            batch = counted.batch
            if isinstance(batch, dict) and "clips" in batch:  # video: softmax averaged over the views
                outputs += [{"probabilities": p} for p in model.video_probabilities(batch["clips"])]
            elif isinstance(batch, dict):  # segmentation: each image at its size through the test pipeline
                for image, (h, w) in zip(batch["images"], batch["sizes"].tolist()):
                    outputs.append({"label_map": model.predict_probs(image[None, :, :h, :w])[0].argmax(0)})
            elif isinstance(batch[0], list):  # detection
                outputs += model(batch[0])
            else:
                outputs += [{"probabilities": p} for p in model(batch[0]).softmax(-1)]
            if len(outputs) >= count:
                return outputs[:count]
    return outputs


def test_predictions_equal_the_validation_path_on_the_same_files(trained):
    task, run_dir = trained
    # batches of another size than validation's where images are independent; the detector pads a batch to its
    # largest image, which moves detections: there predict batches as validation does (data.val_batch_size)
    batch_size = None if task == "detection" else 3
    predictor = vtrain.Predictor(run_dir, score_threshold=0.0, top_k=100, batch_size=batch_size)
    files = predictor.datamodule.example_files(4)
    expected = validation_outputs(predictor.model, vtrain.training.build.datamodule_of(predictor.model), len(files))
    records = predictor(files)
    assert len(records) == len(files) == 4
    for record, reference in zip(records, expected):
        if task in ("classification", "video"):
            probabilities = torch.tensor([c["score"] for c in sorted(record["top_k"], key=lambda c: c["label"])])
            torch.testing.assert_close(probabilities, reference["probabilities"], atol=1e-5, rtol=1e-4)
        elif task == "segmentation":
            assert torch.equal(record["label_map"].long(), reference["label_map"])
        else:
            keep = (reference["labels"] >= 1) & (reference["labels"] <= 4)
            assert len(record["instances"]) == int(keep.sum()) > 0  # threshold 0: every detection of validation
            boxes = torch.tensor([d["box"] for d in record["instances"]])
            torch.testing.assert_close(boxes, reference["boxes"][keep], atol=1e-4, rtol=1e-5)
            assert [d["score"] for d in record["instances"]] == pytest.approx(reference["scores"][keep].tolist())


def test_a_checkpoint_describes_its_model_with_plain_values(trained):
    task, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = Path(metrics["best_checkpoint"])
    assert checkpoint.is_file() and checkpoint.parent == run_dir / "checkpoints"
    assert get_unsafe_globals_in_checkpoint(checkpoint) == []
    described = torch.load(checkpoint, map_location="cpu", weights_only=True)["vtrain"]
    names = {"classification": ["triangle_cyan", "circle_yellow", "star_red", "circle_red"],  # classes.txt
             "detection": ["square", "triangle", "circle", "star"],  # the annotation file's categories
             "segmentation": ["square_red", "triangle_green", "circle_blue", "diamond_yellow", "hexagon_magenta",
                              "star_cyan"],
             "video": ["grow", "move_down", "move_left", "move_right", "move_up", "shrink"]}[task]
    assert described["class_names"] == names
    if task == "classification":
        assert described["class_ids"] == ["n09000000", "n09000001", "n09000002", "n09000003"]
    if task == "detection":
        assert described["class_ids"] == [1, 4, 7, 10]  # COCO ids, not contiguous
    assert described["config"]["data"]["root"] == str(run_dir.parent / RUNS[task][1])  # the composed config, resolved

    # load_from_checkpoint needs the file alone, reads it weights-only, and gives the same weights
    from hydra.utils import get_class

    cls = get_class(described["config"]["task"]["_target_"])
    loaded = cls.load_from_checkpoint(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert loaded.label_names() == names
    assert loaded.training and not vtrain.load(checkpoint).training  # Lightning's mode; vtrain.load's is eval
    assert set(loaded.state_dict()) == set(state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    from vtrain.tasks.classification import ClassificationTask
    from vtrain.tasks.detection import DetectionTask

    other = DetectionTask if cls is not DetectionTask else ClassificationTask
    with pytest.raises(ConfigError, match=f"holds a {cls.__name__}, not a {other.__name__}"):
        other.load_from_checkpoint(checkpoint)


def test_pictures_are_written_and_show_the_prediction(trained, tmp_path):
    task, run_dir = trained
    files = vtrain.Predictor(run_dir).datamodule.example_files(2)
    from vtrain.predict import main

    main([f"run={run_dir}", f"inputs={','.join(files)}", f"out={tmp_path}", "score_threshold=0.0",
          "max_detections=5"])
    for file in files:
        stem = Path(file).stem
        record = json.loads((tmp_path / f"{stem}.json").read_text())
        picture = np.asarray(Image.open(tmp_path / f"{stem}.png"))
        assert record["source"] == file and picture.ndim == 3 and picture.std() > 10  # not blank
        if task == "segmentation":
            label_map = np.asarray(Image.open(tmp_path / record["label_map"]))
            assert label_map.shape == tuple(record["image_size"]) and label_map.max() < 6
            assert sum(c["share"] for c in record["classes"]) == pytest.approx(1.0)
        if task == "detection":
            assert 0 < len(record["instances"]) <= 5
            assert all("counts" in d["mask"] and d["category_id"] in (1, 4, 7, 10) for d in record["instances"])
    if task == "detection":  # all inputs' detections as COCO results, with the annotation file's image ids
        from pycocotools.coco import COCO

        gt = COCO(str(vtrain.Predictor(run_dir).datamodule.val_annotation_file))
        for iou_type in ("bbox", "segm"):
            loaded = gt.loadRes(str(tmp_path / f"detections_{iou_type}.json"))
            by_image = {gt.imgs[i]["file_name"]: len(loaded.getAnnIds(imgIds=[i])) for i in gt.getImgIds()}
            assert [by_image[Path(f).name] for f in files] == [
                len(json.loads((tmp_path / f"{Path(f).stem}.json").read_text())["instances"]) for f in files]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    return one_step_run("classification", tmp_path_factory.mktemp("classifier"))


def test_an_unreadable_input_is_skipped_and_counted_and_the_rest_predicted(classifier_run, tmp_path, capsys):
    """One broken file in a folder stopped the whole command: it is skipped, counted on the last line, and the other
    files are predicted. A mistyped option and an out= that is a file are one line each."""
    run_dir = classifier_run  # the skipping is the predictor's, the same for every task
    from vtrain.predict import main

    folder = tmp_path / "inputs"
    folder.mkdir()
    files = vtrain.Predictor(run_dir).datamodule.example_files(2)
    for file in files:
        (folder / Path(file).name).write_bytes(Path(file).read_bytes())
    (folder / "broken.JPEG").write_bytes(b"not an image")
    main([f"run={run_dir}", f"inputs={folder}", f"out={tmp_path / 'out'}", "pictures=false"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == sorted(f"{Path(f).stem}.json" for f in files)
    assert printed[-1].endswith(f"; skipped 1 unreadable input ({folder / 'broken.JPEG'})")

    for argv, message in (([f"run={run_dir}", f"inputs={folder}", "scor_threshold=0.1"],
                           "error: scor_threshold=0.1: no such option (did you mean score_threshold?)"),
                          ([f"run={run_dir}", f"inputs={folder}", f"out={folder / 'broken.JPEG'}"],
                           f"error: out={folder / 'broken.JPEG'} is a file: give a folder")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines


def test_training_logs_pictures_of_validation_predictions_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = trained
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == [f"predictions/{k}" for k in range(4)]
    picture = np.asarray(Image.open(__import__("io").BytesIO(events.Images("predictions/0")[0].encoded_image_string)))
    assert max(picture.shape[:2]) >= 384 and picture.std() > 10  # enlarged to a readable size, not blank

    # the ground truth beside the prediction: the left panel is the first file's truth drawn as predictions are
    from vtrain.inference.visualize import PANEL_GAP, TITLE_HEIGHT
    from vtrain.training.build import datamodule_of
    from vtrain.training.module import PredictOptions

    model = vtrain.load(run_dir)
    datamodule = datamodule_of(model)
    original = datamodule.predict_set(datamodule.example_files(1))[0]["original"]
    truth = model.draw_prediction(original, model.truth_record(datamodule.example_truths(1)[0]), PredictOptions())
    truth = truth.permute(1, 2, 0).numpy()
    height, width = truth.shape[:2]
    assert picture.shape[1] == 2 * width + PANEL_GAP  # two panels of the same image, side by side
    np.testing.assert_array_equal(picture[TITLE_HEIGHT:TITLE_HEIGHT + height, :width], truth)
    assert not np.array_equal(picture[TITLE_HEIGHT:TITLE_HEIGHT + height, width + PANEL_GAP:], truth)


def test_a_box_is_drawn_on_its_border_and_nowhere_else():
    """A hand-made detection on a flat grey image: the picture is the input enlarged (nearest), except on the box's
    border and caption, and inside its mask (tinted)."""
    from vtrain.inference.visualize import draw_detections, enlargement

    image = torch.full((3, 48, 64), 128, dtype=torch.uint8)
    mask = torch.zeros(1, 48, 64, dtype=torch.bool)
    mask[0, 30:40, 40:50] = True
    picture = draw_detections(image, torch.tensor([[20.0, 24.0, 52.0, 44.0]]), ["circle 0.90"], [(255, 0, 0)], mask)
    factor = enlargement(48, 64)
    assert factor == 6 and picture.shape == (3, 48 * factor, 64 * factor)
    changed = (picture != 128).any(dim=0)
    assert changed[24 * factor, 30 * factor] and changed[35 * factor, 52 * factor]  # top and right edges
    assert changed[35 * factor, 45 * factor]  # inside the mask
    assert not changed[:20 * factor].any() and not changed[:, :18 * factor].any()  # above the caption, left of the box
    assert not changed[35 * factor, 25 * factor]  # inside the box, outside the mask


def test_labels_of_overlapping_boxes_stay_legible():
    """Three boxes with nearly the same top-left corner and one at the picture's corner: each caption on a filled
    label of its box's colour, inside the picture, no two labels on top of each other (torchvision's
    ``draw_bounding_boxes`` writes each at its box's corner, over the others)."""
    from vtrain.inference.visualize import caption_places, caption_size, draw_detections, enlargement, font

    image = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10, 50, 50], [12, 11, 60, 40], [11, 12, 45, 58], [0, 0, 20, 20]])
    captions = ["circle 0.90", "square 0.80", "triangle 0.70", "star 0.60"]
    colors = [(242, 60, 60), (60, 113, 242), (166, 242, 60), (0, 0, 0)]
    picture = draw_detections(image, boxes, captions, colors)
    factor = enlargement(64, 64)
    sizes = [caption_size(font(13), c) for c in captions]
    places = caption_places((boxes * factor).tolist(), sizes, 64 * factor, 64 * factor)
    for k, (x1, y1, x2, y2) in enumerate(places):
        assert 0 <= x1 < x2 <= 64 * factor and 0 <= y1 < y2 <= 64 * factor and (x2 - x1, y2 - y1) == sizes[k]
        for other in places[k + 1:]:
            assert min(x2, other[2]) <= max(x1, other[0]) or min(y2, other[3]) <= max(y1, other[1]), (k, places)
        label = picture[:, y1:y2, x1:x2].reshape(3, -1).T
        filled = (label == torch.tensor(colors[k], dtype=torch.uint8)).all(dim=1).float().mean()
        luma = 0.299 * colors[k][0] + 0.587 * colors[k][1] + 0.114 * colors[k][2]
        ink = torch.tensor([0, 0, 0] if luma > 150 else [255, 255, 255])
        text = (label.int() - ink).abs().max(dim=1).values < 40  # anti-aliased strokes: near the ink
        assert filled > 0.6 and text.sum() > 10  # the label's colour around its text, black on light, white on dark
    assert places[0] == (10 * factor, 10 * factor - sizes[0][1], 10 * factor + sizes[0][0], 10 * factor)  # above
    assert places[3][:2] == (0, 0)  # a box at the top-left corner: its label inside the picture


def test_a_segmentation_is_a_semi_transparent_overlay_with_the_legends_colours():
    """Each class's pixels are the image blended with its colour (the image stays visible: two image values under
    one class give two picture values), and the legend's swatch of a class is that colour."""
    from vtrain.inference.visualize import MIN_SIDE, SEGMENTATION_ALPHA, draw_segmentation, enlargement, palette

    image = torch.zeros(3, 32, 48, dtype=torch.uint8)
    image[:, :, 24:] = 200
    label_map = torch.zeros(32, 48, dtype=torch.long)
    label_map[8:24, 8:40] = 2
    picture = draw_segmentation(image, label_map, ["a", "b", "c"], {0: 0.75, 2: 0.25})
    factor, colors = enlargement(32, 48), palette(3)
    assert factor * 48 == MIN_SIDE
    for y, x, label in ((2, 2, 0), (2, 45, 0), (12, 12, 2), (12, 30, 2)):
        blended = [round((1 - SEGMENTATION_ALPHA) * float(image[c, y, x]) + SEGMENTATION_ALPHA * colors[label][c])
                   for c in range(3)]
        assert picture[:, y * factor + 3, x * factor + 3].tolist() == pytest.approx(blended, abs=1), (y, x)
    assert picture[:, 12 * factor, 12 * factor].tolist() != picture[:, 12 * factor, 30 * factor].tolist()
    legend = picture[:, :, 48 * factor:]  # the panel beside the picture: a row per class, largest share first
    swatches = [legend[:, 8 + i * 22 + 9, 18].tolist() for i in range(2)]
    assert swatches == [list(colors[0]), list(colors[2])]


@pytest.mark.parametrize("trained", ["classification", "segmentation"], indirect=True)
def test_evaluation_needs_the_checkpoint_alone(trained, tmp_path):
    """``python -m vtrain.eval ckpt_path=FILE``: the model and data come from the checkpoint, not from the default
    experiment, and the evaluation gives the run's final numbers."""
    _, run_dir = trained
    from vtrain.cli import model_from_checkpoint, run

    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = vtrain.compose(None, [f"ckpt_path={metrics['best_checkpoint']}", "mode=eval", f"output_dir={tmp_path}",
                                "callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"])
    assert cfg.task._target_.endswith("ClassificationTask") and cfg.data.num_classes == 1000  # the defaults
    model_from_checkpoint(cfg, [f"ckpt_path={metrics['best_checkpoint']}", "data.num_workers=0"])
    run(cfg)
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluated["final"][metrics["monitor"]] == pytest.approx(metrics["final"][metrics["monitor"]], abs=1e-6)


def test_a_timm_weight_file_predicts_with_an_experiment_as_timm_does(imagenet_root, tmp_path):
    """A file that describes nothing (timm's state dict) with ``experiment=``: the classes are the data's, the
    scores timm's own model gives on the same preprocessed image."""
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1, 1, 1),
                                  num_heads=(1, 1, 2, 2), window_size=4, num_classes=4).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    predictor = vtrain.Predictor(tmp_path / "timm.pth", experiment="quickstart", top_k=4, overrides=[
        f"data.root={imagenet_root}", "backbone.img_size=32", "data.num_classes=4", *TINY_SWIN])
    file = predictor.datamodule.example_files(1)[0]
    record = predictor(file)[0]
    with torch.no_grad():
        expected = reference(predictor.datamodule.predict_set([file])[0]["input"][None]).softmax(-1)[0]
    names = [line.split()[1] for line in (imagenet_root / "classes.txt").read_text().splitlines()]
    assert [c["name"] for c in sorted(record["top_k"], key=lambda c: c["label"])] == names
    scores = torch.tensor([c["score"] for c in sorted(record["top_k"], key=lambda c: c["label"])])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
