#!/usr/bin/env python
"""vtrain from Python, end to end: compose a config, build its model, train it, load the run, predict, export.

    python scripts/python_api.py [--out outputs/python_api] [--steps 30]

The same steps as ``make demo`` and ``python -m vtrain.predict``, as library calls (docs/python.md). It writes a
small synthetic ImageNet-layout dataset, trains the ``quickstart`` Swin for ``--steps`` steps on the CPU, then
classifies a few validation images with the run's own preprocessing and exports the model to ONNX.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import vtrain


def main(out: str = "outputs/python_api", steps: int = 30, image_size: int = 64, export: bool = True) -> list[dict]:
    from vtrain.cli import run
    from vtrain.tasks.classification.synthetic import write

    out_dir = Path(out)
    data = out_dir / "data"
    if not data.is_dir():
        write(data, seed=0, num_classes=4, train_per_class=16, val_per_class=4, size=image_size)

    # 1. the config `python -m vtrain experiment=quickstart ...` would run with
    cfg = vtrain.compose("quickstart", [f"data.root={data}", "data.num_classes=4", f"backbone.img_size={image_size}",
                                        f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "data.num_workers=0",
                                        "callbacks.progress_bar=null", f"output_dir={out_dir / 'run'}"])
    # 2. its task model and data module, as the command line builds them
    task, datamodule = vtrain.build(cfg)
    print(f"{type(task).__name__}: {sum(p.numel() for p in task.parameters()):,} parameters, "
          f"data from {datamodule.root}")
    # 3. train (and validate) as `python -m vtrain` does; the run ends with its summary
    run(cfg)
    # 4. the run's best checkpoint, ready to evaluate: it describes itself (config, class names)
    model = vtrain.load(cfg.output_dir)
    print("classes:", ", ".join(model.class_names))
    # 5. predictions with the run's preprocessing: plain dicts (see python -m vtrain.predict --help)
    predictor = vtrain.Predictor(model, top_k=2)
    files = predictor.datamodule.example_files(4)
    records = predictor(files)
    for file, record in zip(files, records):
        best = record["top_k"][0]
        print(f"{Path(file).name}: {best['name']} ({best['score']:.2f})")
    # 6. the evaluation model as ONNX, checked against PyTorch with onnxruntime
    if export:
        from vtrain.export import run as export_run

        export_run({"run": str(cfg.output_dir), "format": "onnx"}, [])
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/python_api")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    main(args.out, args.steps)
