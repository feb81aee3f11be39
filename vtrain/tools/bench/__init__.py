"""Speed and size of a backbone's classifier, measured against timm's own model in the same process.

``python -m vtrain.tools.bench backbone=swin_t --vs timm`` (``--vs X`` is ``bench.reference=X``) reports, for
the backbone with a ``bench.num_classes`` linear classifier (what ``ClassificationTask`` trains):

* parameters and multiply-accumulates at ``bench.img_size`` (``vtrain.profiling``: torch's flop counter on
  the meta device, attention products included);
* inference images/s (eval, no grad) and training images/s (forward, cross-entropy, backward, the
  framework's optimizer step, ``zero_grad(set_to_none=True)``), at ``bench.batch_size`` with the chosen
  precision (fp32 or bf16 autocast), memory format and ``torch.compile``;
* each model's peak memory for one step: its own weights (and optimizer state) plus the transient peak of
  the step (CUDA: ``max_memory_allocated``; CPU: growth of the peak resident set);
* on CUDA with bf16, the model FLOP utilisation of training: 6 x MACs per image (forward 2, backward 4
  FLOPs per MAC) x images/s over the device's dense bf16 peak.

Timing: warm-up iterations are untimed; the device is synchronised before every timer read; the timed
blocks of the two models alternate (A B, B A, ...) so that drift of a shared machine hits both; images/s
is the median block's, and the speed ratio ours/reference the median (with quartiles) of the ratios of
paired blocks. Ratios from one run are how speed claims are made here; absolute images/s from different
runs are not compared.

``bench.loader=true`` also measures the classification training pipeline (decode, augmentation, Mixup) from
``data.root`` with ``data.num_workers`` and says whether the loader or the model limits training.

Results: a table on stdout, ``bench.json`` in the run directory and one appended row in ``bench.csv``, each
with the device, the torch version and the settings.

``python -m vtrain.tools.bench experiment=<name> --vs bare`` measures instead what vtrain's training path costs
on top of the model: its training steps against a bare PyTorch loop on the same model, optimizer, schedule and
loader (``overhead``).

``python -m vtrain.tools.bench experiment=<name> bench.pipeline=true`` measures the experiment's training input
pipeline, samples/s on one CPU core from the encoded files, against its reference pipeline with the same settings
(timm, torchvision's detection references, mmseg, mmaction2), and PIL against ``torchvision.io.decode_image``
(``pipeline``, ``reference_pipelines``).

Modules: ``models`` (the candidates: our classifier, timm's twin, another backbone, a layer), ``device``
(which device, its peak, peak memory), ``timing`` (warm-up and interleaved timed blocks), ``loader`` (the data
pipeline), ``report`` (ratios, the table, JSON and CSV), ``overhead`` (``--vs bare``), ``pipeline`` and
``reference_pipelines`` (``bench.pipeline=true``), ``cli`` (the flow and the command line).
"""
