"""Benchmarks a user runs, from the repository root: ``python -m benchmarks.<name> --help``.

* :mod:`.ranking`, :mod:`.ranking_parallel`: which pruning criterion keeps the most accuracy, over
  seeds, with the rule that chose ``ConnectImportance()``'s defaults; :mod:`.headline` prints README's
  results table from the committed results.
* :mod:`.robustness`: many pruning trajectories per criterion, the worst one first.
* :mod:`.cifar_pruning`: the paper's CIFAR presets (the same command as ``connect-tp``).
* :mod:`.importance_overhead`, :mod:`.zoo_overhead`: the cost of one pruning step against
  Torch-Pruning's Taylor (ResNet-56; the torchvision and timm models of ``tests/test_zoo.py``).
* :mod:`.mlp_layer_collapse`: the paper's layer-collapse experiment with the CoNNect regularizer.
* :mod:`.llm_prune`, :mod:`.llm_tiny_lm`, :mod:`.llm_memory`, :mod:`.llm_7b_step`,
  :mod:`.llm_kappa_overlap`: language models (pruning, a tiny offline model, the memory of one
  scoring step at small scale and at LLaMA-7B's shapes, what the connectivity term changes).
* ``gpu_session.sh``, ``robustness_gpu.sh``: one prepared call on a GPU machine.

:mod:`.resumable` is a helper of the scripts. One-off studies behind docs/benchmarks.md live in
:mod:`benchmarks.studies`; every result is under ``benchmarks/results/``.
"""
