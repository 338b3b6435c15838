"""The ``connect-tp`` command: train, prune and fine-tune a model, then tabulate accuracy against speed-up.

This module builds the command line and runs one command. It imports nothing heavy at module
level (torch, Torch-Pruning and the stages are imported when a command runs), so ``connect-tp
--help`` answers at once. Every argument is checked, and the output folder created and tested
for writing, before any work starts (method names and their numbers, the device, the contents of
every checkpoint a stage will load); every writing command holds the folder's lock. Failures end
in one ``error: ...`` line; exit codes are 0 (done), 1 (error) and 130 (interrupted, with what
was saved and the ``--resume`` command to continue). ``table`` refuses what it cannot vouch for
(:mod:`connect_tp.pipeline.table`).

Commands (``connect-tp COMMAND --help`` shows each one's options and an example)::

    connect-tp train    --preset offline --seed 0    # base model          -> OUT/base.pt, base.json
    connect-tp prune    --preset offline --seed 0    # progressive pruning -> OUT/pruned/*.pt, results/*.json
    connect-tp finetune --preset offline --seed 0    # fine-tuning         -> OUT/finetuned/*.pt, adds to results
    connect-tp table    --runs runs/offline/seed* --output benchmarks/results/offline
    connect-tp run      --preset offline --seed 0    # train, prune, finetune and table for one seed

``OUT`` defaults to ``runs/<preset>/seed<seed>``. Training and fine-tuning run data-parallel under
``torchrun --nproc_per_node N -m connect_tp.cli finetune ...``; pruning runs on rank 0.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import sys
import time
from typing import Any, Callable, List, Optional

from .methods import MAX_LAMBDA, PRUNING_METHODS, parse_method
from .pipeline.config import FT_SCHEDULES, PRESETS, ConfigError, check_device, check_speed_up, resolve_config

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with status 1, like every other error."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"error: {self.prog}: {message}\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _speed_up(text: str) -> float:
    try:
        return check_speed_up(text, "a speed-up")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _lam(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_LAMBDA):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 and <= {MAX_LAMBDA:g}, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        return check_device(text, "the device")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _method(name: str) -> str:
    try:
        parse_method(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


_EXAMPLES = {
    "train": "examples:\n  connect-tp train --preset offline --seed 0\n"
             "  connect-tp train --preset smoke --out runs/try --epochs 2 --resume   # continue an interrupted run",
    "prune": "examples:\n  connect-tp prune --preset offline --seed 0\n"
             "  connect-tp prune --preset offline --methods connect l2 --speed-up 2 4 --resume",
    "finetune": "examples:\n  connect-tp finetune --preset offline --seed 0\n"
                "  torchrun --nproc_per_node 2 -m connect_tp.cli finetune --preset paper-resnet56 --device cuda",
    "table": "example:\n  connect-tp table --runs runs/offline/seed0 runs/offline/seed1 --output benchmarks/results/offline",
    "run": "examples:\n  connect-tp run --preset smoke --seed 0     # a minute or two on a CPU\n"
           "  connect-tp run --preset offline --seed 1 --threads 2 --resume",
}

_HELP = {
    "train": "train the base model",
    "prune": "prune the base model to the speed-up targets",
    "finetune": "fine-tune every pruned model",
    "table": "table and plot over run folders (seeds)",
    "run": "train, prune, finetune and table for one seed",
}

_DESCRIPTIONS = {
    "train": "Train the base model: OUT/base.pt (a checkpoint per epoch) and OUT/base.json.",
    "prune": "Prune the base model with each method, one trajectory per method, and save the model at each "
             "speed-up target: OUT/pruned/<method>_<x>x.pt and OUT/results/<method>_<x>x.json.",
    "finetune": "Fine-tune every pruned model (and, for presets that have one, a short fixed budget); the "
                "accuracies are added to OUT/results/<method>_<x>x.json, checkpoints go to OUT/finetuned/.",
    "table": "Average the results of run folders (seeds of one configuration) into table.md, table.json and\n"
             "plot.png. Refused, with both files named: runs that differ in more than the seed, a folder or a\n"
             "seed given twice, and results pruned from another base model than the one in their folder.\n"
             "A demo preset's table and plot say that it cannot rank methods.",
    "run": "train, prune, finetune and table for one seed (the table goes to OUT/table/).",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), default="offline", help="recipe (default: offline)")
    g.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seed of data subsets, training and pruning (default: 0)")
    g.add_argument("--out", default=None, help="run folder (default: runs/<preset>/seed<seed>)")
    g.add_argument("--resume", action="store_true",
                   help="keep what is done in --out and continue interrupted work (files are checked first)")
    g.add_argument("--force", action="store_true",
                   help="with --resume: redo files in --out that another config or another parent file made, "
                        "instead of stopping with an error")
    g = p.add_argument_group("machine")
    g.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's own choice, "
                        "$OMP_NUM_THREADS when set, else one per CPU core)")
    g.add_argument("--workers", type=_int_at_least(0), default=0, help="data-loading processes (default: 0)")
    # Fashion-MNIST is also found in Debian's package folder (connect_tp.data.DEBIAN_FASHION_MNIST_DIR,
    # spelled out here because connect_tp.data imports torch and --help must not).
    g.add_argument("--data-dir", default="data",
                   help="folder with the datasets (default: ./data; Fashion-MNIST is looked for there first, "
                        "then in /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    g.add_argument("--download", action="store_true", help="download the dataset when missing")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_int_at_least(1), default=None, help="base-training epochs (default: the preset's)")


def _add_target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to prune")
    g.add_argument("--methods", nargs="+", type=_method, default=None, metavar="METHOD",
                   help=f"pruning criteria (default: the preset's): {', '.join(PRUNING_METHODS)}, "
                        "or connect-k<kappa>[-bn<stats|gamma|scale|identity>] / connect-lam<lambda>; connect, taylor, l1 "
                        "and l2 may end in -norm<mean|sum|max|none|...> (Torch-Pruning's normalizer)")
    g.add_argument("--speed-up", nargs="+", type=_speed_up, default=None, dest="speed_ups", metavar="X",
                   help="MAC speed-up targets, finite and > 1 (default: the preset's)")


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--iterative-steps", type=_int_at_least(1), default=None,
                   help="steps of the ratio schedule (default: the preset's)")
    g.add_argument("--calibration-samples", type=_int_at_least(1), default=None,
                   help="images of the calibration set (default: the preset's)")
    g.add_argument("--connect-lam", type=_lam, default=None, help="CoNNect lambda for plain `connect` "
                                                                  "(default: the library default)")
    g.add_argument("--max-pruning-ratio", type=_ratio, default=1.0, help="most a layer may lose (default: 1.0)")
    g.add_argument("--bn-refresh-every", type=_int_at_least(0), default=None, metavar="N",
                   help="re-estimate BatchNorm statistics on the calibration images before every N-th "
                        "pruning step (default: the preset's, 0: never)")


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--ft-epochs", type=_int_at_least(1), default=None, help="fine-tuning epochs (default: the preset's)")
    g.add_argument("--ft-schedule", choices=FT_SCHEDULES, default=None,
                   help="learning rate: 'step' (the preset's milestones) or 'cosine' to 0 over every batch "
                        "(default: the preset's)")
    g.add_argument("--short-ft-steps", type=_int_at_least(0), default=None,
                   help="steps of the short fixed-budget fine-tuning, 0 for none (default: the preset's)")


def build_parser() -> argparse.ArgumentParser:
    """The ``connect-tp`` argument parser; each command has only its own options."""
    parser = _Parser(prog="connect-tp", description="CoNNect pruning benchmark: train, prune and fine-tune a model, "
                                                    "then tabulate accuracy against MAC speed-up.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="run `connect-tp COMMAND --help` for the options of a command\n\n"
                            "example:\n  connect-tp run --preset smoke --seed 0")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = {"train": (_add_run_options, _add_train_options),
               "prune": (_add_run_options, _add_target_options, _add_prune_options),
               "finetune": (_add_run_options, _add_target_options, _add_finetune_options),
               "run": (_add_run_options, _add_train_options, _add_target_options, _add_prune_options,
                       _add_finetune_options)}
    parser.commands = {}
    for name in ("train", "prune", "finetune", "table", "run"):
        p = parser.commands[name] = sub.add_parser(name, help=_HELP[name],
                           description=_DESCRIPTIONS[name], epilog=_EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "table":
            p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR",
                           help="run folders of one configuration (e.g. runs/offline/seed*)")
            p.add_argument("--output", required=True, help="folder for table.md, table.json and plot.png")
        for add in options.get(name, ()):
            add(p)
    return parser


# ------------------------------------------------------------------------------------------------
def _config(args: argparse.Namespace):
    return resolve_config(
        args.preset, args.seed, out=args.out, device=args.device, methods=getattr(args, "methods", None),
        speed_ups=getattr(args, "speed_ups", None), epochs=getattr(args, "epochs", None),
        ft_epochs=getattr(args, "ft_epochs", None), iterative_steps=getattr(args, "iterative_steps", None),
        calibration_samples=getattr(args, "calibration_samples", None),
        short_ft_steps=getattr(args, "short_ft_steps", None), connect_lam=getattr(args, "connect_lam", None),
        max_pruning_ratio=getattr(args, "max_pruning_ratio", 1.0), ft_schedule=getattr(args, "ft_schedule", None),
        bn_refresh_every=getattr(args, "bn_refresh_every", None))


def _command_line(argv: List[str]) -> str:
    return shlex.join(["connect-tp", *argv])


def _resume_command(argv: List[str]) -> str:
    return _command_line(list(argv) + ([] if "--resume" in argv else ["--resume"]))


class _Session:
    """What one invocation has written so far (for the message after an interruption)."""

    def __init__(self) -> None:
        self.run = None  # the RunFolder once a run command started


def _cmd_table(args: argparse.Namespace, argv: List[str], session: _Session) -> None:
    from .files import check_output_folder
    from .pipeline.console import note
    from .pipeline.lock import RunLock
    from .pipeline.table import stage_table

    check_output_folder(args.output)
    with RunLock(args.output, _command_line(argv), note=note):
        stage_table(args.runs, args.output)


def _cmd_run_stages(args: argparse.Namespace, argv: List[str], session: _Session) -> None:
    cfg = _config(args)  # every value checked before anything is created
    from .files import check_output_folder
    from .pipeline.console import note
    from .pipeline.lock import RunLock
    from .pipeline.rundir import RunFolder

    _check_cuda(cfg["device"])
    out = cfg["out"]
    check_output_folder(out)
    rank = int(os.environ.get("RANK", "0"))
    lock = RunLock(out, _command_line(argv), note=note)
    if rank == 0:  # under torchrun rank 0 writes; if it cannot lock, torchrun stops the other ranks
        lock.acquire()
    try:
        import torch

        from .pipeline import stages
        from .training import cleanup_distributed, init_distributed

        if args.threads:
            torch.set_num_threads(args.threads)
        dist_ctx = init_distributed(cfg["device"])
        if dist_ctx.enabled and cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{dist_ctx.local_rank}"
        run = RunFolder(out)
        session.run = run
        try:
            ctx = stages.Context(cfg, run, dist_ctx, resume=args.resume, force=args.force, data_dir=args.data_dir,
                                 download=args.download, workers=args.workers)
            if args.command in ("train", "run"):
                stages.stage_train(ctx)
            if args.command in ("prune", "run"):
                stages.stage_prune(ctx)
            if args.command in ("finetune", "run"):
                stages.stage_finetune(ctx)
            if args.command == "run" and dist_ctx.is_main:
                from .pipeline.table import stage_table

                table_dir = os.path.join(out, "table")
                with RunLock(table_dir, _command_line(argv), note=note):
                    stage_table([out], table_dir)
        finally:
            cleanup_distributed()
    finally:
        lock.release()


def _check_cuda(device: str) -> None:
    """A CUDA device must exist before anything is written (a CPU run never imports torch here)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was given but CUDA is not available; use --device cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def _error_message(exc: BaseException, command: str) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        message = f"error: {exc.filename}: {exc.strerror}"
        if getattr(exc, "report", None):  # what was written before the failure (table files)
            message += f"; {exc.report}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            # `table` has no --resume: it rewrites all its files each time.
            message += ("; free some space, then rerun this command" if command == "table"
                        else "; free some space, then rerun with --resume")
        return message
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        return f"error: {exc.strerror}"
    return f"error: {exc}"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``connect-tp`` console script; returns the exit status (0, 1 or 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.commands[args.command].error(
                f"unrecognized arguments: {' '.join(extra)} (`connect-tp {args.command} --help` lists the options "
                f"of this command)")
    except SystemExit as exc:  # --help (0) or a usage error (1)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    from .pipeline.console import error, note

    session = _Session()
    start = time.time()
    try:
        if args.command == "table":
            _cmd_table(args, argv, session)
        else:
            _cmd_run_stages(args, argv, session)
    except KeyboardInterrupt:
        lines = ["interrupted after %.0f s." % (time.time() - start)]
        if session.run is not None:
            lines += session.run.saved_report() or ["nothing was saved by this command."]
        if args.command == "table":
            lines.append("rerun the command to write the table.")
        else:
            lines.append(f"to continue: {_resume_command(argv)}")
        for line in lines:
            note(line)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line, never a traceback
        known = _known_errors()
        if not isinstance(exc, known):
            raise
        if session.run is not None:  # what is on disk, then the error as the last line
            for line in session.run.saved_report():
                note(f"{args.command}: {line}")
        error(" ".join(_error_message(exc, args.command).split()))  # one line, whatever the exception held
        return EXIT_ERROR
    return EXIT_OK


def _known_errors() -> tuple:
    """Error types that end a command with one ``error:`` line (anything else is a bug: traceback)."""
    from .files import CheckpointError
    from .pipeline.lock import LockError
    from .pipeline.provenance import ProvenanceError

    known: List[Any] = [OSError, CheckpointError, LockError, ProvenanceError, ConfigError, FloatingPointError]
    if "connect_tp.pruning" in sys.modules:
        known.append(sys.modules["connect_tp.pruning"].UnreachableSpeedUp)
    if "connect_tp.data" in sys.modules:
        known.append(sys.modules["connect_tp.data"].DatasetError)
    if "connect_tp.connectivity" in sys.modules:
        known.append(sys.modules["connect_tp.connectivity"].ConnectivityError)
    return tuple(known)


if __name__ == "__main__":
    sys.exit(main())
