"""One-off studies behind the findings in docs/benchmarks.md, kept so that every number there can be re-run.

Each answers one question about the ranking benchmark; none is needed to use or evaluate the library.
Run from the repository root, e.g. ``python -m benchmarks.studies.finetune_noise --help``:

* :mod:`.lambda_sweep`: the absolute-lambda sweep of version 0.1.0 (the noisy ``offline`` preset).
* :mod:`.finetune_noise`: how noisy one fine-tuning epoch is, over data orders and rate schedules.
* :mod:`.ranking_refinetune`: the ranking benchmark's saved pruned models, fine-tuned again under
  another schedule.
* :mod:`.finetune_orders`: two methods paired over seeds and fine-tuning data orders.
* :mod:`.blend_knobs`: whether the calibration set size or a per-layer balance changes CoNNect's ranking.
* :mod:`.normalizer_allocation`: where connectivity pruning cuts under each group reduction and
  normalizer.

Their results stay in ``benchmarks/results/<study>/``.
"""
