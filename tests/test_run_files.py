"""Run-folder building blocks, without training: atomic files, umask, locks, fingerprints, merged result updates."""
import errno
import json
import math
import os

import pytest

from connect_tp.pipeline.config import ConfigError, prune_config, resolve_config, train_config
from connect_tp.pipeline.files import atomic_write, atomic_write_json, read_json, sha256_file
from connect_tp.pipeline.lock import LOCK_NAME, LockError, RunLock
from connect_tp.pipeline.provenance import (ProvenanceError, check_fingerprint, check_legacy_fields, fingerprint)
from connect_tp.pipeline.rundir import RunFolder


# ------------------------------------------------------------------------------------------------ files
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "r.json"
    atomic_write_json({"a": 1}, str(path))
    assert os.stat(path).st_mode & 0o777 == mode


def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json({"acc": 1.0}, str(path))

    def disk_full(f):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(str(path), disk_full)
    assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
    assert "No space left on device" in info.value.strerror
    assert read_json(str(path)) == {"acc": 1.0} and os.listdir(tmp_path) == ["r.json"]


def test_value_that_is_not_json_writes_nothing(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(TypeError):
        atomic_write_json({"x": object()}, str(path))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ config
def test_config_checks_values_and_names_the_flag():
    for kwargs, flag in ((dict(speed_ups=[float("nan")]), "--speed-up"), (dict(speed_ups=[float("inf")]), "--speed-up"),
                         (dict(iterative_steps=0), "--iterative-steps"), (dict(calibration_samples=0),
                                                                           "--calibration-samples"),
                         (dict(epochs=0), "--epochs"), (dict(ft_epochs=0), "--ft-epochs"),
                         (dict(max_pruning_ratio=1.5), "--max-pruning-ratio"), (dict(methods=["l3"]), "l3")):
        with pytest.raises(ConfigError, match=flag):
            resolve_config("smoke", 0, **kwargs)
    cfg = resolve_config("ranking", 0, speed_ups=[8, 16])
    assert cfg["ft_speed_ups"] == [8.0, 16.0] and cfg["out"] == os.path.join("runs", "ranking", "seed0")
    assert resolve_config("ranking", 0)["ft_speed_ups"] == [2.5, 8.0, 16.0]


def test_prune_fingerprint_ignores_the_other_targets_and_the_lambda_of_other_methods():
    a = resolve_config("smoke", 0, speed_ups=[2.5], connect_lam=3.0)
    b = resolve_config("smoke", 0, speed_ups=[2.5, 8.0])
    assert prune_config(a, "l2", 2.5) == prune_config(b, "l2", 2.5)
    assert prune_config(a, "connect", 2.5) != prune_config(b, "connect", 2.5)


def test_bn_refresh_enters_the_prune_fingerprint_only_when_on():
    off, on = resolve_config("smoke", 0), resolve_config("smoke", 0, bn_refresh_every=5)
    assert "bn_refresh_every" not in prune_config(off, "l2", 2.5)  # files pruned before the option stay valid
    assert prune_config(on, "l2", 2.5)["bn_refresh_every"] == 5
    assert prune_config(resolve_config("smoke", 0, bn_refresh_every=0), "l2", 2.5) == prune_config(off, "l2", 2.5)
    with pytest.raises(ConfigError, match="--bn-refresh-every"):
        resolve_config("smoke", 0, bn_refresh_every=-1)


def test_plain_connect_records_the_library_defaults_and_a_named_connect_never_changes_meaning(monkeypatch):
    from connect_tp import importance
    from connect_tp.pruning import build_importance

    cfg = resolve_config("smoke", 0)
    # Plain `connect` is the library defaults: a folder pruned under other defaults is not reused.
    imp = build_importance("connect")
    assert (imp.balance, imp.bn_flow) == (importance.DEFAULT_BALANCE, importance.DEFAULT_BN_FLOW)
    plain = prune_config(cfg, "connect", 2.5)
    assert (plain["connect_balance"], plain["connect_bn_flow"]) == (importance.DEFAULT_BALANCE,
                                                                    importance.DEFAULT_BN_FLOW)
    monkeypatch.setattr(importance, "DEFAULT_BALANCE", math.inf)
    monkeypatch.setattr(importance, "DEFAULT_BN_FLOW", "identity")
    moved = prune_config(cfg, "connect", 2.5)
    assert (moved["connect_balance"], moved["connect_bn_flow"]) == ("inf", "identity")
    with_lam = prune_config(resolve_config("smoke", 0, connect_lam=2.0), "connect", 2.5)
    assert "connect_balance" not in with_lam and with_lam["connect_lam"] == 2.0
    # A name with options fixes them all: BatchNorm "stats" unless it says -bn<flow>, whatever the default.
    for name in ("connect-k3", "connect-kinf", "connect-lam5", "connect-k3-bngamma", "l2"):
        assert not {"connect_balance", "connect_bn_flow"} & set(prune_config(cfg, name, 2.5))
    bn_only = prune_config(cfg, "connect-bngamma", 2.5)  # the treatment is named, the balance is the default's
    assert bn_only["connect_balance"] == "inf" and "connect_bn_flow" not in bn_only
    assert build_importance("connect-k3").bn_flow == "stats"
    assert build_importance("connect-lam5").bn_flow == "stats"
    assert build_importance("connect-k3-bngamma").bn_flow == "gamma"
    # A -norm<...> suffix names the normalizer only: plain connect's defaults stay recorded.
    norm_only = prune_config(cfg, "connect-normsum", 2.5)
    assert (norm_only["connect_balance"], norm_only["connect_bn_flow"]) == ("inf", "identity")
    assert not {"connect_balance", "connect_bn_flow"} & set(prune_config(cfg, "connect-k3-normsum", 2.5))
    assert build_importance("connect-k3-normsum").bn_flow == "stats"


# ------------------------------------------------------------------------------------------------ fingerprints
def test_fingerprint_mismatch_names_the_field_both_values_and_the_fix():
    cfg = resolve_config("smoke", 0)
    recorded = fingerprint("train", train_config(cfg))
    check_fingerprint("base.json", recorded, train_config(cfg), what="a base model", fix="FIX")
    other = train_config(resolve_config("smoke", 0, epochs=3))
    with pytest.raises(ProvenanceError, match=r"base.json holds a base model .*epochs=1 there, 3 here.*FIX"):
        check_fingerprint("base.json", recorded, other, what="a base model", fix="FIX")
    child = fingerprint("prune", {"x": 1}, parent=("base.pt", "a" * 64))
    with pytest.raises(ProvenanceError, match=r"another base .*aaaaaaaaaaaa.*bbbbbbbbbbbb.*FIX"):
        check_fingerprint("r.json", child, {"x": 1}, what="a result", parent_sha="b" * 64, parent_name="base", fix="FIX")


def test_legacy_fields_are_checked_and_noted():
    note = check_legacy_fields("base.json", {"preset": "ranking", "epochs": 8}, {"preset": "ranking", "epochs": 8},
                               what="a base model", fix="FIX")
    assert note.startswith("note: base.json has no fingerprint") and "epochs=8" in note
    with pytest.raises(ProvenanceError, match="without a fingerprint.*epochs=8 there, 4 here"):
        check_legacy_fields("base.json", {"epochs": 8}, {"epochs": 4}, what="a base model", fix="FIX")


# ------------------------------------------------------------------------------------------------ merged results
def _result(**over):
    r = {"preset": "smoke", "seed": 0, "dataset": "fashion_mnist", "model": "resnet20", "method": "l2",
         "target_speed_up": 2.0, "speed_up": 2.1, "macs": 1, "params": 1, "base_macs": 2, "base_params": 2,
         "pruned_acc": 50.0, "collapsed_layers": [], "finetuned_acc": None}
    r.update(over)
    return r


def _pruned(run, content=b"model"):
    path = run.pruned("l2", 2.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return sha256_file(path)


def test_finetune_numbers_merge_with_the_file_on_disk_at_write_time(tmp_path):
    run = RunFolder(str(tmp_path))
    sha = _pruned(run)
    prov = {"prune": {"config": {}, "output": {"sha256": sha}}}
    run.write_prune_result("l2", 2.0, _result(provenance=prov), sha, note=print)
    # Meanwhile the short fine-tuning added its number to the file on disk.
    run.write_finetune_result("l2", 2.0, "short_finetune", {"short_finetuned_acc": 40.0},
                              {"parent": {"sha256": sha}}, sha)
    run.write_finetune_result("l2", 2.0, "finetune", {"finetuned_acc": 70.0}, {"parent": {"sha256": sha}}, sha)
    r = read_json(run.result("l2", 2.0))
    assert r["short_finetuned_acc"] == 40.0 and r["finetuned_acc"] == 70.0
    assert set(r["provenance"]) == {"prune", "short_finetune", "finetune"}


def test_new_pruned_model_drops_the_fine_tuning_of_the_old_one(tmp_path):
    run = RunFolder(str(tmp_path))
    old = _pruned(run, b"old")
    run.write_prune_result("l2", 2.0, _result(provenance={"prune": {"output": {"sha256": old}}}), old, note=print)
    run.write_finetune_result("l2", 2.0, "finetune", {"finetuned_acc": 70.0, "finetune_epochs": 6},
                              {"parent": {"sha256": old}}, old)
    notes = []
    new = _pruned(run, b"new")
    run.write_prune_result("l2", 2.0, _result(iterative_steps=15, provenance={"prune": {"output": {"sha256": new}}}),
                           new, note=notes.append)
    r = read_json(run.result("l2", 2.0))
    assert r["finetuned_acc"] is None and "finetune_epochs" not in r and set(r["provenance"]) == {"prune"}
    assert r["iterative_steps"] == 15 and "dropped the old finetune numbers" in notes[0]
    # The same pruned model again (a deterministic re-run) keeps them.
    run.write_finetune_result("l2", 2.0, "finetune", {"finetuned_acc": 71.0}, {"parent": {"sha256": new}}, new)
    run.write_prune_result("l2", 2.0, _result(provenance={"prune": {"output": {"sha256": new}}}), new, note=print)
    assert read_json(run.result("l2", 2.0))["finetuned_acc"] == 71.0


def test_finetune_refuses_to_write_when_the_pruned_model_changed_meanwhile(tmp_path):
    run = RunFolder(str(tmp_path))
    sha = _pruned(run, b"a")
    run.write_prune_result("l2", 2.0, _result(provenance={"prune": {"output": {"sha256": sha}}}), sha, note=print)
    _pruned(run, b"b")  # another prune replaced it while fine-tuning ran
    with pytest.raises(ProvenanceError, match="changed while finetune ran"):
        run.write_finetune_result("l2", 2.0, "finetune", {"finetuned_acc": 70.0}, {}, sha)
    assert read_json(run.result("l2", 2.0))["finetuned_acc"] is None


# ------------------------------------------------------------------------------------------------ locks
def test_lock_is_exclusive_and_released(tmp_path):
    first = RunLock(str(tmp_path), "connect-tp train --out x")
    first.acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "connect-tp train --out x"
    with pytest.raises(LockError, match=r"in use by pid \d+ .*connect-tp train --out x"):
        RunLock(str(tmp_path), "second").acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(str(tmp_path), "third"):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("holder", [
    {"pid": 2 ** 22 + 7, "command": "connect-tp prune"},                     # no such process
    {"pid": os.getpid(), "boot_id": "an-earlier-boot", "command": "x"},       # written before a reboot
    {"pid": os.getpid(), "start": "1", "command": "x"},                       # the pid was reused since
])
def test_stale_locks_are_taken_over(tmp_path, holder):
    import socket

    from connect_tp.pipeline import lock as lock_module

    holder = dict({"host": socket.gethostname(), "boot_id": lock_module._identity()["boot_id"]}, **holder)
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    notes = []
    with RunLock(str(tmp_path), "mine", note=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "mine"
    assert len(notes) == 1 and "no longer runs" in notes[0]


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "connect-tp run"}))
    with pytest.raises(LockError, match=f"another host.*delete {tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path), "mine").acquire()


def test_ft_schedule_enters_the_fingerprint_only_when_it_is_not_the_legacy_step():
    from connect_tp.pipeline.config import ConfigError, finetune_config

    step = resolve_config("ranking", 0)
    assert step["ft_schedule"] == "step" and "schedule" not in finetune_config(step)  # old files stay valid
    cosine = resolve_config("ranking-cosine", 0)
    assert finetune_config(cosine)["schedule"] == "cosine"
    assert finetune_config(resolve_config("ranking", 0, ft_schedule="cosine"))["schedule"] == "cosine"
    with pytest.raises(ConfigError, match="--ft-schedule must be one of step, cosine"):
        resolve_config("ranking", 0, ft_schedule="linear")
