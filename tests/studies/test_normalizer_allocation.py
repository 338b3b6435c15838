"""benchmarks/studies/normalizer_allocation.py: stage widths, its table and bad --configs."""
import pytest

from benchmarks.studies import normalizer_allocation as na
from connect_tp.models import resnet20
from connect_tp.pruning import build_importance, progressive_prune
from tests.test_pruning import EXAMPLE, _model


def test_stage_widths_of_an_unpruned_and_a_pruned_resnet20():
    assert na.stage_widths(resnet20(num_classes=10, in_channels=1)) == "16/16 · 32/32 · 64/64"
    snap = progressive_prune(_model(), EXAMPLE, build_importance("connect-kinf-bngamma-normsum", EXAMPLE), [4.0],
                             iterative_steps=40, progress=False)[0]
    assert na.stage_widths(snap.model) != "16/16 · 32/32 · 64/64"


def test_table_lists_each_run_and_bad_configs_are_refused(capsys):
    runs = {"a": {"config": "mean/sum", "seed": 0, "target": 8.0, "widths": "7/8 · 11/10 · 11/10", "acc": 83.85}}
    assert "| mean/sum | 0 | 8x | 7/8 · 11/10 · 11/10 | 83.85 |" in na.table(runs)
    with pytest.raises(SystemExit):
        na.main(["--configs", "meansum"])
    assert "REDUCTION/NORMALIZER" in capsys.readouterr().err
