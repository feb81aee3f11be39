"""``python -m vtrain.predict run=<run dir>|ckpt_path=<file> inputs=<image, video, folder or glob> out=<dir>``

Predictions of a trained model with the run's own preprocessing (its data module's validation transform), batched,
on the CPU or a GPU: one JSON and one picture per input in ``out``, and a line per input on the terminal.

Options (``key=value``):
  run=DIR             a run directory: its best checkpoint (metrics.json), else checkpoints/last.ckpt
  ckpt_path=FILE      a checkpoint: vtrain's describe their model; official, timm and torchvision files need
  experiment=NAME     the experiment whose model they hold (it also replaces a vtrain checkpoint's config)
  inputs=SPEC         an image or video, a folder (its images or videos), a glob ('photos/*.jpg', quoted), or a
                      comma-separated list of those
  out=DIR             where the JSON files and pictures go (default: predictions)
  device=auto         auto (a GPU when there is one) | cpu | cuda | cuda:1
  batch_size=N        inputs per forward pass (default: the data module's validation batch size)
  num_workers=0       processes reading the inputs
  top_k=5             classes per image or video (classification)
  score_threshold=0.3 detections scoring less are left out
  max_detections=100  detections per image, the best first
  mask_threshold=0.5  a detection's mask is where its probability exceeds this
  pictures=true       false: JSON only
Any other <group>.<key>=value changes the model's config (task.test_size=1000, data.eval_crop_pct=1.0): a key
it does not have is one line (+key=value adds one), and so is an option mistyped. An input that cannot be read is
skipped, named and counted on the last line; the others are predicted.

What each JSON holds: classification and video, the top-k classes (label, name, dataset id such as the ImageNet
wnid, probability; video: over every view of the clip sampling validation uses); detection, each instance's box
(XYXY pixels), score, label, name, COCO category id and mask (COCO RLE), and all inputs' detections together as
COCO results (detections_bbox.json, detections_segm.json: what pycocotools' COCO.loadRes reads; image ids from the
run's validation annotation file for its images, else the number a COCO file name is, else 1, 2, ... in the order
printed); segmentation, the label map (a PNG of
label values beside the JSON) and each class's share of the pixels. Pictures: boxes and masks with names and
scores, the segmentation overlaid with a legend, the top-5 bars beside the image or the video's frames.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vtrain.config import ConfigError
from vtrain.config.command import key_value_command
from vtrain.inference.predictor import Prediction, Predictor, collect_inputs
from vtrain.inference.visualize import save_picture
from vtrain.training.module import PredictOptions

log = logging.getLogger("vtrain")
OPTIONS = {"run", "ckpt_path", "experiment", "inputs", "out", "device", "batch_size", "num_workers", "top_k",
           "score_threshold", "max_detections", "mask_threshold", "pictures"}


def _number(options: dict[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in options:
        return default
    try:
        return kind(options[key])
    except ValueError:
        raise ConfigError(f"{key}={options[key]} is not a {kind.__name__}") from None


def build_predictor(options: dict[str, str], overrides: list[str]) -> Predictor:
    if bool(options.get("run")) == bool(options.get("ckpt_path")):
        raise ConfigError("give the model as run=<run directory> or ckpt_path=<checkpoint file> (one of them)")
    flag = options.get("pictures", "true").lower()
    if flag not in ("true", "false"):
        raise ConfigError(f"pictures={flag}: use true or false")
    return Predictor(
        options.get("run") or options["ckpt_path"], experiment=options.get("experiment"), overrides=overrides,
        device=options.get("device", "auto"), batch_size=_number(options, "batch_size", int, None),
        num_workers=_number(options, "num_workers", int, 0), top_k=_number(options, "top_k", int, 5),
        score_threshold=_number(options, "score_threshold", float, PredictOptions.score_threshold),
        max_detections=_number(options, "max_detections", int, PredictOptions.max_detections),
        mask_threshold=_number(options, "mask_threshold", float, PredictOptions.mask_threshold),
        pictures=flag == "true",
    )


def summary_line(record: dict[str, Any]) -> str:
    """A prediction in a few words, for the terminal."""
    if "top_k" in record:
        return ", ".join(f"{c['name']} {c['score']:.2f}" for c in record["top_k"][:3])
    if "instances" in record:
        found = record["instances"]
        shown = ", ".join(f"{d['name']} {d['score']:.2f}" for d in found[:4]) + (", ..." if len(found) > 4 else "")
        return f"{len(found)} detection{'s' if len(found) != 1 else ''}" + (f": {shown}" if found else "")
    if "classes" in record:
        return ", ".join(f"{c['name']} {100 * c['share']:.1f}%" for c in record["classes"][:4])
    return ""


def write_prediction(prediction: Prediction, out: Path, name: str) -> Path:
    """``<name>.json`` (tensors as PNG files beside it: ``<name>_<key>.png``) and the picture ``<name>.png``."""
    record: dict[str, Any] = {"source": prediction.source}
    for key, value in prediction.record.items():
        if isinstance(value, torch.Tensor):
            file = f"{name}_{key}.png"
            Image.fromarray(value.cpu().numpy()).save(out / file)
            value = file
        record[key] = value
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    if prediction.picture is not None:
        save_picture(prediction.picture, out / f"{name}.png")
    return out / f"{name}.json"


def run(options: dict[str, str], overrides: list[str]) -> list[Path]:
    if not options.get("inputs"):
        raise ConfigError("give inputs=<image, video, folder or glob>")
    predictor = build_predictor(options, overrides)
    files = collect_inputs(options["inputs"], predictor.datamodule.input_extensions)
    out = Path(options.get("out", "predictions"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file: give a folder for the predictions (it is made if missing)")
    out.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    written, sources, records = [], [], []
    for prediction in predictor.predict(files, skip_unreadable=True):
        stem = Path(prediction.source).stem
        name = stem if stem not in names else next(f"{stem}_{k}" for k in range(2, len(names) + 3)
                                                     if f"{stem}_{k}" not in names)
        names.add(name)
        written.append(write_prediction(prediction, out, name))
        sources.append(prediction.source)  # for the results files; a label map is not kept
        records.append({k: v for k, v in prediction.record.items() if not isinstance(v, torch.Tensor)})
        print(f"{prediction.source}: {summary_line(prediction.record)}")
    for file, results in predictor.model.results_files(sources, records, predictor.datamodule).items():
        (out / file).write_text(json.dumps(results))
    skipped = predictor.skipped
    print(f"wrote {len(written)} prediction{'s' if len(written) != 1 else ''} to {out} (JSON"
          f"{' and pictures' if predictor.options.pictures else ''}), model on {predictor.device}"
          + (f"; skipped {len(skipped)} unreadable input{'s' if len(skipped) != 1 else ''} ({', '.join(skipped[:3])}"
             f"{', ...' if len(skipped) > 3 else ''})" if skipped else ""))
    return written


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    key_value_command(__doc__, OPTIONS, run, argv)


if __name__ == "__main__":
    main()
