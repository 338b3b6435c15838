"""Dataset readers on small files written here in CIFAR's and MNIST's own formats.

CIFAR files are checked against the official MD5s before they are unpickled; the small files
written here are accepted by putting their own checksums into ``connect_tp.data.CIFAR_MD5`` for the
duration of a test (``_trust``).
"""
import gzip
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch

from connect_tp import data as data_module
from connect_tp.data import (DEBIAN_FASHION_MNIST_DIR, DatasetError, DatasetIntegrityError, ImageTensorDataset,
                             load_datasets, read_cifar, read_fashion_mnist)


def _trust(monkeypatch, name, folder):
    """Accept the files now in ``folder`` as the official ``name`` files for this test."""
    table = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setitem(data_module.CIFAR_MD5, name, table)


def _write_cifar10(root, n_per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_every_batch_in_channel_major_order(tmp_path, monkeypatch):
    written = _write_cifar10(tmp_path)
    _trust(monkeypatch, "cifar10", tmp_path / "cifar-10-batches-py")
    images, labels = read_cifar("cifar10", str(tmp_path), train=True)
    assert images.shape == (15, 3, 32, 32) and images.dtype == torch.uint8
    expected_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert labels.tolist() == expected_labels
    # CIFAR rows are 1024 red, then 1024 green, then 1024 blue values, each row-major over 32x32.
    row = written["data_batch_2"][0][1]
    assert images[4, 0, 1, 2] == row[1 * 32 + 2]
    assert images[4, 2, 31, 0] == row[2048 + 31 * 32]
    test_images, test_labels = read_cifar("cifar10", str(tmp_path), train=False)
    assert test_images.shape == (3, 3, 32, 32) and test_labels.tolist() == written["test_batch"][1]


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar100_uses_fine_labels(tmp_path, monkeypatch, protocol):
    # Protocol 2 is what the official (Python 2) files use; numpy arrays then go through
    # _reconstruct/_codecs.encode, while protocol 5 uses _frombuffer: the unpickler allows both.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 4), ("test", 2)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [99, 5, 7, 0][:n],
                         b"coarse_labels": [1] * n}, f, protocol=protocol)
    _trust(monkeypatch, "cifar100", folder)
    train_set, test_set, info = load_datasets("cifar100", data_dir=str(tmp_path), augment=False)
    assert info.num_classes == 100 and len(train_set) == 4 and len(test_set) == 2
    assert [train_set[i][1] for i in range(4)] == [99, 5, 7, 0]
    assert train_set[0][0].shape == (3, 32, 32)


def test_missing_cifar_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DatasetError) as err:
        read_cifar("cifar10", str(tmp_path), train=True, download=False)
    message = str(err.value)
    assert os.path.join("cifar-10-batches-py", "data_batch_1") in message
    assert "--download" in message and "--data-dir" in message


def test_corrupt_cifar_file_names_the_file(tmp_path, monkeypatch):
    _write_cifar10(tmp_path)
    broken = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    broken.write_bytes(b"\x80\x04this is not a pickle")
    _trust(monkeypatch, "cifar10", tmp_path / "cifar-10-batches-py")  # checksum passes, the pickle does not
    with pytest.raises(DatasetError, match="data_batch_3.*corrupt"):
        read_cifar("cifar10", str(tmp_path), train=True)


def test_cifar_file_that_differs_from_the_official_copy_is_refused(tmp_path, monkeypatch):
    _write_cifar10(tmp_path)
    _trust(monkeypatch, "cifar10", tmp_path / "cifar-10-batches-py")
    changed = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(DatasetIntegrityError) as err:
        read_cifar("cifar10", str(tmp_path), train=True)
    message = str(err.value)
    assert str(changed) in message and "does not match the official copy" in message
    assert "--download" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_small_cifar_files_are_refused_with_the_official_checksums(tmp_path):
    # Without a test replacing the table, nothing but the official files is ever unpickled.
    _write_cifar10(tmp_path)
    with pytest.raises(DatasetIntegrityError, match="data_batch_1 does not match the official copy"):
        read_cifar("cifar10", str(tmp_path), train=True)
    with pytest.raises(DatasetIntegrityError, match="test_batch does not match the official copy"):
        read_cifar("cifar10", str(tmp_path), train=False)
    with pytest.raises(DatasetIntegrityError, match="data_batch_1 does not match the official copy"):
        load_datasets("cifar10", data_dir=str(tmp_path))


def test_checksum_table_matches_torchvision():
    datasets = pytest.importorskip("torchvision.datasets")
    for name, cls in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        assert data_module.CIFAR_MD5[name] == dict(cls.train_list + cls.test_list)


def test_download_replaces_a_file_that_does_not_match(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    written = _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    _trust(monkeypatch, "cifar10", folder)
    genuine = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(b"planted")
    calls = []

    class FakeCIFAR10:  # stands in for the download: writes the "official" file back
        url = "https://example.invalid/cifar-10-python.tar.gz"

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            (folder / "data_batch_4").write_bytes(genuine)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    images, labels = read_cifar("cifar10", str(tmp_path), train=True, download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def _write_idx(path, array, compress):
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("layout,compress", [("flat", True), ("torchvision", False)])
def test_fashion_mnist_idx_is_padded_to_32(tmp_path, layout, compress):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = read_fashion_mnist(str(tmp_path), train=False, system_dir=str(tmp_path / "nowhere"))
    assert x.shape == (5, 1, 32, 32) and y.tolist() == [3, 1, 4, 1, 5]
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert x[:, :, :2].sum() == 0 and x[:, :, :, 30:].sum() == 0  # the padding is black


def test_corrupt_and_missing_idx_files_are_named(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # 5 labels promised, 1 given
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.*corrupt"):
        read_fashion_mnist(str(tmp_path), train=True, system_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        read_fashion_mnist(str(tmp_path), train=False, system_dir=str(tmp_path / "nowhere"))


def test_augmentation_keeps_shape_and_moves_pixels():
    images = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    images[0, 0, 10:20, 5:12] = 255
    plain = ImageTensorDataset(images, torch.tensor([0]), (0.0,), (1.0,), augment=False)
    augmented = ImageTensorDataset(images, torch.tensor([0]), (0.0,), (1.0,), augment=True)
    torch.manual_seed(0)
    views = [augmented[0][0] for _ in range(20)]
    assert all(v.shape == (1, 32, 32) for v in views)
    assert any(not torch.equal(v, plain[0][0]) for v in views)
    assert torch.equal(plain[0][0], images[0].float() / 255)


def test_subset_is_reproducible_and_keeps_normalization():
    ds = ImageTensorDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(),
                            torch.arange(10), (0.5,), (0.25,))
    a, b = ds.subset(4, seed=3), ds.subset(4, seed=3)
    assert [a[i][1] for i in range(4)] == [b[i][1] for i in range(4)]
    assert len(set(a[i][1] for i in range(4))) == 4
    label = a[0][1]
    assert torch.allclose(a[0][0], (torch.full((1, 2, 2), label / 255.0) - 0.5) / 0.25)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    train_set, test_set, info = load_datasets("fashion_mnist", data_dir="/nonexistent", train_subset=100, seed=0)
    assert len(train_set) == 100 and len(test_set) == 10000 and info.in_channels == 1
    image, label = test_set[0]
    assert image.shape == (1, 32, 32) and 0 <= label < 10
