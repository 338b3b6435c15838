"""Atomic writes, checkpoint errors, pruned-model checkpoints and resumable training."""
import os

import pytest
import torch
import torch_pruning as tp

from connect_tp.data import ImageTensorDataset
from connect_tp.models import resnet20
from connect_tp.training import (CheckpointError, atomic_write, atomic_write_json, fit, load_checkpoint,
                                 load_model_checkpoint, read_json, save_model_checkpoint)

ARCH = {"model": "resnet20", "num_classes": 4, "in_channels": 1}


def _tiny_dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    images[torch.arange(n), 0, labels * 2, :] = 255  # a learnable cue: a bright row per class
    return ImageTensorDataset(images, labels, (0.2,), (0.3,), augment=True)


def test_atomic_json_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_json({"acc": 1.0}, str(path))
    atomic_write_json({"acc": 2.0, "list": [1, 2]}, str(path))
    assert read_json(str(path)) == {"acc": 2.0, "list": [1, 2]}
    assert os.listdir(path.parent) == ["result.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json({"acc": 1.0}, str(path))

    def crash(f):
        f.write('{"acc": 2.')  # half a file, then the process "dies"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert read_json(str(path)) == {"acc": 1.0}
    assert os.listdir(tmp_path) == ["result.json"]


def test_missing_or_corrupt_files_are_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt.*missing"):
        load_checkpoint(str(missing))
    corrupt = tmp_path / "base.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="base.pt.*corrupt"):
        load_checkpoint(str(corrupt))
    bad_json = tmp_path / "r.json"
    bad_json.write_text('{"acc": ')
    with pytest.raises(CheckpointError, match="r.json.*corrupt"):
        read_json(str(bad_json))


def test_pruned_model_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = resnet20(num_classes=4, in_channels=1).eval()
    example = torch.rand(2, 1, 32, 32)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.RandomImportance(),
                                  pruning_ratio=0.4, global_pruning=True, ignored_layers=[model.fc])
    pruner.step()
    assert model.layer2[0].conv1.out_channels < 32
    path = tmp_path / "pruned.pt"
    save_model_checkpoint(str(path), model, ARCH, speed_up=2.0)
    loaded, checkpoint = load_model_checkpoint(str(path))
    assert checkpoint["speed_up"] == 2.0
    assert loaded.layer2[0].conv1.out_channels == model.layer2[0].conv1.out_channels
    assert torch.allclose(loaded.eval()(example), model(example), atol=1e-6)


def test_fit_resume_repeats_the_uninterrupted_run(tmp_path):
    train_set, test_set = _tiny_dataset(), _tiny_dataset(16, seed=1)
    kwargs = dict(lr=0.05, milestones=[2], batch_size=8, seed=3, arch=ARCH)

    torch.manual_seed(0)
    full_model = resnet20(num_classes=4, in_channels=1)
    init = {k: v.clone() for k, v in full_model.state_dict().items()}
    full = fit(full_model, train_set, test_set, epochs=3, checkpoint_path=str(tmp_path / "full.pt"), **kwargs)

    # "Kill" after two epochs, then resume to three: only the third epoch runs.
    part_model = resnet20(num_classes=4, in_channels=1)
    part_model.load_state_dict(init)
    fit(part_model, train_set, test_set, epochs=2, checkpoint_path=str(tmp_path / "part.pt"), **kwargs)
    assert load_checkpoint(str(tmp_path / "part.pt"))["epoch"] == 1
    resumed_model = resnet20(num_classes=4, in_channels=1)
    resumed = fit(resumed_model, train_set, test_set, epochs=3, checkpoint_path=str(tmp_path / "part.pt"),
                  resume=True, **kwargs)
    assert resumed["epochs_run"] == 1 and resumed["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([0.05, 0.05, 0.005])
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_resume_with_checkpoint_of_other_width_is_a_clear_error(tmp_path):
    train_set = _tiny_dataset(8)
    path = tmp_path / "ft.pt"
    fit(resnet20(num_classes=4, in_channels=1), train_set, train_set, epochs=1, lr=0.01, milestones=[],
        checkpoint_path=str(path), arch=ARCH, batch_size=8)
    model = resnet20(num_classes=4, in_channels=1)
    tp.pruner.MetaPruner(model, torch.rand(1, 1, 32, 32), importance=tp.importance.RandomImportance(),
                         pruning_ratio=0.5, ignored_layers=[model.fc]).step()
    with pytest.raises(CheckpointError, match="ft.pt.*does not match"):
        fit(model, train_set, train_set, epochs=2, lr=0.01, milestones=[], checkpoint_path=str(path),
            resume=True, batch_size=8)


def test_progress_bar_advances_per_batch_and_epochs_are_reported(tmp_path, capsys):
    train_set = _tiny_dataset(32)
    epochs_done, lines = [], []
    out = fit(resnet20(num_classes=4, in_channels=1), train_set, train_set, epochs=2, lr=0.01, milestones=[],
              batch_size=8, checkpoint_path=str(tmp_path / "ft.pt"), arch=ARCH, desc="ft",
              on_epoch=epochs_done.append, log=lines.append, checkpoint_extra={"provenance": {"stage": "x"}})
    err = capsys.readouterr().err
    # 4 batches per epoch, 2 epochs: the bar counts batches and shows the running loss and accuracy.
    assert "8/8" in err and "loss=" in err and "acc=" in err and "epoch=2/2" in err
    assert epochs_done == [1, 2] and len(lines) == 2 and lines[0].startswith("ft: epoch 1/2")
    assert set(out["history"][0]) == {"epoch", "lr", "train_loss", "train_acc", "test_acc"}
    assert load_checkpoint(str(tmp_path / "ft.pt"))["provenance"] == {"stage": "x"}


def test_checkpoint_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_model_checkpoint(str(tmp_path / "m.pt"), resnet20(num_classes=4, in_channels=1), ARCH)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.pt").st_mode & 0o777 == 0o644


def test_cosine_schedule_anneals_per_batch_to_zero_and_resumes(tmp_path):
    """``schedule="cosine"`` decays the rate every batch, ending at 0 after the last one of the run."""
    train_set, test_set = _tiny_dataset(), _tiny_dataset(16, seed=1)
    kwargs = dict(lr=0.05, milestones=[], batch_size=8, seed=3, arch=ARCH, schedule="cosine")
    torch.manual_seed(0)
    model = resnet20(num_classes=4, in_channels=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "cos.pt"
    result = fit(model, train_set, test_set, epochs=2, checkpoint_path=str(path), **kwargs)
    # 4 batches per epoch: epoch 2 starts half-way down the cosine, at lr/2.
    assert [h["lr"] for h in result["history"]] == pytest.approx([0.05, 0.025])
    assert load_checkpoint(str(path))["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)

    # The schedule changes the weights (it acts), and a resumed run repeats the uninterrupted one.
    step_model = resnet20(num_classes=4, in_channels=1)
    step_model.load_state_dict(init)
    fit(step_model, train_set, test_set, epochs=2, **dict(kwargs, schedule="step"))
    assert not torch.allclose(step_model.fc.weight, model.fc.weight)
    # Killed after epoch 1 (the callback raises), then resumed: the same weights as the whole run.
    part = resnet20(num_classes=4, in_channels=1)
    part.load_state_dict(init)

    def kill(epochs_done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(part, train_set, test_set, epochs=2, checkpoint_path=str(tmp_path / "part.pt"), on_epoch=kill, **kwargs)
    resumed = resnet20(num_classes=4, in_channels=1)
    out = fit(resumed, train_set, test_set, epochs=2, checkpoint_path=str(tmp_path / "part.pt"), resume=True,
              **kwargs)
    assert out["epochs_run"] == 1 and [h["lr"] for h in out["history"]] == pytest.approx([0.05, 0.025])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_resume_under_the_other_schedule_is_a_clear_error(tmp_path):
    train_set = _tiny_dataset(8)
    path = tmp_path / "ft.pt"
    fit(resnet20(num_classes=4, in_channels=1), train_set, train_set, epochs=1, lr=0.01, milestones=[],
        checkpoint_path=str(path), arch=ARCH, batch_size=8, schedule="cosine")
    with pytest.raises(CheckpointError, match="schedule 'cosine', this run uses 'step'"):
        fit(resnet20(num_classes=4, in_channels=1), train_set, train_set, epochs=2, lr=0.01, milestones=[],
            checkpoint_path=str(path), resume=True, batch_size=8)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="schedule must be 'step' or 'cosine'"):
        fit(resnet20(num_classes=4, in_channels=1), _tiny_dataset(8), _tiny_dataset(8), epochs=1, lr=0.01,
            milestones=[], schedule="linear")
