"""A pickle planted in ``--data-dir`` must never run: no code from data files.

Each planted file carries a payload that creates a marker file when it is unpickled. The payload is
first shown to be live (plain ``pickle.loads`` creates the marker), then ``connect_tp`` must refuse
the file without creating it: by the MD5 check against the official checksums, and, when a test
makes the checksum match, by the restricted unpickler.
"""
import builtins
import hashlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from connect_tp import data as data_module
from connect_tp.data import CifarUnpickler, DatasetIntegrityError, load_datasets, read_cifar

REPO = Path(__file__).resolve().parents[1]


class _Shell:
    """Unpickles to ``os.system('touch <marker>')`` (pickled as ``posix.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _Open:
    """Unpickles to ``builtins.open(marker, 'w')``: a builtins callable that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


class _Exec:
    """Unpickles to ``builtins.exec(...)`` writing the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


PAYLOADS = {"os.system": (_Shell, "system"), "builtins.open": (_Open, "io.open"),
            "builtins.exec": (_Exec, "builtin__.exec")}


def _plant(data_dir, payload, marker, nested):
    """Write a valid-looking CIFAR-10 folder whose ``data_batch_1`` carries ``payload``.

    Protocol 2, like the official files; it names builtins ``__builtin__`` (Python 2 style), and
    ``builtins.open`` is pickled as ``io.open``.
    """
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    evil = payload(marker)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"batch_label": evil} if nested else evil
    blob = pickle.dumps(batch, protocol=2)
    (folder / "data_batch_1").write_bytes(blob)
    return folder, blob


def _assert_payload_is_live(blob, tmp_path, payload_name):
    """Plain pickle runs the payload: the marker appears (in a separate folder)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe_marker = probe / "pwned"
    payload, _ = PAYLOADS[payload_name]
    live = pickle.dumps(payload(probe_marker), protocol=2)
    result = pickle.loads(live)
    if hasattr(result, "close"):
        result.close()
    assert probe_marker.exists(), "the test payload does not work, so the test would prove nothing"


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-a-batch"])
@pytest.mark.parametrize("payload_name", sorted(PAYLOADS))
def test_planted_pickle_is_refused_by_the_checksum_and_never_runs(tmp_path, payload_name, nested):
    marker = tmp_path / "pwned"
    payload, _ = PAYLOADS[payload_name]
    folder, blob = _plant(tmp_path / "data", payload, marker, nested)
    _assert_payload_is_live(blob, tmp_path, payload_name)
    with pytest.raises(DatasetIntegrityError) as err:
        read_cifar("cifar10", str(tmp_path / "data"), train=True)
    assert not marker.exists()
    message = str(err.value)
    assert str(folder / "data_batch_1") in message and "does not match the official copy" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "--download" in message
    with pytest.raises(DatasetIntegrityError):
        load_datasets("cifar10", data_dir=str(tmp_path / "data"))
    assert not marker.exists()


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-a-batch"])
@pytest.mark.parametrize("payload_name", sorted(PAYLOADS))
def test_restricted_unpickler_refuses_a_planted_pickle_whose_checksum_matches(tmp_path, monkeypatch,
                                                                               payload_name, nested):
    # Defense in depth: even if the checksum table were wrong (here: replaced by the test with the
    # planted file's own checksums), the unpickler refuses every global a CIFAR batch does not need.
    marker = tmp_path / "pwned"
    payload, refused_name = PAYLOADS[payload_name]
    folder, _ = _plant(tmp_path / "data", payload, marker, nested)
    table = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setitem(data_module.CIFAR_MD5, "cifar10", table)
    with pytest.raises(DatasetIntegrityError) as err:
        read_cifar("cifar10", str(tmp_path / "data"), train=True)
    assert not marker.exists()
    message = str(err.value)
    assert str(folder / "data_batch_1") in message and refused_name in message
    assert "refused before it could run" in message and "--download" in message


def test_restricted_unpickler_still_reads_numpy_batches(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        batch = {b"data": data, b"labels": [3, np.int64(4)], b"batch_label": b"x", b"filenames": [b"a.png"]}
        loaded = CifarUnpickler(io.BytesIO(pickle.dumps(batch, protocol=protocol)), "mem").load()
        assert np.array_equal(loaded[b"data"], data) and loaded[b"labels"] == [3, 4]


def test_codecs_encode_is_limited_to_latin1(tmp_path):
    import _codecs

    class _Rot13:
        def __reduce__(self):
            return _codecs.encode, ("abc", "rot13")

    with pytest.raises(Exception, match="latin1"):
        CifarUnpickler(io.BytesIO(pickle.dumps(_Rot13(), protocol=2)), "mem").load()


def test_cli_reports_a_planted_pickle_as_an_error_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "data", _Shell, marker, nested=False)
    cmd = [sys.executable, "-m", "benchmarks.cifar_pruning", "train", "--preset", "paper-resnet56",
           "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert not marker.exists()
    assert "error:" in done.stderr and "does not match the official copy" in done.stderr
    assert "Traceback" not in done.stderr
