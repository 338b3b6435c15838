"""benchmarks/studies/finetune_orders.py pairs two methods over seeds and data orders from both kinds of results."""
import json

import pytest

from benchmarks.studies import finetune_orders


def _noise_results(folder, runs):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"base": "b.pt", "lr": 0.01, "runs": {
        f"{m}/{t}/{o}": {"method": m, "target": t, "schedule": "cosine", "order": o, "acc": acc}
        for m, t, o, acc in runs}}))


def _ranking_result(root, seed, method, target, acc, schedule="cosine"):
    folder = root / f"seed{seed}" / method / "results"
    folder.mkdir(parents=True, exist_ok=True)
    config = {} if schedule == "step" else {"schedule": schedule}
    (folder / f"{method}_{target:g}x.json").write_text(json.dumps({
        "seed": seed, "target_speed_up": target, "finetuned_acc": acc,
        "provenance": {"finetune": {"config": config}}}))


def test_pairs_join_orders_of_both_sources_and_skip_other_schedules(tmp_path):
    _noise_results(tmp_path / "s1", [("a", 8.0, 11, 80.0), ("b", 8.0, 11, 78.0), ("a", 8.0, 21, 81.0)])
    _ranking_result(tmp_path / "rank", 1, "a", 8.0, 85.0)
    _ranking_result(tmp_path / "rank", 1, "b", 8.0, 86.0)
    _ranking_result(tmp_path / "rank", 2, "a", 8.0, 70.0, schedule="step")  # another protocol: left out
    a = finetune_orders.collect("a", "cosine", [(1, str(tmp_path / "s1"))], str(tmp_path / "rank"))
    b = finetune_orders.collect("b", "cosine", [(1, str(tmp_path / "s1"))], str(tmp_path / "rank"))
    assert a == {(1, 11, 8.0): 80.0, (1, 21, 8.0): 81.0, (1, 1, 8.0): 85.0}
    table = finetune_orders.compare(a, b)
    # order 21 has no b: two pairs, +2.0 and -1.0
    assert "| 8x | 2 (orders per seed: 2) | s1: -1.0, +2.0 | 0.5 ± 2.1 |" in table


def test_no_shared_run_is_an_error(tmp_path):
    _noise_results(tmp_path / "s0", [("a", 8.0, 0, 80.0)])
    with pytest.raises(SystemExit, match="no \\(seed, order, target\\) has results of both"):
        finetune_orders.main(["a", "b", "--runs", f"0:{tmp_path / 's0'}"])
    with pytest.raises(SystemExit):
        finetune_orders.main(["a", "b", "--runs", "zero:x"])
