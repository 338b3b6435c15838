"""The ranking benchmark's rule for the default kappa and its summary (synthetic results, no training)."""
import json
import math
import os

import pytest

from benchmarks import ranking


def result(method, target, acc, seed=0, **extra):
    return {"preset": "ranking", "dataset": "fashion_mnist", "model": "resnet20", "seed": seed, "method": method,
            "target_speed_up": target, "speed_up": target, "step": 1, "iterative_steps": 400,
            "max_pruning_ratio": 1.0, "macs": 1, "params": 1, "base_macs": 2, "base_params": 2, "base_acc": 92.0,
            "pruned_acc": acc, "pruned_acc_bn_recalibrated": acc, "finetuned_acc": acc,
            "channels": {"layer1.0.conv1": [16, 8], "layer1.0.conv2": [8, 16]}, "collapsed_layers": [],
            "dead_channels": {}, "network_disconnected": False, "signal_flow": 1.0, **extra}


def grid_results(best_kappa, seeds=(0,)):
    out = []
    for seed in seeds:
        for k in (0.0,) + ranking.KAPPA_GRID:
            method = "taylor" if k == 0 else ranking.kappa_method(k)
            acc = 80.0 - (0 if k == best_kappa else 5) - (0.1 if k == math.inf else 0)
            out += [result(method, t, acc, seed) for t in ranking.RULE_TARGETS]
    return out


def test_rule_picks_the_best_mean_over_8x_and_16x():
    assert ranking.choose_kappa(grid_results(3.0)) == 3.0
    assert ranking.choose_kappa(grid_results(0.0)) == 0.0  # Taylor can win
    assert ranking.choose_kappa(grid_results(math.inf)) == math.inf


def test_rule_waits_for_a_complete_grid_and_breaks_ties_toward_smaller_kappa():
    incomplete = [r for r in grid_results(3.0) if r["method"] != ranking.kappa_method(100.0)]
    assert ranking.choose_kappa(incomplete) is None
    tied = [dict(r, finetuned_acc=70.0) for r in grid_results(3.0)]
    assert ranking.choose_kappa(tied) == 0.0


def test_rule_averages_seeds():
    seed0 = grid_results(1.0, seeds=(0,))
    seed1 = [dict(r, seed=1, finetuned_acc=r["finetuned_acc"] + (20 if r["method"] == "connect-k10" else 0))
             for r in grid_results(1.0, seeds=(0,))]
    assert ranking.choose_kappa(seed0 + seed1) == 10.0


def write_run(folder, results, seed=0):
    os.makedirs(os.path.join(folder, "results"))
    for i, r in enumerate(results):
        with open(os.path.join(folder, "results", f"{i}.json"), "w") as f:
            json.dump(r, f)
    with open(os.path.join(folder, "base.json"), "w") as f:
        json.dump({"preset": "ranking", "seed": seed, "dataset": "fashion_mnist", "model": "resnet20",
                   "epochs": 8, "acc": 92.5, "final_acc": 92.4, "macs": 2, "params": 2}, f)


def test_summary_reports_paired_differences_and_the_rule(tmp_path):
    base_acc = {"l2": 70.0, "taylor": 60.0, "connect-k1": 75.0}
    rows = []
    for seed, bump in ((0, 0.0), (1, 2.0)):
        for m, acc in base_acc.items():
            extra = 1.0 if m == "connect-k1" and seed == 1 else 0.0
            rows += [result(m, t, acc + bump + extra, seed) for t in (8.0, 16.0)]
    write_run(tmp_path / "s0", [r for r in rows if r["seed"] == 0], seed=0)
    write_run(tmp_path / "s1", [r for r in rows if r["seed"] == 1], seed=1)
    text = ranking.summarize([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "out"))
    # connect-k1 minus l2: +5 on seed 0, +6 on seed 1 -> 5.5 ± 0.7
    assert "| connect-k1 | – | 5.5 ± 0.7 | 5.5 ± 0.7 | – |" in text
    assert "Kappa chosen by the rule: not yet" in text
    assert os.path.isfile(tmp_path / "out" / "table.md")


def test_summary_lists_connect_rows_by_kappa_then_the_built_ins(tmp_path):
    methods = ["l2", "connect-k300", "connect-kinf", "connect-k1000", "connect-k3", "connect-k100-bngamma", "taylor"]
    write_run(tmp_path / "s0", [result(m, 8.0, 70.0) for m in methods])
    text = ranking.summarize([str(tmp_path / "s0")], str(tmp_path / "out"))
    first_table = text.split("**Paired")[0]
    order = [line.split(" | ")[0][2:] for line in first_table.splitlines() if line.startswith("| ") and "---" not in line
             and not line.startswith("| method")]
    assert order[:len(methods)] == ["connect-k3", "connect-k100-bngamma", "connect-k300", "connect-k1000",
                                    "connect-kinf", "l2", "taylor"]


def test_summary_refuses_a_method_twice_for_one_seed(tmp_path):
    write_run(tmp_path / "a", [result("l2", 8.0, 70.0)])
    write_run(tmp_path / "b", [result("l2", 8.0, 71.0)])
    with pytest.raises(SystemExit, match="two run folders"):
        ranking.summarize([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))


def test_parallel_plan_gives_each_seed_and_method_its_own_folder_and_the_rule_first():
    from benchmarks import ranking_parallel

    jobs = ranking_parallel.plan([0, 1], ["l2", "connect-kinf"], "ranking", "root", ["--device", "cuda"])
    labels = [label for label, *_ in jobs]
    # The rule's 8x/16x work for every (seed, method) comes before any 2.5x fine-tuning.
    assert labels == ["l2/s0", "l2/s1", "connect-kinf/s0", "connect-kinf/s1",
                      "l2/s0@2.5x", "l2/s1@2.5x", "connect-kinf/s0@2.5x", "connect-kinf/s1@2.5x"]
    folders = {(label.split("@")[0], out) for label, _, out, _ in jobs}
    assert len({out for _, out in folders}) == 4  # one folder per (seed, method), shared by its two jobs
    label, base, out, argvs = jobs[2]
    assert base == os.path.join("root", "seed0", "base") and out == os.path.join("root", "seed0", "connect-kinf")
    assert [a[a.index("benchmarks.cifar_pruning") + 1] for a in argvs] == ["prune", "finetune"]
    assert all("--resume" in a and a[a.index("--out") + 1] == out and "cuda" in a for a in argvs)
    assert argvs[1][-3:] == ["--speed-up", "8", "16"] and jobs[6][3][0][-2:] == ["--speed-up", "2.5"]
    short = ranking_parallel.plan([0, 1], ["l2", "connect-kinf"], "ranking", "root", [], with_2_5x=False)
    assert [label for label, *_ in short] == labels[:4]


def test_parallel_pool_runs_a_job_s_commands_in_order_and_stops_at_the_deadline(tmp_path):
    import sys
    import time

    from benchmarks.ranking_parallel import Pool

    marker = tmp_path / "order.txt"
    write = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]
    pool = Pool(2, str(tmp_path / "logs"), deadline=None, grace=0.1)
    pool.start("job", [write, write, [sys.executable, "-c", "raise SystemExit(3)"], write])
    while pool.running:
        pool.poll()
        time.sleep(0.05)
    assert marker.read_text() == "xx"  # the failing command ends the job: the fourth never runs
    assert (tmp_path / "logs" / "job.log").read_text().count("$ ") == 3  # each command it ran, logged

    slow = Pool(1, str(tmp_path / "logs"), deadline=time.time() + 0.5, grace=0.1)
    slow.start("sleeper", [[sys.executable, "-c", "import time; time.sleep(60)"]])
    while not slow.expired():
        slow.poll()
        time.sleep(0.05)
    proc = slow.running["sleeper"][0]
    slow.stop_all()
    assert proc.poll() is not None and not slow.running


def test_rule_reads_only_seeds_whose_grid_is_finished():
    seed0 = grid_results(math.inf, seeds=(0,))
    # Seed 1 is still running: only Taylor has its numbers, very high ones. It must not count.
    running = [dict(r, seed=1, finetuned_acc=99.0) for r in seed0 if r["method"] == "taylor"]
    assert ranking.finished_seeds(seed0 + running) == [0]
    assert ranking.rule_score(seed0 + running, "taylor") == ranking.rule_score(seed0, "taylor")
    assert ranking.choose_kappa(seed0 + running) == math.inf


def test_summary_names_the_fine_tuning_schedule_and_refuses_a_mix(tmp_path):
    cosine = {"provenance": {"finetune": {"config": {"schedule": "cosine"}}}}
    write_run(tmp_path / "c", [result("l2", 8.0, 70.0, **cosine)])
    text = ranking.summarize([str(tmp_path / "c")], str(tmp_path / "out"))
    assert "decayed to 0" in text and "reads the constant-rate `ranking` protocol only" in text
    write_run(tmp_path / "s", [result("taylor", 8.0, 60.0)])
    with pytest.raises(SystemExit, match="different schedules"):
        ranking.summarize([str(tmp_path / "c"), str(tmp_path / "s")], str(tmp_path / "out"))


def test_summary_names_the_bn_refresh_and_refuses_a_mix(tmp_path):
    write_run(tmp_path / "r", [result("l2", 8.0, 70.0, bn_refresh_every=1)])
    text = ranking.summarize([str(tmp_path / "r")], str(tmp_path / "out"))
    assert "re-estimated before every 1 pruning step" in text
    assert "reads the constant-rate `ranking` protocol only" in text  # the rule does not read it
    write_run(tmp_path / "p", [result("taylor", 8.0, 60.0)])  # the protocol: no refresh recorded
    with pytest.raises(SystemExit, match="different --bn-refresh-every"):
        ranking.summarize([str(tmp_path / "r"), str(tmp_path / "p")], str(tmp_path / "out"))


def test_headline_table_puts_the_default_first_the_grid_down_to_taylor_and_names_partial_seeds(tmp_path):
    default = ranking.default_method()
    rows = []
    for seed in (0, 1):
        for m in ("l2", "taylor", "connect-kinf", default, "connect-k1", "connect-kinf-bnidentity"):
            rows += [result(m, t, 70.0 + seed, seed) for t in (8.0, 16.0)]
    rows.append(result("lamp", 8.0, 60.0, 0, finetuned_acc=None))  # pruned only, no fine-tuning
    write_run(tmp_path / "s0", [r for r in rows if r["seed"] == 0], seed=0)
    write_run(tmp_path / "s1", [r for r in rows if r["seed"] == 1], seed=1)
    ranking.summarize([str(tmp_path / "s0"), str(tmp_path / "s1")], str(tmp_path / "out"))
    table = (tmp_path / "out" / "headline.md").read_text().splitlines()
    names = [line.split(" | ")[0][2:] for line in table[2:]]
    assert names[0].startswith("CoNNect κ=") and names[0].endswith("(**default**)")
    assert names[1:] == ["CoNNect κ=∞", "CoNNect κ=1", "Taylor (= κ=0)", "L2", "LAMP",
                         'CoNNect κ=∞, `bn_flow="identity"`']
    assert "| 70.5 ± 0.7 |" in table[2]  # mean ± std over the two seeds
    assert "| 0 (fine-tuned: none) |" in next(line for line in table if line.startswith("| LAMP"))
