"""benchmarks/studies/ranking_refinetune.py: copies finished ranking snapshots without their
fine-tuning numbers, plans one job per seed and method, refuses snapshots it cannot vouch for."""
import json
import os

import pytest

from tests.test_ranking import result
from benchmarks.studies import ranking_refinetune as rt


def _ranking_folder(path, methods, seed, targets=(8.0, 16.0), payload=b"pruned"):
    """A ranking run folder with finished (fine-tuned) results and stand-in snapshot files."""
    for sub in ("pruned", "results"):
        os.makedirs(path / sub, exist_ok=True)
    (path / "base.pt").write_bytes(b"base")
    (path / "base.json").write_text("{}")
    for method in methods:
        for t in targets:
            (path / "pruned" / f"{method}_{t:g}x.pt").write_bytes(payload + method.encode())
            r = result(method, t, 70.0, seed, finetune_epochs=1, finetune_seconds=9.0, short_finetuned_acc=50.0,
                       provenance={"prune": {"config": {}}, "finetune": {"config": {"ft_schedule": None}},
                                   "short_finetune": {"config": {}}})
            (path / "results" / f"{method}_{t:g}x.json").write_text(json.dumps(r))


def test_refinetune_copies_snapshots_without_their_fine_tuning_and_plans_one_job_per_seed_and_method(tmp_path):
    _ranking_folder(tmp_path / "s0", ["l2", "taylor"], seed=0)  # one folder with every method
    _ranking_folder(tmp_path / "s1l2", ["l2"], seed=1)          # one folder per method
    root = tmp_path / "cosine"
    jobs = rt.plan([str(tmp_path / "s0"), str(tmp_path / "s1l2")], ["l2", "taylor", "lamp"], [8.0, 16.0],
                   str(root), ["--ft-schedule", "cosine"])
    assert [label for label, *_ in jobs] == ["l2/s0", "l2/s1", "taylor/s0"]  # lamp has no snapshots: no job
    label, base, out, (argv,) = jobs[1]
    assert base is None and out == str(root / "seed1" / "l2")
    assert argv[argv.index("--seed") + 1] == "1" and argv[argv.index("--preset") + 1] == "ranking"
    assert argv[-3:] == ["--speed-up", "8", "16"] and "cosine" in argv and "--resume" in argv
    copied = json.loads((root / "seed0" / "taylor" / "results" / "taylor_16x.json").read_text())
    assert copied["finetuned_acc"] is None and "finetune_seconds" not in copied
    assert "finetune" not in copied["provenance"] and copied["short_finetuned_acc"] == 50.0  # only the epoch is redone
    assert (root / "seed0" / "taylor" / "pruned" / "taylor_8x.pt").read_bytes() == b"prunedtaylor"
    original = json.loads((tmp_path / "s0" / "results" / "taylor_16x.json").read_text())
    assert original["finetuned_acc"] == 70.0  # the source is untouched

    # Run again (a continued run): the copies and whatever they gained are kept.
    (root / "seed0" / "l2" / "results" / "l2_8x.json").write_text(json.dumps(dict(copied, finetuned_acc=88.0)))
    assert len(rt.plan([str(tmp_path / "s0"), str(tmp_path / "s1l2")], ["l2", "taylor"], [8.0, 16.0],
                       str(root), [])) == 3
    assert json.loads((root / "seed0" / "l2" / "results" / "l2_8x.json").read_text())["finetuned_acc"] == 88.0


def test_refinetune_refuses_other_snapshots_in_the_root_and_a_seed_given_twice(tmp_path):
    _ranking_folder(tmp_path / "a", ["l2"], seed=0)
    _ranking_folder(tmp_path / "b", ["l2"], seed=0, payload=b"other")
    with pytest.raises(SystemExit, match="both"):
        rt.plan([str(tmp_path / "a"), str(tmp_path / "b")], ["l2"], [8.0, 16.0], str(tmp_path / "r"), [])
    rt.plan([str(tmp_path / "a")], ["l2"], [8.0, 16.0], str(tmp_path / "r"), [])
    with pytest.raises(SystemExit, match="other pruned models"):
        rt.plan([str(tmp_path / "b")], ["l2"], [8.0, 16.0], str(tmp_path / "r"), [])
