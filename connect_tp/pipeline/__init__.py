"""The pruning benchmark behind the ``connect-tp`` command, as a library: presets, run folders, stages, tables.

It builds on two library modules that know nothing of it: :mod:`connect_tp.methods`
(pruning-criterion names and their options, no torch) and :mod:`connect_tp.files` (atomic writes
that respect the umask, readers that name the file); ``pipeline.methods`` and ``pipeline.files``
re-export them. The library (``connect_tp`` outside this package and :mod:`connect_tp.cli`) never
imports this package.

Modules, from the bottom up:

* :mod:`~connect_tp.pipeline.config`: presets, checked overrides, and what each file depends on.
* :mod:`~connect_tp.pipeline.lock`: one writer per output folder.
* :mod:`~connect_tp.pipeline.provenance`: fingerprints of files and the checks on resume and reuse.
* :mod:`~connect_tp.pipeline.rundir`: the run folder's layout, result validation, merged updates.
* :mod:`~connect_tp.pipeline.console`: messages that do not run onto progress bars.
* :mod:`~connect_tp.pipeline.stages`: train, prune and fine-tune (imports torch).
* :mod:`~connect_tp.pipeline.table`: the table and plot over seeds (no torch).

Importing this package imports none of them; :mod:`connect_tp.cli` imports what a command needs.
"""
