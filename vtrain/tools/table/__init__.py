"""The seed papers' tables, reproduced: the paper's value beside the one measured here.

``python -m vtrain.tools.table table=swin_imagenet`` reads ``conf/table/swin_imagenet.yaml`` (rows: a label,
the experiment and/or backbone config with optional ``overrides``, an optional checkpoint or metrics file, the
paper's values; columns: what each one measures, with a tolerance) and fills every column it can
(``paper.py``):

* ``params`` / ``macs``: the row's backbone with a ``num_classes`` linear classifier (the bench's
  ``Classifier``, the classification model) through ``vtrain.profiling``, always;
* ``task_params``: the whole task model of the row's experiment (a detector, say), when the experiment exists;
* ``task_macs``: that model's multiply-accumulates on one ``task_input_shape`` (else ``input_shape``) image in
  evaluation mode (:func:`vtrain.tools.table.macs.task_macs`: a detector's as the detection papers count it);
* ``throughput``: inference images/s on the current device (the bench's timing);
* ``metric``: the value in the ``metrics.json`` of ``python -m vtrain.eval experiment=... ckpt_path=...`` when
  the row has a checkpoint (and the dataset is there), or of a finished run given as ``metrics``; a metric
  column's ``overrides`` join the row's in its own evaluation (SAN's rotation table: ``task.test_rotation=90``).

Anything that cannot be measured prints "—" with a footnote saying why; a measured value further from the
paper's than the column's ``abs_tol`` / ``rel_tol`` is marked †.

``python -m vtrain.tools.table runs=<multirun dir>`` aggregates the sweep's ``metrics.json`` files
(``runs.py``): runs that differ only by their seed form one row (mean ± sample std), and a PNG plots the
metric against the key the sweep varies (a log axis for numbers spanning a factor of 10; or GMACs, params,
throughput), one point per run.
"""
