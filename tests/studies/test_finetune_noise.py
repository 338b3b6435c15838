"""benchmarks/studies/finetune_noise.py --pruned-dir: a saved snapshot is used only with the base it came from."""
import pytest

from benchmarks.studies import finetune_noise
from connect_tp.models import resnet20
from connect_tp.pipeline.files import sha256_file
from connect_tp.training import save_model_checkpoint

ARCH = {"model": "resnet20", "num_classes": 10, "in_channels": 1}


def _run_folder(tmp_path, parent_sha):
    folder = tmp_path / "run"
    (folder / "pruned").mkdir(parents=True)
    save_model_checkpoint(str(folder / "pruned" / "l1_8x.pt"), resnet20(num_classes=10, in_channels=1), ARCH,
                          speed_up=8.3, provenance={"parent": {"path": "base.pt", "sha256": parent_sha}})
    return folder


def test_a_saved_snapshot_of_the_named_base_is_loaded(tmp_path):
    base = tmp_path / "base.pt"
    save_model_checkpoint(str(base), resnet20(num_classes=10, in_channels=1), ARCH)
    snap = finetune_noise._saved_snapshot(str(_run_folder(tmp_path, sha256_file(str(base)))), "l1", 8.0, str(base))
    assert (snap.target, snap.speed_up) == (8.0, 8.3)
    assert sum(p.numel() for p in snap.model.parameters()) > 0


def test_a_snapshot_of_another_base_or_a_missing_one_is_refused(tmp_path):
    base = tmp_path / "base.pt"
    save_model_checkpoint(str(base), resnet20(num_classes=10, in_channels=1), ARCH)
    folder = _run_folder(tmp_path, "0" * 64)
    with pytest.raises(SystemExit, match="was not pruned from"):
        finetune_noise._saved_snapshot(str(folder), "l1", 8.0, str(base))
    with pytest.raises(SystemExit, match="does not exist"):
        finetune_noise._saved_snapshot(str(folder), "l1", 16.0, str(base))


def test_an_older_snapshot_without_a_parent_is_judged_by_its_folders_base(tmp_path):
    base = tmp_path / "base.pt"
    save_model_checkpoint(str(base), resnet20(num_classes=10, in_channels=1), ARCH)
    folder = tmp_path / "old"
    (folder / "pruned").mkdir(parents=True)
    save_model_checkpoint(str(folder / "pruned" / "l1_8x.pt"), resnet20(num_classes=10, in_channels=1), ARCH)
    with pytest.raises(SystemExit, match="was not pruned from"):  # no parent and no base.pt beside it
        finetune_noise._saved_snapshot(str(folder), "l1", 8.0, str(base))
    (folder / "base.pt").write_bytes(base.read_bytes())
    assert finetune_noise._saved_snapshot(str(folder), "l1", 8.0, str(base)).target == 8.0
