"""The ``connect-tp`` command line without training: help, argument checks, locks, errors, Ctrl-C, file modes.

Each test here takes well under a few seconds: the checks it exercises happen before any model is
trained (``tests/test_pipeline.py`` runs the stages end to end). Rows of issue 10's table covered
here: bad speed-ups, steps, samples and epochs; unwritable output folders; two writers on one
folder; malformed result files; a full disk; Ctrl-C; the umask; tables of runs that differ.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from connect_tp.cli import build_parser, main
from connect_tp.pipeline.lock import LOCK_NAME, LockError, RunLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "connect_tp.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=ENV, **kwargs)


def _last_line(text):
    return [line for line in text.strip().splitlines() if line.strip()][-1]


# ------------------------------------------------------------------------------------------------ help
def test_parser_and_help_import_no_torch():
    code = ("import sys; from connect_tp.cli import build_parser, main; build_parser(); "
            "assert main(['prune', '--help']) == 0; "
            "heavy = [m for m in ('torch', 'torch_pruning', 'torchvision', 'connect_tp.pipeline.stages') "
            "if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0, done.stderr


def test_help_answers_fast():
    start = time.perf_counter()
    done = _cli("--help")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "train" in done.stdout and "finetune" in done.stdout
    assert elapsed < 3.0, f"connect-tp --help took {elapsed:.1f} s"


@pytest.mark.parametrize("command, present, absent", [
    ("train", ["--epochs", "--resume", "--force"], ["--methods", "--speed-up", "--ft-epochs", "--iterative-steps"]),
    ("prune", ["--methods", "--speed-up", "--iterative-steps", "--calibration-samples"], ["--epochs", "--ft-epochs"]),
    ("finetune", ["--methods", "--speed-up", "--ft-epochs"], ["--epochs", "--iterative-steps", "--connect-lam"]),
    ("table", ["--runs", "--output"], ["--preset", "--methods", "--resume"]),
    ("run", ["--epochs", "--methods", "--ft-epochs", "--iterative-steps"], ["--runs"]),
])
def test_each_command_shows_only_its_own_options_and_an_example(command, present, absent, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for flag in present:
        assert flag in text
    for flag in absent:
        assert flag not in text, f"{command} --help lists {flag}"
    assert f"connect-tp {command} --" in text.split("example")[-1]


def test_option_of_another_command_is_an_error_naming_the_command(capsys):
    assert main(["train", "--methods", "l2"]) == 1
    err = capsys.readouterr().err
    assert "connect-tp train" in err and "--methods" in err and "error:" in _last_line(err)


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("args, message", [
    (["prune", "--speed-up", "1000", "nan"], "finite number > 1"),
    (["prune", "--speed-up", "inf"], "finite number > 1"),
    (["prune", "--speed-up", "1"], "finite number > 1"),
    (["prune", "--speed-up", "0.5"], "finite number > 1"),
    (["prune", "--iterative-steps", "0"], "--iterative-steps: must be an integer >= 1"),
    (["prune", "--calibration-samples", "0"], "--calibration-samples: must be an integer >= 1"),
    (["prune", "--max-pruning-ratio", "0"], "(0, 1]"),
    (["prune", "--connect-lam", "nan"], "finite number >= 0"),
    (["prune", "--methods", "l3"], "unknown pruning method 'l3'"),
    (["train", "--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["finetune", "--ft-epochs", "0"], "--ft-epochs: must be an integer >= 1"),
    (["train", "--seed", "-1"], "--seed: must be an integer >= 0"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(args + ["--preset", "smoke", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "error:" in _last_line(err) and "Traceback" not in err
    assert not out.exists(), "nothing may be created before the arguments are checked"


def test_output_folder_that_cannot_be_created_is_named(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert main(["train", "--preset", "smoke", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert _last_line(err).startswith(f"error: {out}: cannot create the output folder")
    assert main(["table", "--runs", str(tmp_path), "--output", str(blocker / "x")]) == 1
    assert _last_line(capsys.readouterr().err).startswith(f"error: {blocker / 'x'}: cannot create the output folder")
    assert main(["table", "--runs", str(tmp_path), "--output", str(blocker)]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_that_is_not_writable_is_named(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    assert main(["train", "--preset", "smoke", "--out", str(locked)]) == 1
    assert "not writable" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ one writer
@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of ``tmp_path / 'run'`` (killed at the end)."""
    folder = tmp_path / "run"
    code = ("import sys, time; from connect_tp.pipeline.lock import RunLock; "
            "RunLock(sys.argv[1], 'connect-tp train --out ' + sys.argv[1]).acquire(); print('locked', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_at_once(holder, capsys):
    folder, proc = holder
    start = time.perf_counter()
    assert main(["train", "--preset", "smoke", "--out", str(folder)]) == 1
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert f"pid {proc.pid}" in err and f"connect-tp train --out {folder}" in err and "in use" in err
    assert os.listdir(folder) == [LOCK_NAME], "the refused writer must not touch the folder"
    with pytest.raises(LockError, match=f"pid {proc.pid}"):
        RunLock(str(folder), "x").acquire()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(holder, capsys):
    folder, proc = holder
    proc.kill()
    proc.wait()
    notes = []
    lock = RunLock(str(folder), "connect-tp prune", note=notes.append)
    lock.acquire()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "no longer runs" in notes[0]
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_NAME).exists()


def test_lock_is_released_after_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--preset", "smoke", "--out", str(out), "--methods", "l2"]) == 1
    assert "base.json is missing" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------ results and tables
def fake_result(method="l2", target=2.0, seed=0, **over):
    r = {"preset": "smoke", "seed": seed, "dataset": "fashion_mnist", "model": "resnet20", "method": method,
         "target_speed_up": target, "speed_up": target + 0.1, "step": 5, "iterative_steps": 40,
         "max_pruning_ratio": 1.0, "macs": 1e6, "params": 1e4, "base_macs": 4e7, "base_params": 2.7e5,
         "base_acc": 80.0, "pruned_acc": 50.0 + seed, "pruned_acc_bn_recalibrated": 60.0, "finetuned_acc": 70.0 + seed,
         "collapsed_layers": [], "channels": {}}
    r.update(over)
    return r


def make_run(folder, results):
    os.makedirs(folder / "results", exist_ok=True)
    for r in results:
        (folder / "results" / f"{r['method']}_{r['target_speed_up']:g}x.json").write_text(json.dumps(r))
    return folder


def test_table_averages_seeds(tmp_path, capsys):
    a = make_run(tmp_path / "seed0", [fake_result(seed=0)])
    b = make_run(tmp_path / "seed1", [fake_result(seed=1)])
    assert main(["table", "--runs", str(a), str(b), "--output", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "| 2x | l2 |" in out and "50.50 ± 0.71" in out
    assert _last_line(out) == (f"table: wrote {tmp_path / 't' / 'table.md'}, {tmp_path / 't' / 'table.json'}, "
                               f"{tmp_path / 't' / 'plot.png'}")


@pytest.mark.parametrize("field, other", [("preset", "offline"), ("iterative_steps", 15), ("finetune_epochs", 6)])
def test_table_refuses_runs_whose_configs_differ(tmp_path, capsys, field, other):
    a = make_run(tmp_path / "A", [fake_result(seed=0, finetune_epochs=1)])
    b = make_run(tmp_path / "B", [fake_result(seed=1, **dict({"finetune_epochs": 1}, **{field: other}))])
    assert main(["table", "--runs", str(a), str(b), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("error: the runs differ in more than the seed") and field in err
    assert str(a) in err and str(b) in err
    assert not (tmp_path / "t" / "table.md").exists()


def test_table_refuses_fingerprinted_runs_that_differ_in_the_fine_tuning_recipe(tmp_path, capsys):
    fp = {"stage": "finetune", "config": {"lr": 0.01, "epochs": 1, "seed": 0}}
    a = make_run(tmp_path / "A", [fake_result(seed=0, provenance={"finetune": fp})])
    b = make_run(tmp_path / "B", [fake_result(seed=1, provenance={"finetune": dict(fp, config={"lr": 0.1, "epochs": 1,
                                                                                                 "seed": 1})})])
    assert main(["table", "--runs", str(a), str(b), "--output", str(tmp_path / "t")]) == 1
    assert "finetune.lr" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("[]", "a JSON list instead of an object"),
    (json.dumps({"method": "l2"}), "key 'preset' is missing"),
    (json.dumps(fake_result(method=3)), "'method' is 3"),
    (json.dumps(fake_result(speed_up="fast")), "'speed_up' is 'fast'"),
    ('{"method": ', "is corrupt"),
])
def test_malformed_result_is_one_error_naming_the_file(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "results" / "l2_2x.json").write_text(content)
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and _last_line(err).startswith("error:")
    assert str(run / "results" / "l2_2x.json") in _last_line(err) and message in _last_line(err)


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_one_error_naming_the_file(tmp_path):
    run = make_run(tmp_path / "run", [fake_result(target=t) for t in (2.0, 4.0, 8.0)])
    out = tmp_path / "t"
    done = _cli("table", "--runs", str(run), "--output", str(out), preexec_fn=_limit_file_size(2048))
    assert done.returncode == 1, done.stderr
    last = _last_line(done.stderr)
    assert last.startswith(f"error: {out}") and "cannot write this file" in last and "free some space" in last
    assert "Traceback" not in done.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], "no temporary file may be left behind"
    assert not (out / LOCK_NAME).exists()


def test_checkpoint_on_a_full_disk_is_an_oserror_naming_the_file(tmp_path):
    code = ("import sys, torch; from connect_tp.pipeline.files import atomic_save\n"
            "try:\n    atomic_save({'w': torch.zeros(100000)}, sys.argv[1])\n"
            "except OSError as exc:\n    print(exc.filename, exc.strerror)\n")
    path = tmp_path / "big.pt"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env=ENV, preexec_fn=_limit_file_size(4096))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path} cannot write this file")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_output_files_respect_the_umask(tmp_path, umask, mode):
    run = make_run(tmp_path / "run", [fake_result()])
    out = tmp_path / "t"
    done = _cli("table", "--runs", str(run), "--output", str(out), preexec_fn=lambda: os.umask(umask))
    assert done.returncode == 0, done.stderr
    for name in ("table.md", "table.json", "plot.png"):
        assert os.stat(out / name).st_mode & 0o777 == mode, name


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, capsys, monkeypatch):
    from connect_tp.pipeline import stages

    def interrupted_training(ctx):
        ctx.run.record_partial(ctx.run.base_ckpt, 2, 3)
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "stage_train", interrupted_training)
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"{out / 'base.pt'}: 2 of 3 epochs saved (resumable)" in err
    assert _last_line(err) == f"to continue: connect-tp train --preset smoke --out {out} --resume"
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists()


def test_parser_builds_for_the_benchmark_script():
    # benchmarks/cifar_pruning.py is a thin script over the same command
    from benchmarks import cifar_pruning

    assert cifar_pruning.main is main and cifar_pruning.build_parser is build_parser
    for name in ("read_json", "atomic_write", "atomic_write_json"):
        assert callable(getattr(cifar_pruning, name))
