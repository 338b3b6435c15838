"""The robustness benchmark's logic: collapse detection, worst-case statistics, the choice rule, resuming."""
import json
import math
import os

import pytest

from benchmarks import robustness as rb
from connect_tp.models import resnet20
from connect_tp.pruning import layer_channels

FULL = layer_channels(resnet20(num_classes=10, in_channels=1))


def _channels(stream=(16, 32, 64), narrow=None):
    """ResNet-20 widths with each stage's residual stream set, and ``narrow`` = {layer: out width}."""
    out = {k: list(v) for k, v in FULL.items()}
    for i, w in enumerate(stream, 1):
        for k in out:
            if k.startswith(f"layer{i}.") and (k.endswith("conv2") or "downsample" in k):
                out[k][1] = w
    for k, w in (narrow or {}).items():
        out[k][1] = w
    return out


def _snap(**kw):
    return {"channels": _channels(**kw), "collapsed_layers": [], "acc_raw": 10.0, "acc_bn": 12.0}


def test_stage_widths_of_the_full_model():
    w = rb.stage_widths(FULL)
    assert w["stream"] == [16, 32, 64] and w["inner_min"] == [16, 32, 64]
    assert w["min_conv"] == ["conv1", 16]  # the classifier (last layer) is not a convolution
    narrowed = rb.stage_widths(_channels((2, 9, 20), {"layer2.1.conv1": 1}))
    assert narrowed["stream"] == [2, 9, 20] and narrowed["min_conv"] == ["layer2.1.conv1", 1]


def test_a_healthy_16x_snapshot_with_a_thin_first_stage_is_not_collapsed():
    # What every criterion does at 16x: first stream at 1, a second-stage convolution at 1.
    snap = _snap(stream=(1, 12, 20), narrow={"layer2.0.conv1": 1})
    assert rb.collapse_reasons(snap, 16.0, finetuned_acc=82.0) == []


@pytest.mark.parametrize("snap, target, ft, expected", [
    (_snap(stream=(1, 12, 3)), 16.0, 80.0, "last stage's residual stream at 3 <= 4"),
    (_snap(stream=(1, 12, 4)), 8.0, None, "last stage's residual stream at 4 <= 4"),
    (_snap(stream=(1, 12, 18), narrow={"layer3.2.conv1": 1}), 16.0, None, "layer3.2.conv1 at 1 channel"),
    (_snap(stream=(1, 12, 18)), 16.0, 69.9, "fine-tuned 69.9 % < 70 %"),
    ({"unreachable": True, "reached": 12.0}, 16.0, None, "never reached 16x"),
    (dict(_snap(), collapsed_layers=["layer3.1.conv1"]), 8.0, None, "no path through layer3.1.conv1"),
])
def test_each_collapse_reason(snap, target, ft, expected):
    reasons = rb.collapse_reasons(snap, target, ft)
    assert any(expected in r for r in reasons), reasons


def test_the_accuracy_threshold_applies_at_16x_only_and_the_stream_threshold_is_inclusive():
    assert rb.collapse_reasons(_snap(stream=(1, 12, 18)), 8.0, finetuned_acc=50.0) == []
    assert rb.collapse_reasons(_snap(stream=(1, 12, 5)), 16.0, finetuned_acc=70.0) == []
    assert rb.collapse_reasons(_snap(stream=(1, 12, 18), narrow={"layer3.2.conv1": 2}), 16.0) == []


def test_worst_first_statistics():
    stat = rb.worst_first([(80.0, "s3-d0"), (None, "s4-d0"), (70.0, "s5-d0"), (90.0, "s6-d0")])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(80.0) and stat["std"] == pytest.approx(10.0)
    assert (stat["worst"], stat["worst_at"], stat["best"]) == (70.0, "s5-d0", 90.0)
    assert rb.worst_first([(None, "x")])["mean"] is None
    assert rb.worst_first([(75.0, "x")])["std"] == 0.0


def _traj(method, seed, draw, stream16=20, ft=(85.0, 80.0), unreachable=False, protocol=None):
    snaps = {"8": _snap(stream=(2, 14, 30)), "16": _snap(stream=(1, 12, stream16))}
    if unreachable:
        snaps["16"] = {"unreachable": True, "reached": 12.0}
    return {"method": method, "seed": seed, "draw": draw, "protocol": protocol or rb.PROTOCOL, "snapshots": snaps,
            "finetuned_acc": {} if ft is None else {"8": ft[0], "16": ft[1]},
            "environment": {"threads": 1, "accelerator": None, "torch": "x", "torch_pruning": "1.6.0",
                            "cpus": 2, "load_avg_1min": 1.0}}


def test_summarize_method_counts_collapses_and_names_the_worst_trajectory():
    trajs = [_traj("m", 3, 0, ft=(85.0, 80.0)), _traj("m", 4, 0, stream16=3, ft=(84.0, 41.7)),
             _traj("m", 5, 0, unreachable=True, ft=(83.0, 0.0))]
    at16 = rb.summarize_method(trajs, 16.0)
    assert at16["trajectories"] == 3 and at16["collapsed"] == 2
    assert [c["at"] for c in at16["collapses"]] == ["s4-d0", "s5-d0"]
    assert at16["acc_ft"]["n"] == 2  # the unreachable one has no snapshot to score
    assert at16["acc_ft"]["worst"] == 41.7 and at16["acc_ft"]["worst_at"] == "s4-d0"
    assert at16["acc_ft"]["mean"] == pytest.approx((80.0 + 41.7) / 2)
    at8 = rb.summarize_method(trajs, 8.0)
    assert at8["collapsed"] == 0 and at8["acc_ft"]["mean"] == pytest.approx(84.0)


def _summary(trajs, seeds=range(3, 8), draws=(0,), current="connect"):
    methods = sorted({r["method"] for r in trajs})
    summary = {"methods": {m: {f"{t:g}": rb.summarize_method([r for r in trajs if r["method"] == m], t)
                               for t in rb.TARGETS} for m in methods}, "paired": {},
               "expected": len(seeds) * len(draws)}
    for m in methods:
        summary["methods"][m]["covered"] = len(rb.coverage(trajs, m, draws))
    for a in methods:
        if a != current:
            summary["paired"][f"{a}|{current}|acc_ft"] = rb.paired(trajs, a, current, "acc_ft")
    return summary


def test_paired_differences_match_trajectory_by_trajectory():
    trajs = [_traj("connect", 3, 0, ft=(80.0, 70.0)), _traj("a", 3, 0, ft=(82.0, 76.0)),
             _traj("connect", 3, 1, ft=(80.0, 80.0)), _traj("a", 4, 0, ft=(90.0, 90.0))]
    assert rb.paired(trajs, "a", "connect", "acc_ft") == [pytest.approx(4.0)]  # only (3, 0) is in both


A, B, C = "connect-k100", "connect-k30", "connect-k100+protect"  # candidates that use the calibration images


def test_the_rule_disqualifies_collapses_and_keeps_the_default_within_the_spread():
    base = [_traj("connect", s, 0, ft=(85.0, 80.0 + s % 2)) for s in range(3, 8)]
    # A leads by 0.5 on average, but trajectory by trajectory the lead swings: kept.
    noisy = [_traj(A, s, 0, ft=(85.0 + (4 if s % 2 else -3), 80.0 + s % 2)) for s in range(3, 8)]
    rule = rb.choose_default(_summary(base + noisy), ["connect", A], "connect")
    assert rule["choice"] == "connect" and "spread" in rule["reason"]
    # B leads on every trajectory: it wins.
    steady = [_traj(B, s, 0, ft=(87.0, 82.0 + s % 2)) for s in range(3, 8)]
    assert rb.choose_default(_summary(base + steady), ["connect", B], "connect")["choice"] == B
    # C is best on the mean but collapses once: it does not qualify.
    risky = [_traj(C, s, 0, ft=(95.0, 95.0)) for s in range(3, 7)] + [_traj(C, 7, 0, stream16=2, ft=(95.0, 90.0))]
    rule = rb.choose_default(_summary(base + risky), ["connect", C], "connect")
    assert rule["choice"] == "connect" and rule["qualified"] == ["connect"]


def test_the_rule_replaces_a_default_that_collapses_and_needs_every_pair_covered():
    bad = [_traj("connect", s, 0) for s in range(3, 5)] + [_traj("connect", 5, 0, stream16=3)]  # 3 of 5, one collapse
    good = [_traj(A, s, 0, ft=(80.0, 75.0)) for s in range(3, 8)]
    short = [_traj(B, s, 0, ft=(99.0, 99.0)) for s in range(3, 6)]  # fewer trajectories: not judged
    rule = rb.choose_default(_summary(bad + good + short), ["connect", A, B], "connect")
    assert rule["choice"] == A and "collapsed on 1" in rule["reason"]
    nobody = rb.choose_default(_summary(bad + short), ["connect", B], "connect")
    assert nobody["choice"] == "connect" and "insufficient" in nobody["reason"]
    # A default that did not collapse but lacks trajectories is kept whatever the others score.
    partial = [_traj("connect", s, 0) for s in range(3, 6)]
    rule = rb.choose_default(_summary(partial + good), ["connect", A], "connect")
    assert rule["choice"] == "connect" and "lacks trajectories" in rule["reason"]


def test_a_data_free_method_covers_every_draw_of_a_base_with_one_trajectory():
    grad = "connect-k100-bngamma"
    trajs = [_traj("connect-kinf", s, 0) for s in range(3, 8)] + [_traj(grad, s, 0) for s in range(3, 8)]
    assert len(rb.coverage(trajs, "connect-kinf", [0, 1])) == 10
    assert len(rb.coverage(trajs, grad, [0, 1])) == 5  # the gradient method needs draw 1 too
    summary = _summary(trajs, draws=(0, 1), current=grad)
    rule = rb.choose_default(summary, [grad, "connect-kinf"], grad)
    assert rule["qualified"] == ["connect-kinf"] and rule["choice"] == grad  # the default lacks draw 1


def test_parse_spec_checks_method_and_variants():
    assert rb.parse_spec("connect-k100-bngamma+refresh") == ("connect-k100-bngamma", ["refresh"])
    with pytest.raises(ValueError, match="unknown variant \\+warp"):
        rb.parse_spec("connect+warp")
    with pytest.raises(ValueError, match="unknown pruning method"):
        rb.parse_spec("l3")
    with pytest.raises(ValueError, match="repeated"):
        rb.parse_spec("l2+refresh+refresh")


def _touch(path, obj=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj or {}, f)


def test_plan_skips_finished_jobs_orders_by_draw_and_resumes_fine_tuning(tmp_path):
    root = str(tmp_path)
    _touch(rb.base_path(root, 3)[:-3] + ".json")
    _touch(rb.traj_path(root, "l2", 3, 0))                       # pruned, not fine-tuned, snapshot kept
    _touch(rb.traj_path(root, "l2", 3, 0, "8"))
    _touch(rb.traj_path(root, "l2", 3, 0, "16"))
    _touch(rb.traj_path(root, "l1", 3, 0))                       # pruned elsewhere: no snapshots here
    _touch(rb.traj_path(root, "connect", 3, 0, "finetune"))      # finished
    jobs = rb.plan(root, [3, 4], [0, 1], ["connect", "l2"], ["connect", "l2"])
    labels = [j["label"] for j in jobs]
    assert labels == ["base/s4",
                      "prune/connect/s4-d0", "prune/l2/s4-d0",
                      "prune/connect/s3-d1", "prune/connect/s4-d1", "prune/l2/s3-d1", "prune/l2/s4-d1",
                      "finetune/l2/s3-d0"]
    prune = jobs[1]
    assert "--finetune" in prune["args"] and prune["done"].endswith("s4-d0-ft.json")
    assert prune["needs"] == rb.base_path(root, 4)[:-3] + ".json"
    # A method not fine-tuned here is done once its trajectory file exists.
    assert rb.plan(root, [3], [0], ["l2", "l1"], []) == []
    # Fine-tuning a trajectory whose snapshots did not travel prunes it again.
    again = rb.plan(root, [3], [0], ["l1"], ["l1"])
    assert [j["label"] for j in again] == ["prune/l1/s3-d0"] and "--finetune" in again[0]["args"]


def test_read_results_merges_fine_tuning_and_refuses_mixed_protocols(tmp_path):
    root = str(tmp_path)
    t = _traj("l2", 3, 0, ft=None)
    _touch(rb.traj_path(root, "l2", 3, 0), t)
    _touch(rb.traj_path(root, "l2", 3, 0, "finetune"), {"finetuned_acc": {"8": 84.0, "16": 79.0},
                                                           "protocol": rb.PROTOCOL})
    trajs, _ = rb.read_results([root])
    assert len(trajs) == 1 and trajs[0]["finetuned_acc"] == {"8": 84.0, "16": 79.0}
    _touch(rb.traj_path(root, "l1", 3, 0), _traj("l1", 3, 0, protocol=rb.TINY))
    with pytest.raises(SystemExit, match="different protocols"):
        rb.read_results([root])


def test_summarize_writes_the_worst_case_table(tmp_path):
    root, out = str(tmp_path / "runs"), str(tmp_path / "out")
    _touch(os.path.join(root, "bases", "seed3.json"), {"seed": 3, "acc": 92.5, "seconds": 100.0,
                                                        "protocol": rb.PROTOCOL})
    for m, s16 in (("connect", 20), ("l1", 3)):
        _touch(rb.traj_path(root, m, 3, 0), dict(_traj(m, 3, 0, stream16=s16), finetuned_acc={}))
        _touch(rb.traj_path(root, m, 3, 0, "finetune"), {"finetuned_acc": {"8": 85.0, "16": 41.7}})
    md = rb.summarize([root], out)
    assert "| l1 | 1 (1 × 1; 2/10) | 0 | 1 |" in md and "**41.7** (s3-d0)" in md
    assert "- l1 at 16x, s3-d0: last stage's residual stream at 3 <= 4" in md
    saved = json.load(open(os.path.join(out, "summary.json")))
    # plain `connect` in a file that does not record its settings ran the default of its time
    assert saved["methods"][rb.LEGACY_DEFAULT]["16"]["collapsed"] == 1  # 41.7 % after fine-tuning at 16x
    assert math.isclose(saved["methods"]["l1"]["8"]["acc_ft"]["mean"], 85.0)
    front = open(os.path.join(out, "front_page.md")).read()
    assert front == rb.front_page_table(saved)
    # README's rows in their order, the worst beside the mean; methods without trajectories are left out
    assert [line.split(" | ")[0] for line in front.splitlines()[2:]] == [
        "| " + dict(rb.FRONT_PAGE_ROWS)[rb.LEGACY_DEFAULT], "| L1"]
    assert front.splitlines()[-1] == "| L1 | 1 (3) | 1 | 85.0 ± 0.0 | 85.0 | 41.7 ± 0.0 | 41.7 |"


def test_front_page_table_names_bases_as_ranges_and_counts_unfinetuned_trajectories():
    assert rb._ranges([8, 0, 2, 1, 5, 6]) == "0-2, 5-6, 8" and rb._ranges([3]) == "3"
    stat = {"n": 2, "mean": 80.0, "std": 1.0, "worst": 79.0}
    none = {"n": 0}
    per = {"seeds": [0, 1, 2], "8": {"acc_ft": stat}, "16": {"acc_ft": stat, "trajectories": 3, "collapsed": 1}}
    lines = rb.front_page_table({"methods": {"l2": per, "taylor": {**per, "8": {"acc_ft": none}}}}).splitlines()
    assert lines[2] == "| L2 | 2 of 3 pruned (0-2) | 1 | 80.0 ± 1.0 | 79.0 | 80.0 ± 1.0 | 79.0 |"
    assert lines[3].startswith("| Taylor | 2 of 3 pruned (0-2) | 1 | – | – | 80.0")


def test_scoring_variants_refuse_options_that_make_no_sense():
    import torch

    example = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="balance_schedule='every_step'"):
        rb.build("connect-kinf+held", example, 0)
    with pytest.raises(ValueError, match="balance_schedule='every_step'"):
        rb.build("connect-k0+held", example, 0)
    with pytest.raises(ValueError, match="bn_flow='gamma'"):
        rb.build("connect-k100-bngamma+guard", example, 0)
    with pytest.raises(ValueError, match="not a connect method"):
        rb.build("l2+protect", example, 0)
    imp, options = rb.build("connect-k100+gos+refresh", example, 0)
    assert imp.bn_flow == "scale" and options == {"bn_refresh_every": 1}


def _bn_model():
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    return model


def test_held_balance_re_derives_lambda_every_step_and_frozen_keeps_it():
    import torch
    from connect_tp.pruning import progressive_prune

    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
    lams = {}
    for spec in ("connect-k100-bngamma", "connect-k100-bngamma+held"):
        imp, _ = rb.build(spec, x[:1], 0)
        seen = []
        original = imp._full_refresh

        def spy(model, graph=None, resolve=True, _orig=original, _seen=seen, _imp=imp):
            _orig(model, graph, resolve)
            _seen.append(_imp.lam)
        imp._full_refresh = spy
        progressive_prune(_bn_model(), x[:1], imp, [1.5], calibration=[(x, y)], iterative_steps=20, progress=False)
        lams[spec] = seen
    frozen, held = lams["connect-k100-bngamma"], lams["connect-k100-bngamma+held"]
    assert len(set(frozen)) == 1 and len(frozen) >= 3
    assert held[0] == pytest.approx(frozen[0]) and len(set(held)) == len(held)  # a new lambda each step


def test_guard_floors_the_variances_only_while_measuring():
    import torch
    import torch.nn as nn

    model = _bn_model()
    bn = model.bn1
    with torch.no_grad():
        bn.running_var[0] = 1e-8  # a near-constant channel
    before = [m.running_var.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.rand(1, 1, 32, 32)
    plain, _ = rb.build("connect-kinf", x, 0)
    guarded, _ = rb.build("connect-kinf+guard", x, 0)
    grads = {}
    for name, imp in (("plain", plain), ("guarded", guarded)):
        params = dict(model.named_parameters())
        g = imp._connectivity_gradients(model, params)
        w = model.conv1.weight
        grads[name] = (w.detach() * g[id(w)]).flatten(1).abs().sum(1)
    after = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the model's statistics are untouched
    share = {k: float(v[0] / v.sum()) for k, v in grads.items()}
    # channel 0 carried 95 % of the first layer's flow; floored, it keeps a bounded lead (1/sigma <= 4.5x the median)
    assert share["plain"] > 0.9 and share["guarded"] < 0.3


def test_protect_adds_a_bonus_that_grows_as_a_layer_empties():
    import torch

    for n, bigger in ((64, False), (2, True)):
        share = torch.full((n,), 1.0 / n, dtype=torch.float64)
        bonus = -torch.log1p(-share.clamp(max=rb.SHARE_CEILING))
        assert float(bonus[0]) == pytest.approx(-math.log(1 - 1 / n))
    one = -math.log1p(-rb.SHARE_CEILING)
    assert one > 10  # the last channel of a layer: a large, finite bonus


def test_read_results_refuses_a_trajectory_found_in_two_roots(tmp_path):
    one, two = str(tmp_path / "a"), str(tmp_path / "b")
    for root in (one, two):
        _touch(rb.traj_path(root, "l2", 3, 0), _traj("l2", 3, 0))
    assert len(rb.read_results([one])[0]) == 1
    with pytest.raises(SystemExit, match="in two sources"):
        rb.read_results([one, two])


def test_first_wins_takes_the_first_roots_copy_and_the_table_lists_the_other(tmp_path):
    one, two, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")
    for root, acc in ((one, 85.0), (two, 60.0)):
        _touch(rb.traj_path(root, "l2", 3, 0), _traj("l2", 3, 0))
        _touch(rb.traj_path(root, "l2", 3, 0, "finetune"), {"finetuned_acc": {"8": acc, "16": acc - 5}})
    _touch(rb.traj_path(two, "l1", 3, 0), _traj("l1", 3, 0))
    trajs, _ = rb.read_results([two, one], first_wins=True)
    l2 = next(r for r in trajs if r["method"] == "l2")
    assert len(trajs) == 2 and l2["source"] == two and l2["also_in"] == [one]
    md = rb.summarize([one, two], out, first_wins=True)
    assert f"- l2 s3-d0: from {one}; left out: {two}" in md
    assert "85.0 ± 0.0 / **85.0** (s3-d0)" in md and "60.0" not in md  # the fine-tuned 8x cell: one's copy


def _ranking_folder(tmp_path, seed, method, schedule="cosine", preset="ranking", stream16=20):
    """A ranking-benchmark run folder (``seed<s>/<method>``) holding the 8x and 16x results."""
    folder = tmp_path / f"seed{seed}" / method
    _touch(str(folder / "base.json"), {"preset": preset, "seed": seed, "model": "resnet20", "acc": 92.7,
                                       "seconds": 4000.0})
    for target, stream, ft in ((8.0, 40, 86.0), (16.0, stream16, 41.7 if stream16 <= 4 else 82.0)):
        _touch(str(folder / "results" / f"{method}_{target:g}x.json"), {
            "preset": preset, "seed": seed, "method": method, "target_speed_up": target, "speed_up": target + 0.1,
            "step": 300, "macs": 1, "base_acc": 92.7, "pruned_acc": 10.0, "pruned_acc_bn_recalibrated": 12.0,
            "channels": _channels(stream=(4, 16, stream)), "collapsed_layers": [], "finetuned_acc": ft,
            "environment": {"torch": "t", "torch_pruning": "1.6.0", "threads": 1, "cpus": 2, "load_avg_1min": 1.0},
            "provenance": {"finetune": {"config": {"schedule": schedule}}}})
    _touch(str(folder / "results" / f"{method}_2x.json"), {"target_speed_up": 2.0})  # not a target here
    return str(folder)


def test_ranking_folders_are_read_as_draw_0_of_their_base_under_this_benchmarks_names(tmp_path):
    folders = [_ranking_folder(tmp_path, 0, "connect-k100-bngamma"), _ranking_folder(tmp_path, 0, "l1", stream16=3)]
    trajs, bases = rb.read_ranking(folders)
    by = {r["method"]: r for r in trajs}
    assert set(by) == {"connect-k100-bngamma", "l1"} and [b["seed"] for b in bases] == [0]
    assert by["l1"]["draw"] == 0 and by["l1"]["finetuned_acc"] == {"8": 86.0, "16": 41.7}
    assert by["l1"]["snapshots"]["16"]["acc_bn"] == 12.0 and by["l1"]["protocol"] == rb.PROTOCOL
    md = rb.summarize([], str(tmp_path / "out"), seeds=[0], draws=[0], ranking=folders, current="connect-k100-bngamma")
    assert "- l1 at 16x, s0-d0: last stage's residual stream at 3 <= 4" in md
    assert "**connect-k100-bngamma** (the current default is best)" in md


def test_ranking_folders_of_another_schedule_or_preset_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="schedule 'constant'"):
        rb.read_ranking([_ranking_folder(tmp_path / "a", 0, "l1", schedule="constant")])
    with pytest.raises(SystemExit, match="not a ranking-benchmark run folder"):
        rb.read_ranking([_ranking_folder(tmp_path / "b", 0, "l1", preset="offline")])
    folder = _ranking_folder(tmp_path / "c", 0, "l1")
    with pytest.raises(SystemExit, match="in two sources"):
        rb.summarize([], str(tmp_path / "out"), seeds=[0], draws=[0], ranking=[folder, folder])


def test_adopt_copies_a_ranking_base_s_best_epoch_and_refuses_a_second_copy(tmp_path):
    import torch
    from connect_tp.training import load_model_checkpoint, save_model_checkpoint

    folder, root = tmp_path / "ranking" / "seed1", str(tmp_path / "root")
    final, best = resnet20(num_classes=10, in_channels=1), resnet20(num_classes=10, in_channels=1)
    save_model_checkpoint(str(folder / "base.pt"), final, {"model": "resnet20", "num_classes": 10, "in_channels": 1},
                          best_state_dict=best.state_dict())
    _touch(str(folder / "base.json"), {"preset": "ranking", "model": "resnet20", "seed": 1, "acc": 92.9})
    info = rb.adopt_ranking_base(root, str(folder))
    assert info["protocol"] == rb.PROTOCOL and info["seed"] == 1
    adopted, _ = load_model_checkpoint(rb.base_path(root, 1))
    assert all(torch.equal(a, b) for a, b in zip(adopted.state_dict().values(), best.state_dict().values()))
    with pytest.raises(SystemExit, match="has a base model 1 already"):
        rb.adopt_ranking_base(root, str(folder))
    _touch(str(tmp_path / "other" / "base.json"), {"preset": "offline", "model": "resnet20", "seed": 2})
    with pytest.raises(SystemExit, match="not a ranking-benchmark run folder"):
        rb.adopt_ranking_base(root, str(tmp_path / "other"))


@pytest.mark.parametrize("spec, settings, expected", [
    ("connect", None, "connect-k100-bngamma"),                       # older files: the default of their time
    ("connect", {"balance": math.inf, "bn_flow": "scale"}, "connect-kinf-bnscale"),
    ("connect", {"balance": 30.0, "bn_flow": "stats"}, "connect-k30"),  # stats is what a bare name means
    ("connect+gos", None, "connect-k100-bnscale"),
    ("connect-kinf+gos", None, "connect-kinf-bnscale"),
    ("connect+protect", None, "connect-k100-bngamma+protect"),
    ("connect-kinf-bngamma+protect", None, "connect-kinf-bngamma+protect"),
    ("l1", None, "l1"),
])
def test_a_trajectory_is_named_by_what_it_ran_not_by_when(spec, settings, expected):
    assert rb.method_name({"method": spec, "connect_settings": settings}) == expected


def test_a_ranking_folder_of_plain_connect_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="plain `connect`"):
        rb.read_ranking([_ranking_folder(tmp_path, 0, "connect")])


def test_plan_refuses_a_plain_connect_trajectory_of_another_default(tmp_path, monkeypatch):
    from connect_tp import importance

    root = str(tmp_path)
    _touch(rb.traj_path(root, "connect", 3, 0), _traj("connect", 3, 0))  # no settings: 0.2.0's default
    monkeypatch.setattr(importance, "DEFAULT_BN_FLOW", "gamma")
    assert [j["label"] for j in rb.plan(root, [3], [0], ["connect"], [])] == ["base/s3"]  # done, continued
    monkeypatch.setattr(importance, "DEFAULT_BN_FLOW", "scale")
    with pytest.raises(SystemExit, match="ran plain `connect` as connect-k100-bngamma, but ConnectImportance"):
        rb.plan(root, [3], [0], ["connect"], [])
