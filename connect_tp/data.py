"""Image-classification data for the pruning benchmarks: CIFAR-10/100 and Fashion-MNIST.

Every dataset is read into memory as ``uint8`` tensors of shape ``(N, C, 32, 32)`` and served by
:class:`ImageTensorDataset`, which applies the standard CIFAR augmentation (4-pixel-padded random
crop + horizontal flip) to training data and normalizes with per-dataset channel statistics.

Sources, in the order they are tried:

* CIFAR-10/100: the python-pickle batches of the official archive under ``data_dir``
  (``cifar-10-batches-py/`` or ``cifar-100-python/``, the layout ``torchvision`` downloads to);
  when missing or not matching the official checksums and ``download=True``, they are fetched
  through ``torchvision``.
* Fashion-MNIST: IDX files (``*-ubyte`` or ``*-ubyte.gz``) under ``data_dir``, ``data_dir/raw``
  or ``data_dir/FashionMNIST/raw`` (torchvision's layout), then Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``), then a ``torchvision`` download. The 28x28
  images are zero-padded to 32x32 so that the CIFAR models apply unchanged.

CIFAR files are python pickles, and unpickling a file can run arbitrary code. So before a CIFAR
file is unpickled, its MD5 is checked against the official checksum in :data:`CIFAR_MD5` (the
same ones ``torchvision`` checks), on the very bytes that are then unpickled; a file that does not
match is refused with an error that names it and says how to get a genuine copy. As a second line
of defense the bytes are unpickled by :class:`CifarUnpickler`, which only lets through the numpy
array reconstruction a CIFAR batch needs. The files are read here rather than through
``torchvision.datasets.CIFAR10`` so that a damaged or planted file gives an error that names it.
There is no switch to skip the check; tests that write small files in CIFAR's format replace the
table with the checksums of their own files.

Example:
    >>> from connect_tp.data import load_datasets
    >>> train_set, test_set, info = load_datasets("fashion_mnist", train_subset=1000, seed=0)
    >>> image, label = train_set[0]
    >>> image.shape, info.num_classes
    (torch.Size([1, 32, 32]), 10)
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CIFAR_MD5", "CifarUnpickler", "DatasetInfo", "DATASETS", "DEBIAN_FASHION_MNIST_DIR", "DatasetError",
    "DatasetIntegrityError", "ImageTensorDataset", "load_datasets", "read_cifar", "read_fashion_mnist", "read_idx",
]

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetError(FileNotFoundError):
    """A dataset file is missing or unreadable; the message names the file and how to get it."""


class DatasetIntegrityError(DatasetError):
    """A CIFAR file is not the official one (wrong checksum, or a pickle asking for code).

    The file was not unpickled (or its unpickling was stopped before anything ran); the message
    names the file and how to get a genuine copy.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that models and loaders need."""

    name: str
    num_classes: int
    in_channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Statistics of the 28x28 images; the zero padding to 32x32 is normalized like black pixels.
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, (0.2860,), (0.3530,)),
}

#: Official MD5 checksums of the CIFAR python batches, by dataset and file name (the values
#: ``torchvision.datasets.CIFAR10/CIFAR100`` check). Every CIFAR file is checked against this table
#: before it is unpickled; a file without an entry is refused. There is deliberately no option to
#: skip the check: tests that write small files in CIFAR's format replace the table's entries with
#: the checksums of their own files (``monkeypatch.setitem(data.CIFAR_MD5, "cifar10", {...})``).
CIFAR_MD5: Dict[str, Dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}

CIFAR_HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


class ImageTensorDataset(Dataset):
    """In-memory ``uint8`` images with optional CIFAR augmentation and normalization.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``.
        labels: ``int64`` tensor ``(N,)``.
        mean, std: per-channel normalization applied after scaling to ``[0, 1]``.
        augment: random crop with 4-pixel zero padding and random horizontal flip.

    Example:
        >>> ds = ImageTensorDataset(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]),
        ...                         mean=(0.5,), std=(0.5,), augment=True)
        >>> ds[1][0].shape, ds[1][1]
        (torch.Size([1, 32, 32]), 1)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255.0)
        if self.augment:
            _, h, w = image.shape
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - self.mean) / self.std, int(self.labels[index])

    def without_augmentation(self) -> "ImageTensorDataset":
        """The same images, served without augmentation (for calibration batches)."""
        return ImageTensorDataset(self.images, self.labels, self.mean.flatten().tolist(),
                                  self.std.flatten().tolist(), augment=False)

    def subset(self, n: Optional[int], seed: int = 0) -> "ImageTensorDataset":
        """A random subset of ``n`` samples (the whole set when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageTensorDataset(self.images[index], self.labels[index], self.mean.flatten().tolist(),
                                  self.std.flatten().tolist(), self.augment)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------
def _numpy_private(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy 2) or ``numpy.core.<module>.<name>`` (numpy 1)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to what pickle protocol 2 uses for ``bytes``: ``encode(str, 'latin1')``."""
    # Compared as text: no codec is looked up (and no encodings module imported) for a foreign name.
    if not isinstance(obj, str) or str(encoding).lower() not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got encoding {encoding!r}")
    return codecs.encode(obj, "latin1")


def _cifar_globals() -> Dict[Tuple[str, str], Any]:
    reconstruct = _numpy_private("multiarray", "_reconstruct")
    scalar = _numpy_private("multiarray", "scalar")
    frombuffer = _numpy_private("numeric", "_frombuffer")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):  # numpy 1 writes numpy.core, numpy 2 numpy._core
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that only builds what a CIFAR batch is made of.

    A CIFAR batch is a dict of bytes, lists, ints and numpy arrays. Plain containers need no global
    lookup; of the globals, only the numpy array and dtype reconstruction functions (under their
    numpy 1 and numpy 2 names) and ``_codecs.encode`` restricted to latin-1 (how protocol 2 stores
    ``bytes``) are allowed. Any other global (``os.system``, ``builtins.eval``, ``builtins.open``,
    ...) is refused before it can be called, with a :class:`DatasetIntegrityError` that names the
    file. This is the second line of defense; the first is the MD5 check of :func:`read_cifar`.

    Args:
        file: a binary file object with the pickle.
        path: the file's path, for the error message.

    Example:
        >>> import io
        >>> batch = CifarUnpickler(io.BytesIO(pickle.dumps({b"labels": [1, 2]})), "x").load()
        >>> batch[b"labels"]
        [1, 2]
    """

    def __init__(self, file: Any, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path
        self._allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy reconstruction function; refuse every other global.

        Raises:
            DatasetIntegrityError: ``module.name`` is not needed by a CIFAR batch.
        """
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetIntegrityError(
                f"CIFAR file {self.path} asks the unpickler for {module}.{name}, which a CIFAR batch never "
                f"needs (it holds only numpy arrays, lists, ints and bytes); it was refused before it could "
                f"run. The file is not a genuine CIFAR batch: {_GENUINE_COPY_HINT}") from None

    def persistent_load(self, pid: Any) -> Any:
        """CIFAR batches have no persistent ids; refuse them like a foreign global."""
        raise DatasetIntegrityError(
            f"CIFAR file {self.path} contains a persistent id, which a CIFAR batch never has. The file is "
            f"not a genuine CIFAR batch: {_GENUINE_COPY_HINT}")


_GENUINE_COPY_HINT = (
    "delete it and get a genuine copy: rerun with --download (fetches the official archive and checks "
    f"its checksum), or download the python version from {CIFAR_HOMEPAGE}, extract it into a folder and "
    "pass that folder as --data-dir")


# MD5 as torchvision uses it: it compares a file with a fixed official checksum, which needs a second
# preimage to fool (collisions do not help). ``usedforsecurity=False`` keeps it working on FIPS systems.
def _md5_of_file(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_md5(name: str, path: str) -> str:
    expected = CIFAR_MD5.get(name, {}).get(os.path.basename(path))
    if not expected:
        raise DatasetIntegrityError(
            f"CIFAR file {path}: no official checksum is known for it (connect_tp.data.CIFAR_MD5 has no "
            f"entry for {name}/{os.path.basename(path)}), so it is not unpickled. Restore the table "
            f"(reinstall connect_tp) and use the official files from {CIFAR_HOMEPAGE}")
    return expected


def _mismatch_error(path: str, actual: str, expected: str) -> DatasetIntegrityError:
    return DatasetIntegrityError(
        f"CIFAR file {path} does not match the official copy (MD5 {actual}, expected {expected}), so it "
        f"was not unpickled: a modified pickle can run code. It is damaged, edited or from elsewhere; "
        f"{_GENUINE_COPY_HINT}")


def _read_cifar_batch(path: str, label_key: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Check the file's MD5, then unpickle the same bytes with :class:`CifarUnpickler`."""
    if not os.path.isfile(path):
        raise DatasetError(f"CIFAR file {path} is missing")
    expected = _expected_md5(name, path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DatasetError(f"CIFAR file {path} cannot be read ({exc}); check its permissions or get it again") from exc
    # The checksum is taken of the bytes that are unpickled, so the file cannot change in between.
    actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if actual != expected.lower():
        raise _mismatch_error(path, actual, expected)
    try:
        batch = CifarUnpickler(io.BytesIO(raw), path).load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except DatasetError:
        raise
    except Exception as exc:  # pickle, key and reshape errors all mean the same thing to the user
        raise DatasetError(f"CIFAR file {path} is corrupt or not in CIFAR's python format ({exc!r}); "
                           f"delete it and download the dataset again") from exc
    if len(data) != len(labels):
        raise DatasetError(f"CIFAR file {path} has {len(data)} images but {len(labels)} labels")
    return data, labels


def read_cifar(name: str, data_dir: str, train: bool, download: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 or CIFAR-100 (fine labels) from its python-pickle batches.

    Every file is checked against its official MD5 (:data:`CIFAR_MD5`) before it is unpickled, and
    is then unpickled with :class:`CifarUnpickler`, which refuses anything but numpy arrays.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: folder that contains ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        train: the 50,000 training images, else the 10,000 test images.
        download: fetch the official archive with torchvision (which checks its checksum) when a
            file is missing or does not match its official checksum; a non-matching file is
            deleted first so that the genuine one takes its place.

    Returns:
        ``uint8`` images ``(N, 3, 32, 32)`` and ``int64`` labels ``(N,)``.

    Raises:
        DatasetError: a file is missing (and could not be downloaded) or corrupt.
        DatasetIntegrityError: a file does not match the official checksum, or its pickle asks for
            anything but numpy arrays; it was not run.
    """
    folder, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    root = os.path.join(data_dir, folder)
    files = [os.path.join(root, f) for f in (train_files if train else test_files)]
    missing = [f for f in files if not os.path.isfile(f)]
    if download:
        # Files with the wrong content are removed (a symlink is removed, not its target) so that the
        # official archive, extracted below, puts genuine ones in their place.
        for f in files:
            if f not in missing and _md5_of_file(f) != _expected_md5(name, f).lower():
                os.remove(f)
                missing.append(f)
    if missing and download:
        import torchvision  # imported here: only a download needs it

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root=data_dir, train=train, download=True)
        except Exception as exc:  # offline, proxy, disk full: the message below says what to do
            raise DatasetError(
                f"{name}: {missing[0]} is missing and the download failed ({exc}). Download "
                f"{cls.url} elsewhere, extract it into {data_dir!r} (giving {root}/) and pass "
                f"--data-dir {data_dir}") from exc
        missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        url = _cifar_url(name)
        raise DatasetError(
            f"{name}: {missing[0]} is missing. Run with --download (needs internet), or download "
            f"{url}, extract it into a folder and pass that folder as --data-dir")
    parts = [_read_cifar_batch(f, label_key, name) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _cifar_url(name: str) -> str:
    return ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" if name == "cifar10"
            else "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a ``uint8`` array.

    Raises:
        DatasetError: the file is missing, truncated or not an unsigned-byte IDX file.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"IDX file {path} is missing")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        magic = int.from_bytes(raw[0:4], "big")
        if magic >> 8 != 0x08:  # 0x08 = unsigned byte; the low byte is the number of dimensions
            raise ValueError(f"magic number {magic:#x} is not an unsigned-byte IDX header")
        ndim = magic & 0xFF
        shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        offset = 4 + 4 * ndim
        size = int(np.prod(shape))
        if len(raw) - offset != size:
            raise ValueError(f"expected {size} bytes of data, found {len(raw) - offset}")
        return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"IDX file {path} is corrupt ({exc}); delete it and get the dataset again") from exc


def _find_idx(stem: str, folders: Sequence[str]) -> Optional[str]:
    for folder in folders:
        for suffix in ("", ".gz"):
            path = os.path.join(folder, stem + suffix)
            if os.path.isfile(path):
                return path
    return None


def read_fashion_mnist(data_dir: Optional[str], train: bool, download: bool = False,
                       system_dir: str = DEBIAN_FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read Fashion-MNIST and zero-pad the images from 28x28 to 32x32.

    Args:
        data_dir: a folder with the IDX files (also searched: ``raw/`` and ``FashionMNIST/raw/``).
        train: the 60,000 training images, else the 10,000 test images.
        download: fetch through torchvision into ``data_dir`` when no local copy is found.
        system_dir: where Debian's ``dataset-fashion-mnist`` installs the files.

    Returns:
        ``uint8`` images ``(N, 1, 32, 32)`` and ``int64`` labels ``(N,)``.
    """
    prefix = "train" if train else "t10k"
    folders = []
    if data_dir:
        folders += [data_dir, os.path.join(data_dir, "raw"), os.path.join(data_dir, "FashionMNIST", "raw")]
    folders.append(system_dir)
    image_path = _find_idx(f"{prefix}-images-idx3-ubyte", folders)
    label_path = _find_idx(f"{prefix}-labels-idx1-ubyte", folders)
    if (image_path is None or label_path is None) and download and data_dir:
        import torchvision

        try:
            torchvision.datasets.FashionMNIST(root=data_dir, train=train, download=True)
        except Exception as exc:
            raise DatasetError(f"Fashion-MNIST download into {data_dir} failed ({exc}); "
                               f"install it with `apt-get install dataset-fashion-mnist`") from exc
        image_path = _find_idx(f"{prefix}-images-idx3-ubyte", folders)
        label_path = _find_idx(f"{prefix}-labels-idx1-ubyte", folders)
    if image_path is None or label_path is None:
        stem = f"{prefix}-{'images-idx3' if image_path is None else 'labels-idx1'}-ubyte(.gz)"
        raise DatasetError(
            f"Fashion-MNIST file {stem} not found in {folders}. Install it with "
            f"`apt-get install dataset-fashion-mnist`, or pass --data-dir with the IDX files, or --download")
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST files {image_path} and {label_path} do not match "
                           f"(images {images.shape}, labels {labels.shape})")
    images = torch.from_numpy(images.copy()).unsqueeze(1)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))  # 28x28 -> 32x32, like the CIFAR models expect
    return images, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
def load_datasets(name: str, data_dir: Optional[str] = None, download: bool = False,
                  train_subset: Optional[int] = None, test_subset: Optional[int] = None,
                  augment: bool = True, seed: int = 0) -> Tuple[ImageTensorDataset, ImageTensorDataset, DatasetInfo]:
    """Training and test sets of a registered dataset, optionally random subsets of them.

    Args:
        name: a key of :data:`DATASETS` (``cifar10``, ``cifar100``, ``fashion_mnist``).
        data_dir: local copy (default ``./data``).
        download: allow a download through torchvision when the files are missing.
        train_subset, test_subset: keep this many random samples (None keeps all).
        augment: augment the training set.
        seed: seed of the subset selection.

    Returns:
        ``(train_set, test_set, info)``.

    Example:
        >>> train_set, test_set, info = load_datasets("cifar10", data_dir="data")  # doctest: +SKIP
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    info = DATASETS[name]
    data_dir = data_dir or "data"
    if name == "fashion_mnist":
        train = read_fashion_mnist(data_dir, True, download)
        test = read_fashion_mnist(data_dir, False, download)
    else:
        train = read_cifar(name, data_dir, True, download)
        test = read_cifar(name, data_dir, False, download)
    train_set = ImageTensorDataset(*train, info.mean, info.std, augment=augment).subset(train_subset, seed)
    # The test subset is drawn with a fixed seed: every run of a preset is scored on the same images.
    test_set = ImageTensorDataset(*test, info.mean, info.std, augment=False).subset(test_subset, 0)
    return train_set, test_set, info
