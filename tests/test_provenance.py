"""Runs you can trust, end to end on tiny runs: fingerprints checked on resume and reuse, legacy folders.

One small run (smoke preset, two cheap methods, one target, ten pruning steps) is trained, pruned and
fine-tuned once; every test works on a copy of it. Failure cases covered here: a prune
over a fine-tuned folder, a retrained base under ``prune --resume`` and ``finetune --resume``,
``--resume --epochs`` of another length, an unreachable speed-up, a real second writer, a full disk
during training and Ctrl-C of a real training. Folders written before fingerprints existed are
accepted after their fields are checked, with a note.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from connect_tp.cli import main
from connect_tp.data import DEBIAN_FASHION_MNIST_DIR
from connect_tp.pipeline.files import load_checkpoint, read_json, sha256_file
from connect_tp.pipeline.lock import LOCK_NAME
from patience import patience

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
                       reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
COMMON = ["--preset", "smoke", "--threads", "1"]
TARGETS = ["--methods", "l2", "random", "--speed-up", "2"]
PRUNE = TARGETS + ["--iterative-steps", "10"]


def _last_line(text):
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def stage(name, out, *extra):
    args = {"train": [], "prune": PRUNE, "finetune": TARGETS}[name]
    return main([name] + COMMON + ["--out", str(out)] + args + list(extra))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    for name in ("train", "prune", "finetune"):
        assert stage(name, out) == 0
    return out


@pytest.fixture
def run(done_run, tmp_path):
    """A fresh copy of the finished run (modification times kept)."""
    return shutil.copytree(done_run, tmp_path / "run")


def test_every_file_carries_its_fingerprint(run):
    base = read_json(str(run / "base.json"))
    assert base["provenance"]["config"]["epochs"] == 1
    assert base["provenance"]["output"]["sha256"] == sha256_file(str(run / "base.pt"))
    assert load_checkpoint(str(run / "base.pt"))["provenance"]["stage"] == "train"
    r = read_json(str(run / "results" / "l2_2x.json"))
    assert r["provenance"]["prune"]["parent"]["sha256"] == sha256_file(str(run / "base.pt"))
    assert r["provenance"]["prune"]["output"]["sha256"] == sha256_file(str(run / "pruned" / "l2_2x.pt"))
    assert r["provenance"]["finetune"]["parent"]["sha256"] == sha256_file(str(run / "pruned" / "l2_2x.pt"))
    assert r["provenance"]["finetune"]["output"]["sha256"] == sha256_file(str(run / "finetuned" / "l2_2x.pt"))
    assert load_checkpoint(str(run / "finetuned" / "l2_2x.pt"))["provenance"]["stage"] == "finetune"


def test_resume_skips_matching_work(run, capsys):
    before = {p: os.stat(p).st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for name in ("train", "prune", "finetune"):
        assert stage(name, run, "--resume") == 0
        assert "wrote no files" in _last_line(capsys.readouterr().out)
    assert {p: os.stat(p).st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_resume_with_another_number_of_epochs_is_an_error(run, capsys):
    # once a bug: `--resume --epochs 3` on a 6-epoch checkpoint wrote base.json "3 epochs" with 6 in its history
    assert stage("train", run, "--resume", "--epochs", "2") == 1
    err = _last_line(capsys.readouterr().err)
    assert f"{run / 'base.json'} holds a base model" in err and "epochs=1 there, 2 here" in err
    assert "--force" in err and "--out" in err
    os.remove(run / "base.json")  # the per-epoch checkpoint alone is checked the same way
    assert stage("train", run, "--resume", "--epochs", "2") == 1
    assert f"{run / 'base.pt'} holds a partly trained base model" in capsys.readouterr().err
    assert stage("train", run, "--resume", "--epochs", "2", "--force") == 0
    base = read_json(str(run / "base.json"))
    assert base["epochs"] == 2 and [h["epoch"] for h in base["history"]] == [0, 1]


def test_prune_resume_after_retraining_the_base_is_an_error(run, capsys):
    # once a bug: every (method, target) was skipped because the files existed
    assert stage("train", run, "--epochs", "2") == 0
    assert "removed" in capsys.readouterr().err
    assert stage("prune", run, "--resume") == 1
    err = _last_line(capsys.readouterr().err)
    assert "results/l2_2x.json holds a pruning result made from another base model" in err
    assert sha256_file(str(run / "base.pt"))[:12] in err and "--force" in err
    assert stage("prune", run, "--resume", "--force") == 0
    r = read_json(str(run / "results" / "random_2x.json"))
    assert r["provenance"]["prune"]["parent"]["sha256"] == sha256_file(str(run / "base.pt"))
    assert r["finetuned_acc"] is None, "the old fine-tuning belongs to the old pruned model"


def test_finetune_resume_after_retraining_and_repruning_is_an_error(run, capsys):
    # once a bug: the old finetuned/random_2x.pt was loaded onto the new model and 0 epochs ran
    assert stage("train", run, "--epochs", "2") == 0
    assert main(["prune"] + COMMON + ["--out", str(run), "--methods", "random", "--speed-up", "2",
                                      "--iterative-steps", "10"]) == 0
    assert "dropped the old finetune numbers" in capsys.readouterr().err
    args = COMMON + ["--out", str(run), "--methods", "random", "--speed-up", "2", "--resume"]
    assert main(["finetune"] + args) == 1
    err = _last_line(capsys.readouterr().err)
    assert "finetuned/random_2x.pt holds a partly fine-tuned model made from another pruned model" in err
    assert "--force" in err
    assert main(["finetune"] + args + ["--force"]) == 0
    r = read_json(str(run / "results" / "random_2x.json"))
    assert len(r["finetune_history"]) == 1
    assert r["provenance"]["finetune"]["parent"]["sha256"] == sha256_file(str(run / "pruned" / "random_2x.pt"))


def test_table_after_retraining_the_base_is_refused(run, tmp_path, capsys):
    # The table printed the new base's accuracy above rows pruned from the old one; prune and finetune refused.
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "before")]) == 0
    assert stage("train", run, "--epochs", "2") == 0
    capsys.readouterr()
    assert main(["table", "--runs", str(run), "--output", str(tmp_path / "after")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert err.startswith(f"error: {run / 'results' / 'l2_2x.json'} was pruned from another base model")
    assert str(run / "base.json") in err and sha256_file(str(run / "base.pt"))[:12] in err
    assert not (tmp_path / "after").exists() or not os.listdir(tmp_path / "after")


def test_table_of_a_copied_seed_folder_is_refused(run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "copy")
    assert main(["table", "--runs", str(run), str(copy), "--output", str(tmp_path / "t")]) == 1
    err = _last_line(capsys.readouterr().err)
    assert f"{run / 'base.json'} and {copy / 'base.json'} are both the base model of seed 0" in err


def test_prune_over_a_finetuned_folder_keeps_result_and_model_together(run, capsys):
    # once a bug: results/l2_2.5x.json ended with the old pruning's numbers next to the new pruned model
    assert main(["prune"] + COMMON + ["--out", str(run), "--methods", "l2", "--speed-up", "2",
                                      "--iterative-steps", "5"]) == 0
    r = read_json(str(run / "results" / "l2_2x.json"))
    assert r["iterative_steps"] == 5 and r["finetuned_acc"] is None and "finetune_history" not in r
    assert r["provenance"]["prune"]["output"]["sha256"] == sha256_file(str(run / "pruned" / "l2_2x.pt"))
    assert "dropped the old finetune numbers" in capsys.readouterr().err


def test_second_writer_during_a_real_finetune_is_refused(run, capsys):
    cmd = [sys.executable, "-m", "connect_tp.cli", "finetune"] + COMMON + ["--out", str(run)] + TARGETS + [
        "--ft-epochs", "50"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + patience(120)
        while not (run / LOCK_NAME).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert (run / LOCK_NAME).exists(), "the fine-tuning never took the lock"
        assert stage("prune", run, "--iterative-steps", "15") == 1
        err = _last_line(capsys.readouterr().err)
        assert f"in use by pid {proc.pid}" in err and "finetune" in err
    finally:
        proc.kill()
        proc.wait()


def test_unreachable_speed_up_is_reported_with_the_highest_reached(run, capsys):
    args = COMMON + ["--out", str(run), "--methods", "l2", "--speed-up", "2", "1000", "--iterative-steps", "10",
                     "--max-pruning-ratio", "0.5"]
    assert main(["prune"] + args) == 1
    captured = capsys.readouterr()
    err = _last_line(captured.err)
    assert err.startswith("error: prune l2: target 1000x is out of reach") and "highest speed-up reached is" in err
    assert "the targets reached are saved (2x)" in err and "Traceback" not in captured.err
    assert "prune: wrote" in captured.err and "pruned/l2_2x.pt" in captured.err


def _strip_fingerprints(run):
    """Rewrite a run as an older connect-tp wrote it: no fingerprints, same modification times."""
    for path in run.rglob("*"):
        stat = os.stat(path)
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data.pop("provenance", None)
            path.write_text(json.dumps(data))
        elif path.suffix == ".pt":
            data = torch.load(path, weights_only=True)
            data.pop("provenance", None)
            torch.save(data, path)
        else:
            continue
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_folder_without_fingerprints_is_accepted_after_checks_with_a_note(run, capsys):
    _strip_fingerprints(run)
    before = os.stat(run / "results" / "l2_2x.json").st_mtime_ns
    for name in ("train", "prune", "finetune"):
        assert stage(name, run, "--resume") == 0
        captured = capsys.readouterr()
        assert "has no fingerprint (written by an older connect-tp)" in captured.err
        assert "wrote no files" in _last_line(captured.out)
    assert os.stat(run / "results" / "l2_2x.json").st_mtime_ns == before
    # A field it carries that differs is an error, never a silent reuse.
    assert stage("prune", run, "--resume", "--iterative-steps", "5") == 1
    err = _last_line(capsys.readouterr().err)
    assert "without a fingerprint" in err and "iterative_steps=10 there, 5 here" in err
    # Old pruned models under a newly trained base were made from the old one.
    assert stage("train", run, "--epochs", "2") == 0
    assert stage("finetune", run, "--resume") == 1
    assert "no fingerprint (written by an older connect-tp) while the base model has one" in capsys.readouterr().err


def test_partly_trained_base_without_fingerprint_resumes(run, capsys):
    _strip_fingerprints(run)
    os.remove(run / "base.json")  # killed after the last checkpoint, before base.json
    assert stage("train", run, "--resume") == 0
    assert "resuming after epoch 1 of 1" in capsys.readouterr().err
    assert read_json(str(run / "base.json"))["provenance"]["adopted"].startswith("resumed from a base.pt")


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_training_is_one_error_naming_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "connect_tp.cli", "train"] + COMMON + ["--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=patience(300),
                          preexec_fn=_limit_file_size(512 * 1024))
    assert done.returncode == 1
    assert _last_line(done.stderr).startswith(f"error: {out / 'base.pt'}: cannot write this file (File too large)")
    assert "Traceback" not in done.stderr and not (out / "base.json").exists()


def _wait_for_line(proc, text):
    """Read ``proc.stdout`` until a line contains ``text``; the lines read so far. Waits on the event, not the clock.

    The reader thread ends when the process does; the timeout only guards against a hung process.
    """
    seen, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                found.set()
                return
        found.set()  # the process ended first: the caller sees it by proc.poll()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(patience(900)), f"no line with {text!r} yet; output so far: {''.join(seen)[-2000:]}"
    return seen


def _as_from_a_shell():
    """In the child before exec: SIGINT at its default and unblocked, so Python installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_of_a_real_training(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "connect_tp.cli", "train"] + COMMON + ["--out", str(out), "--epochs", "40"]
    # What the test process inherited (an ignored or blocked SIGINT, left by a library or another test's
    # thread) would pass to the child and decide whether Ctrl-C reaches it: start it as a shell would.
    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_shell)
    try:
        # The epoch line is printed after the checkpoint is saved and recorded: interrupting from then on
        # must report a resumable checkpoint, however slowly the machine got there.
        _wait_for_line(proc, "train: epoch 1/40")
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=patience(300))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (inherited, stderr[-2000:])
    assert "interrupted" in stderr and "of 40 epochs saved (resumable)" in stderr and "Traceback" not in stderr
    assert _last_line(stderr) == f"to continue: connect-tp train --preset smoke --threads 1 --out {out} --epochs 40 --resume"
    assert not (out / LOCK_NAME).exists()
