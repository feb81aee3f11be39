"""The input pipeline's throughput per CPU core against the reference pipeline (``bench.pipeline=true``).

``python -m vtrain.tools.bench experiment=<name> [overrides] bench.pipeline=true`` builds the experiment's data
module, its training set, and the reference pipeline of its family with the same settings
(:mod:`vtrain.tools.bench.reference_pipelines`), then times both from the encoded files to the tensors the model
gets, in one process pinned to one CPU core with one intra-op thread and no loader workers: a sample is
``train_set[i]`` for vtrain and the reference's ``load(i)``. Both are seeded alike before every sample (torch,
``random``, numpy), so that they draw the same crop sizes, flips and augmentation ops where they share the steps
and time the same work. Blocks of ``bench.pipeline_samples`` samples alternate (A B, B A, ...), after
``bench.pipeline_warmup`` untimed samples of each; samples/s is the median block's, the ratio vtrain/reference
the median of the paired blocks' ratios with its quartiles (:func:`vtrain.tools.bench.timing.interleaved_blocks`).

For image datasets, ``bench.pipeline_decode`` also times the decoders alone on the same files, PIL
(``Image.open(...).convert("RGB")``, what timm, mmseg's PIL path and vtrain's ImageNet and ADE20K sets read
with) against ``torchvision.io.decode_image`` (libjpeg-turbo, what vtrain's COCO set reads with), and reports the
largest pixel difference: a faster decoder is only worth adopting where its pixels are identical.

The report (printed, and appended as a JSON line to ``bench.pipeline_jsonl``) holds the machine's load average
before and after: on a shared machine it says how far to trust the figures.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.io import ImageReadMode, decode_image

from vtrain.config import ConfigError
from vtrain.data.samplers import seed_host  # the generators the pipelines draw from: torch, random, numpy
from vtrain.tools.bench.reference_pipelines import read_pil_rgb, reference_pipeline
from vtrain.tools.bench.report import quartiles
from vtrain.tools.bench.timing import interleaved_blocks

CPU = torch.device("cpu")
DECODE_CHECKED_FILES = 64  # files whose pixels the decoder comparison checks


def model_input(sample: Any) -> torch.Tensor:
    """The tensor of a training sample that the model reads: the image of ``(image, target)``, ``image`` or
    ``clips`` of a dict."""
    if isinstance(sample, dict):
        return sample["image"] if "image" in sample else sample["clips"]
    return sample[0]


def describe(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def training_data(cfg: DictConfig) -> Any:
    """The experiment's data module with its training set built; a missing or empty ``data.root`` is one line."""
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "check"):
        datamodule.check()
    datamodule.setup("fit")
    if len(datamodule.train_set) == 0:
        raise ConfigError(f"data.root={cfg.data.root}: no training sample to time")
    return datamodule


def seeded_steps(load: Callable[[int], Any], count: int) -> Callable[[], None]:
    """One sample per call, samples 0, 1, ... (cycling over ``count``), each after seeding with its index."""
    cursor: Iterator[int] = itertools.count()

    def step() -> None:
        index = next(cursor) % count
        seed_host(index)
        load(index)
    return step


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """One intra-op thread, and the process pinned to one CPU core where the system allows (decoders' own threads
    included), so that samples/s is per core."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    pinned = False
    if affinity:
        with contextlib.suppress(OSError):  # a sandbox may refuse: one thread is then the only limit
            os.sched_setaffinity(0, {min(affinity)})
            pinned = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if pinned:
            os.sched_setaffinity(0, affinity)


def timed_pair(steps: list[Callable[[], None]], samples: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Samples/s of each step (median block) and the ratio first/second with its quartiles."""
    for step in steps:
        for _ in range(warmup):
            step()
    blocks = interleaved_blocks(steps, samples, repeats, CPU)
    ratios = [theirs / ours for ours, theirs in zip(blocks[0], blocks[1])]
    return {"per_s": [samples / statistics.median(b) for b in blocks], "ratio": statistics.median(ratios),
            "ratio_quartiles": quartiles(ratios), "blocks_s": blocks}


def compare_decoders(files: list[str], samples: int, repeats: int, warmup: int) -> dict[str, Any]:
    """PIL against ``torchvision.io.decode_image`` on the same files: images/s, the ratio torchvision/PIL and the
    largest difference of a pixel value over the first ``DECODE_CHECKED_FILES`` files."""
    def pil(path: str) -> np.ndarray:
        return np.asarray(read_pil_rgb(path))

    def torchvision(path: str) -> torch.Tensor:
        return decode_image(path, mode=ImageReadMode.RGB)

    difference = 0
    for path in files[:DECODE_CHECKED_FILES]:
        theirs = torchvision(path).permute(1, 2, 0).numpy().astype(np.int16)
        difference = max(difference, int(np.abs(pil(path).astype(np.int16) - theirs).max()))
    timed = timed_pair([seeded_steps(lambda i: torchvision(files[i]), len(files)),
                        seeded_steps(lambda i: pil(files[i]), len(files))], samples, repeats, warmup)
    return {"decoders": ["torchvision.io.decode_image", "PIL"], "images_per_s": timed["per_s"],
            "ratio": timed["ratio"], "ratio_quartiles": timed["ratio_quartiles"],
            "max_abs_difference": difference, "identical": difference == 0,
            "files_checked": min(len(files), DECODE_CHECKED_FILES)}


def run_pipeline(cfg: DictConfig, bench: DictConfig, experiment: str | None = None) -> dict[str, Any]:
    """Time the training pipeline of the experiment ``cfg`` (a composed ``train`` config) against its reference;
    ``bench``: the ``bench`` node (``pipeline_samples``, ``pipeline_repeats``, ``pipeline_warmup``,
    ``pipeline_decode``)."""
    samples, repeats, warmup = int(bench.pipeline_samples), int(bench.pipeline_repeats), int(bench.pipeline_warmup)
    if min(samples, repeats) < 1 or warmup < 0:
        raise ConfigError(f"bench.pipeline_samples={samples}, bench.pipeline_repeats={repeats}, "
                          f"bench.pipeline_warmup={warmup}: use samples and repeats >= 1, warmup >= 0")
    load_before = list(os.getloadavg())
    with one_core():
        datamodule = training_data(cfg)
        reference = reference_pipeline(datamodule)
        train_set, count = datamodule.train_set, len(datamodule.train_set)
        seed_host(0)
        ours_out = model_input(train_set[0])
        seed_host(0)
        theirs_out = model_input(reference.load(0))
        timed = timed_pair([seeded_steps(train_set.__getitem__, count), seeded_steps(reference.load, count)],
                           samples, repeats, warmup)
        decode = None
        if bench.pipeline_decode and reference.image_files:
            decode = compare_decoders(reference.image_files, samples, repeats, warmup)
    return {
        "experiment": experiment,
        "data": type(datamodule).__name__,
        "data_root": str(datamodule.root),
        "reference": reference.name,
        "settings": {"samples": samples, "repeats": repeats, "warmup": warmup, "threads": 1, "workers": 0,
                     "training_samples": count},
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "samples_per_s": {"vtrain": timed["per_s"][0], "reference": timed["per_s"][1]},
        "ratio": timed["ratio"],
        "ratio_quartiles": timed["ratio_quartiles"],
        "blocks_s": {"vtrain": timed["blocks_s"][0], "reference": timed["blocks_s"][1]},
        "outputs": {"vtrain": describe(ours_out), "reference": describe(theirs_out)},
        "decode": decode,
        "note": reference.note,
    }


def format_pipeline(report: dict[str, Any]) -> str:
    s, rate = report["settings"], report["samples_per_s"]
    q1, q3 = report["ratio_quartiles"]
    load = report["load_average"]
    lines = [f"training pipeline of {report['experiment'] or report['data']} ({report['data']}, {report['data_root']}): "
             f"{s['repeats']} blocks of {s['samples']} samples after {s['warmup']} warm-up, one core, no workers",
             f"  vtrain     {rate['vtrain']:8.2f} samples/s   -> {report['outputs']['vtrain']}",
             f"  reference  {rate['reference']:8.2f} samples/s   -> {report['outputs']['reference']}"
             f"   ({report['reference']})",
             f"  vtrain / reference: {report['ratio']:.3f} (quartiles {q1:.3f}-{q3:.3f})"]
    decode = report.get("decode")
    if decode:
        d1, d3 = decode["ratio_quartiles"]
        per_s = decode["images_per_s"]
        lines.append(f"  decode: {decode['decoders'][0]} {per_s[0]:.1f} / {decode['decoders'][1]} {per_s[1]:.1f} "
                     f"images/s = {decode['ratio']:.3f} (quartiles {d1:.3f}-{d3:.3f}); largest pixel difference "
                     f"{decode['max_abs_difference']} over {decode['files_checked']} files"
                     f"{' (identical)' if decode['identical'] else ''}")
    if report.get("note"):
        lines.append(f"  note: {report['note']}")
    lines.append(f"  load average before {load['before'][0]:.1f}, after {load['after'][0]:.1f}")
    return "\n".join(lines)
