"""The machinery behind :class:`connect_tp.importance.ConnectImportance`, by what it does.

* :mod:`.recorder`: the model's input structure (given, recorded from the pruner's trace, or
  read from its dependency graph), per model.
* :mod:`.cache`: when the connectivity gradient is recomputed (a fingerprint of the model's
  state, once per pruning step inside a pruner, at every call outside one).
* :mod:`.gradient`: the connectivity gradient ``d log phi_tot / dW`` itself (the engine's
  log-scaled pass, chunked or from the mean input, else the general pass) and which pass ran.
* :mod:`.channels`: per-channel scores of a group, reduced as Torch-Pruning reduces Taylor's, and
  the scores of a group no gradient reaches.
* :mod:`.arguments`: the checks of the constructor's arguments.

Each of the first four holds one base class of ``ConnectImportance`` (they share its state);
:mod:`connect_tp.importance` holds the score, the balance and the Torch-Pruning interface.
"""
