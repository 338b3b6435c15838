"""The benchmark stages end to end on the smoke preset (Fashion-MNIST, a few hundred images).

The command is run in-process (``connect_tp.cli.main``) and, for kills and torchrun, as the
repository script ``python -m benchmarks.cifar_pruning``, a thin wrapper of the same command.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from connect_tp.cli import main
from connect_tp.data import DEBIAN_FASHION_MNIST_DIR
from connect_tp.training import load_checkpoint, read_json
from patience import patience

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST_DIR),
                       reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke", "--threads", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke"))
    args = SMOKE + ["--out", out, "--methods", "connect", "l2", "--speed-up", "2.5", "8"]
    assert main(["train"] + SMOKE + ["--out", out]) == 0  # train takes no --methods/--speed-up
    assert main(["prune"] + args) == 0
    assert main(["finetune"] + args) == 0
    return out


def _cli(*args):
    return [sys.executable, "-m", "benchmarks.cifar_pruning", *args]


def test_stages_write_complete_results(run_dir):
    base = read_json(os.path.join(run_dir, "base.json"))
    assert base["epochs"] == 1 and 0 <= base["acc"] <= 100 and base["macs"] > 40e6
    for method in ("connect", "l2"):
        for target in (2.5, 8):
            r = read_json(os.path.join(run_dir, "results", f"{method}_{target:g}x.json"))
            assert r["method"] == method and r["speed_up"] >= target
            assert r["macs"] == pytest.approx(r["base_macs"] / r["speed_up"])
            assert r["params"] < r["base_params"]
            assert r["finetuned_acc"] is not None and len(r["finetune_history"]) == 1
            assert isinstance(r["collapsed_layers"], list) and r["channels"]["fc"] == [r["channels"]["fc"][0], 10]
            assert os.path.isfile(os.path.join(run_dir, "pruned", f"{method}_{target:g}x.pt"))
    higher = read_json(os.path.join(run_dir, "results", "l2_8x.json"))
    lower = read_json(os.path.join(run_dir, "results", "l2_2.5x.json"))
    assert higher["params"] < lower["params"] and higher["step"] > lower["step"]


def test_table_and_plot(run_dir, tmp_path, capsys):
    assert main(["table", "--runs", run_dir, "--output", str(tmp_path)]) == 0
    markdown = (tmp_path / "table.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 4 and any("| connect |" in r for r in rows) and any("| l2 |" in r for r in rows)
    assert " ± " not in markdown.split("|---|")[-1]  # one seed: no spread
    assert "**Caveat: preset smoke is a test-sized run" in markdown and "cannot rank them" in markdown
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((tmp_path / "table.json").read_text())
    assert {r["method"] for r in table["rows"]} == {"connect", "l2"} and table["seeds"] == [0]
    # The same folder twice would be one seed counted as two, with a spread of 0.
    capsys.readouterr()
    assert main(["table", "--runs", run_dir, run_dir, "--output", str(tmp_path / "twice")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {run_dir} and {run_dir} are the same run folder; give each seed's folder once")


def test_resume_skips_finished_work(run_dir):
    result = os.path.join(run_dir, "results", "connect_2.5x.json")
    before = os.stat(result).st_mtime_ns
    assert main(["train"] + SMOKE + ["--out", run_dir, "--resume"]) == 0
    for stage in ("prune", "finetune"):
        assert main([stage] + SMOKE + ["--out", run_dir, "--methods", "connect", "l2",
                                       "--speed-up", "2.5", "8", "--resume"]) == 0
    assert os.stat(result).st_mtime_ns == before


def test_corrupt_checkpoint_names_the_file(run_dir, tmp_path, capsys):
    broken = tmp_path / "copy"
    os.makedirs(broken / "results")
    for name in ("base.json", "results/l2_2.5x.json"):
        with open(os.path.join(run_dir, name)) as f, open(broken / name, "w") as g:
            g.write(f.read())
    os.makedirs(broken / "pruned")
    (broken / "pruned" / "l2_2.5x.pt").write_bytes(b"garbage")
    code = main(["finetune"] + SMOKE + ["--out", str(broken), "--methods", "l2", "--speed-up", "2.5"])
    assert code == 1
    err = capsys.readouterr().err
    assert "pruned/l2_2.5x.pt" in err and "is not the pruned model" in err
    assert not (broken / "finetuned").exists(), "the checks come before any training"
    code = main(["prune"] + SMOKE + ["--out", str(tmp_path / "empty"), "--methods", "l2"])
    assert code == 1
    assert "base.json is missing" in capsys.readouterr().err


def copy_pruned_run(run_dir, out, name):
    """A fresh run folder holding only the base result and one pruned model, ready to fine-tune."""
    os.makedirs(out / "results")
    os.makedirs(out / "pruned")
    for rel in ("base.json", f"results/{name}.json", f"pruned/{name}.pt"):
        with open(os.path.join(run_dir, rel), "rb") as f:
            (out / rel).write_bytes(f.read())
    return out


def test_killed_finetune_resumes_from_last_epoch(run_dir, tmp_path):
    out = copy_pruned_run(run_dir, tmp_path / "kill", "l2_2.5x")
    args = ["finetune"] + SMOKE + ["--out", str(out), "--methods", "l2", "--speed-up", "2.5", "--ft-epochs", "10"]
    ckpt = out / "finetuned" / "l2_2.5x.pt"
    proc = subprocess.Popen(_cli(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + patience(120)  # a safety net: the loop waits for the checkpoint of epoch 2
        while not (ckpt.exists() and load_checkpoint(str(ckpt))["epoch"] >= 1) and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(str(ckpt))["epoch"]
    assert 1 <= killed_at < 9, "the run must be killed in the middle of fine-tuning"
    done = subprocess.run(_cli(*args, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=patience(300))
    assert done.returncode == 0, done.stderr
    result = read_json(str(out / "results" / "l2_2.5x.json"))
    epochs = [h["epoch"] for h in result["finetune_history"]]
    assert epochs == list(range(10))
    assert load_checkpoint(str(ckpt))["epoch"] == 9
    # The epochs before the kill were not run again: their records are the checkpoint's.
    assert f"resuming {ckpt} after epoch {killed_at + 1} of 10" in done.stdout
    assert f"epoch {killed_at + 1}/10," not in done.stdout and "epoch 10/10," in done.stdout


def free_port() -> int:
    """A TCP port nothing listens on now (so parallel CI jobs do not collide on a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_finetune_with_gloo(run_dir, tmp_path):
    out = copy_pruned_run(run_dir, tmp_path / "ddp", "l2_8x")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "benchmarks.cifar_pruning", "finetune"] + SMOKE + ["--out", str(out), "--methods", "l2",
                                                                      "--speed-up", "8"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=patience(300),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_json(str(out / "results" / "l2_8x.json"))
    assert result["finetune_world_size"] == 2 and 0 <= result["finetuned_acc"] <= 100


def test_bn_refresh_is_recorded_and_a_run_without_it_is_not_reused(run_dir, tmp_path, capsys):
    out = tmp_path / "refresh"
    os.makedirs(out)
    for name in ("base.json", "base.pt"):
        with open(os.path.join(run_dir, name), "rb") as f:
            (out / name).write_bytes(f.read())
    args = SMOKE + ["--out", str(out), "--methods", "l2", "--speed-up", "2.5"]
    assert main(["prune"] + args + ["--bn-refresh-every", "2"]) == 0
    result = read_json(os.path.join(out, "results", "l2_2.5x.json"))
    assert result["bn_refresh_every"] == 2
    assert result["provenance"]["prune"]["config"]["bn_refresh_every"] == 2
    # the same folder without the option: a different protocol, refused rather than reused
    assert main(["prune"] + args + ["--resume"]) == 1
    assert "bn_refresh_every" in capsys.readouterr().err
