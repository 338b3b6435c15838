"""benchmarks/headline.py: README's table from result files (synthetic results, no training)."""
import json
import os

import pytest

from benchmarks import headline


def result(method, target, acc, seed, schedule=None, **extra):
    finetune = {"config": {"epochs": 1}} if schedule is None else {"config": {"epochs": 1, "schedule": schedule}}
    return {"method": method, "seed": seed, "target_speed_up": target, "finetuned_acc": acc,
            "base_acc": 90.0 + seed, "provenance": {"finetune": finetune},
            "environment": {"threads": 1, "cpus": 2, "torch": "2.14.1", "torch_pruning": "1.6.0",
                            "load_avg_1min": 1.5 + seed}, **extra}


def grid(schedule=None, methods=None, seeds=(0, 1, 2)):
    methods = methods or [m for m, _ in headline.ROWS]
    return [result(m, t, 70.0 + i + seed + t / 8, seed, schedule)
            for i, m in enumerate(methods) for t in headline.TARGETS for seed in seeds]


def test_cell_is_mean_and_worst_over_the_seeds():
    assert headline.cell({0: 80.0, 1: 84.0, 2: 79.0}, [0, 1, 2]) == "81.0 / 79.0"
    assert headline.cell({}, [0, 1, 2]) == "not run"
    with pytest.raises(SystemExit, match="lacks seeds"):
        headline.cell({0: 80.0, 1: 84.0}, [0, 1, 2])


def test_table_has_one_row_per_method_and_the_recorded_conditions():
    text = headline.table(protocol=grid(), cosine=grid("cosine", methods=[headline.ROWS[0][0], "l2"]))
    lines = text.split("\n")
    assert lines[0].startswith("| method | 8x, 1 epoch | 16x, 1 epoch |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == len(headline.ROWS) and "**CoNNect, default**" in rows[0]
    # default: index 0, seeds 0-2, 8x: 71, 72, 73 -> mean 72.0, worst 71.0; 16x: +1
    assert rows[0].split(" | ")[1:3] == ["72.0 / 71.0", "73.0 / 72.0"]
    assert rows[-1].endswith("| not run | not run |")  # random was not fine-tuned with the cosine
    assert "seeds 0, 1, 2" in text and "90.00 / 91.00 / 92.00 %" in text
    assert "1 thread per run on a 2-core CPU, load average 1.5 to 3.5" in text


def test_duplicate_seed_is_refused():
    rows = grid()
    with pytest.raises(SystemExit, match="two results for seed 0"):
        headline.table(protocol=rows + rows[:1], cosine=grid("cosine"))


def test_a_result_of_another_protocol_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "ranking" / "seed0" / "results"
    folder.mkdir(parents=True)
    (folder / "l2_8x.json").write_text(json.dumps(result("l2", 8.0, 80.0, 0)))
    monkeypatch.setattr(headline, "REPO", str(tmp_path))
    assert len(headline.read("ranking", "step")) == 1
    with pytest.raises(SystemExit, match="schedule 'step'"):
        headline.read("ranking", "cosine")
    (folder / "l1_8x.json").write_text(json.dumps(result("l1", 8.0, 80.0, 0, bn_refresh_every=1)))
    with pytest.raises(SystemExit, match="BatchNorm refresh every 1"):
        headline.read("ranking", "step")
    with pytest.raises(SystemExit, match="no fine-tuned results"):
        headline.read("elsewhere", "step")


def test_the_committed_results_give_readme_s_numbers():
    # the default's protocol row, worked out by hand from the six committed files it averages
    import glob

    values = {}
    for seed in (0, 1, 2):
        for target in (8, 16):
            paths = glob.glob(os.path.join(headline.REPO, headline.PROTOCOL, f"seed{seed}", "**", "results",
                                           f"{headline.ROWS[0][0]}_{target}x.json"), recursive=True)
            assert len(paths) == 1, paths
            with open(paths[0], encoding="utf-8") as f:
                values.setdefault(target, []).append(json.load(f)["finetuned_acc"])
    row = [line for line in headline.table().split("\n") if "**CoNNect, default**" in line][0]
    expected = [f"{sum(v) / 3:.1f} / {min(v):.1f}" for v in (values[8], values[16])]
    assert row.split(" | ")[1:3] == expected
