"""The ``connect-tp`` command line without training: help, argument checks, locks, errors, Ctrl-C, file modes.

Each test here takes well under a few seconds: the checks it exercises happen before any model is
trained (``tests/test_pipeline.py`` runs the stages end to end). Failure cases covered
here: bad speed-ups, steps, samples and epochs; unwritable output folders; two writers on one
folder; malformed result files; a full disk; Ctrl-C; the umask; tables of runs that differ.
"""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

from connect_tp.cli import build_parser, main
from connect_tp.pipeline.lock import LOCK_NAME, LockError, RunLock
from patience import patience

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "connect_tp.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=patience(120), env=ENV, **kwargs)


def _last_line(text):
    return [line for line in text.strip().splitlines() if line.strip()][-1]


# ------------------------------------------------------------------------------------------------ help
def test_parser_and_help_import_no_torch():
    code = ("import sys; from connect_tp.cli import build_parser, main; build_parser(); "
            "assert main(['prune', '--help']) == 0; "
            "heavy = [m for m in ('torch', 'torch_pruning', 'torchvision', 'connect_tp.pipeline.stages') "
            "if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=patience(60),
                          env=ENV)
    assert done.returncode == 0, done.stderr


def test_help_answers_fast():
    start = time.perf_counter()
    done = _cli("--help")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "train" in done.stdout and "finetune" in done.stdout
    assert elapsed < patience(3.0), f"connect-tp --help took {elapsed:.1f} s"


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


def test_help_gives_every_default_and_it_is_the_true_one():
    import argparse

    parser = build_parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            if action.default in (None, False, argparse.SUPPRESS) or action.required or not action.option_strings:
                continue
            shown = re.search(r"default: ([^;)]+)", action.help or "")
            assert shown, f"connect-tp {name} --help: {action.option_strings[0]} does not give its default"
            assert os.path.normpath(shown[1]) == os.path.normpath(str(action.default)), \
                f"connect-tp {name} --help: {action.option_strings[0]} says {shown[1]}, the default is {action.default!r}"
    run = {a.dest: a for a in parser.commands["run"]._actions}
    assert "default:" in run["threads"].help and "OMP_NUM_THREADS" in run["threads"].help
    assert run["data_dir"].default == "data" and "default: ./data" in run["data_dir"].help


def test_data_dir_help_names_every_folder_searched(tmp_path, monkeypatch):
    # The demo read Fashion-MNIST from Debian's folder while --help said ./data: the help must name both.
    from connect_tp import data

    run = {a.dest: a for a in build_parser().commands["run"]._actions}
    assert data.DEBIAN_FASHION_MNIST_DIR in run["data_dir"].help
    if not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR):
        pytest.skip("needs Debian's dataset-fashion-mnist")
    monkeypatch.chdir(tmp_path)  # no ./data here: the default --data-dir falls through to Debian's copy
    images, labels = data.read_fashion_mnist(run["data_dir"].default, train=False)
    assert len(labels) == 10000


def test_threads_default_is_torchs_own_choice(tmp_path, monkeypatch):
    # No --threads: the command leaves torch's thread count alone (what the help says).
    import torch

    from connect_tp.pipeline import stages

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    monkeypatch.setattr(stages, "stage_train", lambda ctx: None)
    assert main(["train", "--preset", "smoke", "--out", str(tmp_path / "a")]) == 0
    assert seen == []
    assert main(["train", "--preset", "smoke", "--out", str(tmp_path / "b"), "--threads", "3"]) == 0
    assert seen == [3]


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
    (["prune", "--methods", "connect-k-1"], "the balance kappa must be a finite number >= 0"),
    (["prune", "--methods", "l2", "connect-lam1e400"], "lambda must be a number in [0, 1e+12], got 1e400"),
    (["prune", "--methods", "connect-lam-1"], "lambda must be a number in [0, 1e+12], got -1"),
    (["prune", "--methods", "connect-k1e400"], "got 1e400"),
    (["run", "--methods", "connect-k1-lam2"], "gives both a balance (-k) and a lambda (-lam)"),
    (["finetune", "--methods", "connect-k3-bnfoo"], "unknown BatchNorm treatment -bnfoo"),
    (["prune", "--connect-lam", "1e13"], "--connect-lam: must be a finite number >= 0 and <= 1e+12"),
    (["train", "--device", "bogus"], "must be cpu, cuda or cuda:<index>, got 'bogus'"),
    (["train", "--device", "meta"], "the meta device holds no data"),
    (["run", "--device", "cuda:x"], "must be cpu, cuda or cuda:<index>"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(args + ["--preset", "smoke", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and "error:" in _last_line(err) and "Traceback" not in err
    assert not out.exists(), "nothing may be created before the arguments are checked"


def test_a_cuda_device_that_is_not_there_stops_before_any_work(tmp_path, capsys):
    import torch

    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--out", str(out), "--device", missing]) == 1
    err = capsys.readouterr().err
    assert _last_line(err).startswith(f"error: --device {missing}") and "Traceback" not in err
    assert not out.exists()


def test_method_name_ranges_are_the_importance_ranges():
    # The parser refuses exactly what ConnectImportance would refuse later, after the data load.
    import math

    from connect_tp.connectivity import BN_FLOWS
    from connect_tp.importance import MAX_LAMBDA, ConnectImportance
    from connect_tp.methods import BN_FLOW_NAMES, MAX_LAMBDA as NAME_MAX_LAMBDA, connect_options, parse_method

    assert NAME_MAX_LAMBDA == MAX_LAMBDA and tuple(BN_FLOW_NAMES) == tuple(BN_FLOWS)
    for name in ("connect-k-1", "connect-k0", "connect-k100", "connect-kinf", "connect-k1e400", "connect-lam-1",
                 "connect-lam0", "connect-lam1e12", "connect-lam1.1e12", "connect-lam1e400", "connect-k3-bnidentity",
                 "connect-k3-bnnone", "connect-k1-lam1"):
        try:
            parse_method(name)
            parsed = True
        except ValueError:
            parsed = False
        try:
            ConnectImportance(**connect_options(name)) if parsed else None
            built = parsed
        except ValueError:
            built = False
        assert parsed == built, f"{name}: parser {'accepts' if parsed else 'refuses'} it, ConnectImportance does not"
    assert parse_method("connect-kinf")[1]["balance"] == math.inf


def _fake_base(folder, content, seed=0):
    """A run folder whose base.json is fingerprinted for a base.pt holding ``content`` (sha256 matching)."""
    import torch

    from connect_tp.files import sha256_file

    os.makedirs(folder, exist_ok=True)
    torch.save(content, folder / "base.pt")
    base = {"preset": "smoke", "seed": seed, "dataset": "fashion_mnist", "model": "resnet20", "epochs": 1,
            "acc": 50.0, "macs": 4e7, "params": 2.7e5,
            "provenance": {"stage": "train", "config": {}, "parent": None,
                           "output": {"path": "base.pt", "sha256": sha256_file(str(folder / "base.pt"))}}}
    (folder / "base.json").write_text(json.dumps(base))
    return folder


@pytest.mark.parametrize("content, message", [
    ("tensor", "holds a Tensor, not a model"),
    ({"arch": {"model": "resnet999", "num_classes": 10, "in_channels": 1}, "state_dict": {}, "best_state_dict": {}},
     "names an unknown model 'resnet999'"),
    ({"arch": "resnet20", "state_dict": {}, "best_state_dict": {}}, "holds a malformed model"),
    ({"arch": {"model": "resnet20", "num_classes": 10, "in_channels": 1}, "state_dict": {"conv1.weight": "w"}},
     "does not fit model resnet20"),
    ({"arch": {"model": "resnet20", "num_classes": 10, "in_channels": 1}, "state_dict": {}},
     "Missing key(s) in state_dict"),  # torch's message spans lines: still one error line
])
def test_checkpoint_of_the_wrong_content_with_a_matching_sha256_is_one_error(tmp_path, capsys, content, message):
    import torch

    content = torch.zeros(3) if content == "tensor" else content
    out = _fake_base(tmp_path / "run", content)
    assert main(["prune", "--preset", "smoke", "--out", str(out), "--methods", "l2", "--speed-up", "2"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in _last_line(err), err
    assert _last_line(err).startswith(f"error: checkpoint {out / 'base.pt'}")
    assert [line for line in err.splitlines() if line.strip()] == [_last_line(err)], "one error line"
    assert not (out / "pruned").exists() and not (out / "results").exists()


def test_pruned_checkpoint_that_is_a_tensor_stops_finetune_before_any_training(tmp_path, capsys):
    import torch

    from connect_tp.files import sha256_file

    out = _fake_base(tmp_path / "run", torch.zeros(3))
    base_sha = json.loads((out / "base.json").read_text())["provenance"]["output"]["sha256"]
    os.remove(out / "base.pt")  # fine-tuning checks the pruned models against base.json's record
    from connect_tp.models import create_model

    good = {"arch": {"model": "resnet20", "num_classes": 10, "in_channels": 1},
            "state_dict": create_model("resnet20", 10, 1).state_dict()}
    for target, content in ((2.0, good), (4.0, torch.zeros(3))):  # the bad one comes second
        (out / "pruned").mkdir(exist_ok=True)
        torch.save(content, out / "pruned" / f"l2_{target:g}x.pt")
        prune = {"stage": "prune", "config": {"preset": "smoke", "seed": 0, "method": "l2", "target_speed_up": target},
                 "parent": {"path": "base.pt", "sha256": base_sha},
                 "output": {"sha256": sha256_file(str(out / "pruned" / f"l2_{target:g}x.pt"))}}
        make_run(out, [fake_result(target=target, preset="smoke", provenance={"prune": prune})])
    assert main(["finetune", "--preset", "smoke", "--out", str(out), "--methods", "l2", "--speed-up", "2", "4"]) == 1
    err = capsys.readouterr().err
    assert _last_line(err).startswith(f"error: checkpoint {out / 'pruned' / 'l2_4x.pt'} holds a Tensor, not a model")
    assert "Traceback" not in err and not (out / "finetuned").exists(), "no fine-tuning may start"


def test_missing_dataset_stops_train_before_the_old_base_is_removed(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "base.json").write_text("{}")
    (out / "base.pt").write_bytes(b"the previous base model")
    assert main(["train", "--preset", "paper-resnet56", "--out", str(out), "--data-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "cifar" in _last_line(err).lower() and "Traceback" not in err
    assert (out / "base.json").exists() and (out / "base.pt").read_bytes() == b"the previous base model"


def test_training_checkpoint_that_is_a_tensor_is_one_error(tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    out.mkdir()
    torch.save(torch.zeros(3), out / "base.pt")
    assert main(["train", "--preset", "smoke", "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert _last_line(err) .startswith(f"error: checkpoint {out / 'base.pt'} holds a Tensor") and "Traceback" not in err


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


def _unwritable_folder(kind, tmp_path):
    """A folder this process cannot write a file into, also as root (``/proc`` refuses new files to everyone)."""
    if kind == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the /proc case covers root")
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        return str(locked)
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    return "/proc/self"


@pytest.mark.parametrize("kind", ["chmod", "proc"])
@pytest.mark.parametrize("command", [["train", "--preset", "smoke", "--out"], ["table", "--runs", "RUN", "--output"]])
def test_output_folder_that_is_not_writable_is_named(tmp_path, capsys, kind, command):
    folder = _unwritable_folder(kind, tmp_path)
    run = make_run(tmp_path / "run", [fake_result()])
    args = [str(run) if a == "RUN" else a for a in command] + [folder]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert _last_line(err).startswith(f"error: {folder}: the output folder is not writable"), err
    assert "Traceback" not in err


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
    assert time.perf_counter() - start < patience(5)
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


SHA_A, SHA_B = "a" * 64, "b" * 64


def make_base(folder, seed=0, sha=SHA_A, **over):
    """A ``base.json`` fingerprinted for a base.pt of hash ``sha`` (None: written without fingerprint)."""
    os.makedirs(folder, exist_ok=True)
    base = {"preset": "smoke", "seed": seed, "dataset": "fashion_mnist", "model": "resnet20", "epochs": 1,
            "acc": 80.0, "macs": 4e7, "params": 2.7e5}
    if sha is not None:
        base["provenance"] = {"stage": "train", "config": {"epochs": 1}, "output": {"path": "base.pt", "sha256": sha}}
    base.update(over)
    (folder / "base.json").write_text(json.dumps(base))
    return folder


def pruned_from(sha, seed=0, pruned="c" * 64, **over):
    """A fingerprinted result pruned from the base of hash ``sha``."""
    prune = {"stage": "prune", "config": {"seed": seed}, "parent": {"path": "base.pt", "sha256": sha},
             "output": {"path": "pruned/l2_2x.pt", "sha256": pruned}}
    return fake_result(seed=seed, provenance={"prune": prune}, **over)


def test_table_refuses_results_pruned_from_another_base(tmp_path, capsys):
    # The base was trained again in the folder after pruning: its accuracy is not the parent of these rows.
    run = make_run(make_base(tmp_path / "run", sha=SHA_B), [pruned_from(SHA_A)])
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith(f"error: {run / 'results' / 'l2_2x.json'} was pruned from another base model (sha256 "
                          f"{SHA_A[:12]}") and str(run / "base.json") in err and SHA_B[:12] in err
    assert "--resume" in err and "--force" in err and not (tmp_path / "t" / "table.md").exists()
    make_base(run, sha=SHA_A)  # the base the results were pruned from: accepted
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 0


def test_table_refuses_results_whose_base_is_missing_or_replaced(tmp_path, capsys):
    run = make_run(tmp_path / "run", [pruned_from(SHA_A)])
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert str(run / "results" / "l2_2x.json") in err and f"{run / 'base.json'} is missing" in err
    (run / "base.pt").write_bytes(b"a base model trained since")
    make_base(run, sha=SHA_A)
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert f"{run / 'base.pt'}" in err and f"is not the model {run / 'base.json'} was written for" in err


def test_table_refuses_fine_tuning_numbers_of_another_pruned_model(tmp_path, capsys):
    result = pruned_from(SHA_A)
    result["provenance"]["finetune"] = {"stage": "finetune", "config": {}, "parent": {"sha256": "d" * 64}}
    run = make_run(make_base(tmp_path / "run", sha=SHA_A), [result])
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 1
    assert "its finetune numbers come from another pruned model" in _last_line(capsys.readouterr().err)


def test_table_checks_the_base_fields_of_results_without_fingerprint(tmp_path, capsys):
    run = make_run(make_base(tmp_path / "run", sha=None, acc=17.97), [fake_result(base_acc=24.22)])
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert "base_acc=24.22 there, acc=17.97" in err and str(run / "base.json") in err


def test_table_refuses_the_same_folder_twice(tmp_path, capsys):
    run = make_run(make_base(tmp_path / "W", sha=SHA_A), [pruned_from(SHA_A)])
    os.symlink(run, tmp_path / "link")
    for other in (str(run), str(run) + os.sep, str(tmp_path / "link")):
        assert main(["table", "--runs", str(run), other, "--output", str(tmp_path / "t")]) == 1
        err = _last_line(capsys.readouterr().err)
        assert err == f"error: {run} and {other} are the same run folder; give each seed's folder once"
    assert not (tmp_path / "t" / "table.md").exists()


def test_table_refuses_a_copied_seed_folder(tmp_path, capsys):
    import shutil

    run = make_run(make_base(tmp_path / "seed0", sha=SHA_A), [pruned_from(SHA_A)])
    copy = shutil.copytree(run, tmp_path / "seed0-copy")
    assert main(["table", "--runs", str(run), str(copy), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert str(run / "base.json") in err and str(copy / "base.json") in err and "both the base model of seed 0" in err
    os.remove(run / "base.json")  # without base models, the results name the seed
    os.remove(copy / "base.json")
    legacy = make_run(tmp_path / "a", [fake_result(seed=1)]), make_run(tmp_path / "b", [fake_result(seed=1)])
    assert main(["table", "--runs", *map(str, legacy), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert str(legacy[0] / "results" / "l2_2x.json") in err and str(legacy[1] / "results" / "l2_2x.json") in err
    assert "both seed 1 of l2 at 2x" in err


def test_table_of_a_demo_preset_says_it_cannot_rank_methods(tmp_path, capsys):
    from connect_tp.pipeline.config import PRESET_CAVEATS

    a = make_run(tmp_path / "seed0", [fake_result(seed=0, preset="offline")])
    b = make_run(tmp_path / "seed1", [fake_result(seed=1, preset="offline")])
    assert main(["table", "--runs", str(a), str(b), "--output", str(tmp_path / "t")]) == 0
    markdown = (tmp_path / "t" / "table.md").read_text()
    assert "cannot rank them" in PRESET_CAVEATS["offline"] and f"**Caveat: {PRESET_CAVEATS['offline']}.**" in markdown
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    assert table["preset"] == "offline" and table["seeds"] == [0, 1] and table["caveat"] == PRESET_CAVEATS["offline"]
    c = make_run(tmp_path / "ranking", [fake_result(seed=0, preset="ranking")])
    assert main(["table", "--runs", str(c), "--output", str(tmp_path / "r")]) == 0
    assert "Caveat" not in (tmp_path / "r" / "table.md").read_text()


def test_plot_shows_targets_series_title_and_caveat(monkeypatch):
    # The figure is inspected before it is rendered: ticks, legends outside the axes, title, series.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from connect_tp.pipeline import table

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    stat = lambda v: {"mean": v, "std": 1.0, "n": 2}  # noqa: E731
    nan = {"mean": float("nan"), "std": float("nan"), "n": 0}
    rows = [{"method": m, "target_speed_up": t, "speed_up": stat(t * 1.05), "finetuned_acc": stat(70.0),
             "pruned_acc": stat(40.0), "pruned_acc_bn_recalibrated": stat(55.0) if m == "l2" else nan}
            for m in ("connect", "l2") for t in (2.5, 8.0, 16.0)]
    png = table.render_plot(rows, stat(80.0), title="resnet20, preset offline, seeds 0, 1", caveat="it cannot rank")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figures[-1]
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [2.5, 8.0, 16.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2.5x", "8x", "16x"]
    assert fig._suptitle.get_text() == "resnet20, preset offline, seeds 0, 1" and "it cannot rank" in ax.get_title(loc="left")
    legends = [a for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
    labels = {t.get_text() for legend in legends for t in legend.get_texts()}
    assert {"connect", "l2", "fine-tuned", "pruned + BN re-estimated", "pruned", "base model"} <= labels
    fig.canvas.draw()
    axes_box = ax.get_window_extent()
    for legend in legends:  # outside the data: right of the axes, or below them
        box = legend.get_window_extent()
        assert box.x0 >= axes_box.x1 or box.y1 <= axes_box.y0, (box, axes_box)
    boxes = [legend.get_window_extent() for legend in legends]
    assert not boxes[0].overlaps(boxes[1]), "the two legends overlap"
    # The saved image is cropped to its content: it must reach the legend on the right, not stop at the axes.
    import struct

    width_px = struct.unpack(">I", png[16:20])[0]
    right = max(b.x1 for b in boxes)
    assert width_px >= (right - axes_box.x0) * 120 / fig.dpi, "the PNG is cropped before the legend"
    height_px = struct.unpack(">I", png[20:24])[0]
    top = fig._suptitle.get_window_extent().y1
    bottom = min([axes_box.y0] + [b.y0 for b in boxes])
    assert height_px >= (top - bottom) * 120 / fig.dpi - 2, "the PNG is cropped below the title"
    for row in rows:
        row["pruned_acc_bn_recalibrated"] = nan  # results without it: no such series
    table.render_plot(rows, stat(80.0), title="t")
    labels = {t.get_text() for a in figures[-1].axes[0].get_children() if isinstance(a, matplotlib.legend.Legend)
              for t in a.get_texts()}
    assert "pruned + BN re-estimated" not in labels and "pruned" in labels


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
    assert last.startswith(f"error: {out / 'table.json'}: cannot write this file") and "free some space" in last
    # What was written, and what to do: `table` has no --resume.
    assert "wrote table.md only; table.json, plot.png in" in last and last.endswith("then rerun this command")
    assert "--resume" not in done.stderr and "Traceback" not in done.stderr
    assert (out / "table.md").exists() and not (out / "table.json").exists() and not (out / "plot.png").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], "no temporary file may be left behind"
    assert not (out / LOCK_NAME).exists()


def test_checkpoint_on_a_full_disk_is_an_oserror_naming_the_file(tmp_path):
    code = ("import sys, torch; from connect_tp.pipeline.files import atomic_save\n"
            "try:\n    atomic_save({'w': torch.zeros(100000)}, sys.argv[1])\n"
            "except OSError as exc:\n    print(exc.filename, exc.strerror)\n")
    path = tmp_path / "big.pt"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=patience(120),
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
