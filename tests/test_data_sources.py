"""Dataset readers: tiny archives in the official formats come back exactly."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from datamodules import AllConvDataModule, DataError, sources
from tests.helpers import (
    CIFAR10_NAMES,
    cifar_rows,
    dump_pickle,
    idx_bytes,
    write_cifar10,
    write_cifar100,
    write_fashion,
    write_idx,
)


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Hide the Debian Fashion-MNIST package, as on a machine without it."""
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")


# --- CIFAR -----------------------------------------------------------------------------------


def test_cifar10_archive_round_trip(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path)
    raw = sources.load_cifar("cifar10", tmp_path, download=False)
    assert raw.train_x.dtype == np.uint8 and raw.train_x.shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(raw.train_x, train_x)
    np.testing.assert_array_equal(raw.train_y, train_y)
    np.testing.assert_array_equal(raw.test_x, test_x)
    np.testing.assert_array_equal(raw.test_y, test_y)
    assert raw.class_names == CIFAR10_NAMES
    folder = tmp_path / "cifar-10-batches-py"
    assert raw.files == [str(folder / f"data_batch_{i}") for i in range(1, 6)] + [
        str(folder / "test_batch"),
        str(folder / "batches.meta"),
    ]


def test_cifar_row_layout_is_planes_of_rows():
    # byte k of a row is channel k // 1024, image row (k % 1024) // 32, column k % 32
    row = (np.arange(3072) % 251).astype(np.uint8)[None]
    x = row.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for k in (0, 1, 31, 32, 1023, 1024, 2048 + 5 * 32 + 7, 3071):
        assert x[0, (k % 1024) // 32, k % 32, k // 1024] == row[0, k]
    np.testing.assert_array_equal(cifar_rows(x), row)


def test_cifar100_fine_labels_and_names(tmp_path):
    train_x, train_y, test_x, test_y, fine = write_cifar100(tmp_path)
    raw = sources.load_cifar("cifar100", tmp_path, download=False)
    np.testing.assert_array_equal(raw.train_x, train_x)
    np.testing.assert_array_equal(raw.train_y, train_y)
    np.testing.assert_array_equal(raw.test_x, test_x)
    np.testing.assert_array_equal(raw.test_y, test_y)
    assert raw.class_names == fine and len(raw.class_names) == 100


def test_datamodule_keeps_class_names_and_shapes(tmp_path):
    write_cifar100(tmp_path)
    dm = AllConvDataModule(
        dict(
            dataset="cifar100",
            dir=str(tmp_path),
            preprocess="standardize",
            augment="none",
            val_size=100,
            subset=None,
        ),
        download=False,
    )
    dm.load()
    assert dm.class_names[:2] == ["fine00", "fine01"] and dm.num_classes == 100
    assert (dm.in_channels, dm.in_size) == (3, 32)
    x, y = dm.splits["train"]
    assert x.shape == (200, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert len(dm.splits["val"][1]) == 100 and len(dm.splits["test"][1]) == 100
    assert sorted(y.bincount().tolist()) == [2] * 100  # the held-out 100 took one per class


def test_truncated_cifar_batch_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"data_batch_3: not a readable CIFAR pickle.*truncated"):
        sources.load_cifar("cifar10", tmp_path, download=False)


@pytest.mark.parametrize(
    "batch,data,labels,message",
    [
        (
            "test_batch",
            np.zeros((2, 3000), np.uint8),
            [0, 1],
            r"test_batch: data has shape \(2, 3000\)",
        ),
        (
            "data_batch_5",
            np.zeros((2, 3072), np.uint8),
            [0, 10],
            r"data_batch_5: labels run from 0 to 10, but there are 10",
        ),
    ],
    ids=["wrong-shape", "label-outside-the-names"],
)
def test_malformed_cifar_batch_names_the_file_and_the_fault(tmp_path, batch, data, labels, message):
    write_cifar10(tmp_path)
    dump_pickle(tmp_path / "cifar-10-batches-py" / batch, {b"labels": labels, b"data": data})
    with pytest.raises(DataError, match=message):
        sources.load_cifar("cifar10", tmp_path, download=False)


class _Payload:
    """What a crafted archive carries: unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_archive_is_refused_and_runs_nothing(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"labels": [0], b"data": _Payload(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: refused to load posix\.system"):
        sources.load_cifar("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_cifar_absent_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        sources.load_cifar("cifar100", tmp_path / "data", download=True)  # ALLCONV_OFFLINE is set
    msg = str(err.value)
    assert str(tmp_path / "data" / "cifar-100-python") in msg
    assert "cifar-100-python.tar.gz" in msg and "unpack it in" in msg
    assert "ALLCONV_OFFLINE" in msg
    assert not (tmp_path / "data").exists()


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("ALLCONV_OFFLINE")

    def fetch(tmp):
        (tmp / "cifar-10-python.tar.gz").write_bytes(b"half an archive")
        raise OSError("connection reset")

    root = tmp_path / "a" / "b"
    why = sources._download(root, fetch, root / "cifar-10-batches-py")
    assert "connection reset" in why
    assert list(tmp_path.iterdir()) == []


def test_download_moves_the_files_into_place(tmp_path, monkeypatch):
    monkeypatch.delenv("ALLCONV_OFFLINE")

    def fetch(tmp):
        (tmp / "raw").mkdir()
        (tmp / "raw" / "a").write_bytes(b"x")
        return tmp / "raw"

    assert sources._download(tmp_path, fetch, tmp_path / "fashion-mnist") is None
    assert [p.name for p in tmp_path.iterdir()] == ["fashion-mnist"]
    assert (tmp_path / "fashion-mnist" / "a").read_bytes() == b"x"


# --- Fashion-MNIST IDX -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    a = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_idx(tmp_path / f"x{suffix}", a)
    got = sources.read_idx(tmp_path / f"x{suffix}")
    np.testing.assert_array_equal(got, a)
    assert got.flags.writeable


def test_fashion_mnist_from_data_dir(tmp_path, no_debian):
    arrays = write_fashion(tmp_path / "fashion-mnist")
    raw = sources.load_fashion_mnist(tmp_path, download=False)
    np.testing.assert_array_equal(raw.train_x[..., 0], arrays["train_x"])
    np.testing.assert_array_equal(raw.train_y, arrays["train_y"])
    np.testing.assert_array_equal(raw.test_x[..., 0], arrays["test_x"])
    np.testing.assert_array_equal(raw.test_y, arrays["test_y"])
    assert raw.train_x.shape == (100, 28, 28, 1) and raw.train_y.dtype == np.int64
    assert raw.class_names[0] == "T-shirt/top" and raw.class_names[9] == "Ankle boot"
    assert [p.rsplit("/", 1)[1] for p in raw.files] == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte",
    ]


def test_fashion_mnist_falls_back_to_the_debian_package(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets"
    write_fashion(debian, gz=(True,) * 4)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", debian)
    raw = sources.load_fashion_mnist(tmp_path / "empty", download=False)
    assert all(f.startswith(str(debian)) for f in raw.files)
    assert not (tmp_path / "empty").exists()


def test_fashion_mnist_absent(tmp_path, no_debian):
    with pytest.raises(DataError) as err:
        sources.load_fashion_mnist(tmp_path / "data", download=True)
    msg = str(err.value)
    assert "fashion-mnist not found" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "data" / "fashion-mnist") in msg
    assert str(tmp_path / "no-debian-package") in msg
    assert not (tmp_path / "data").exists()


def _corrupt(path, how):
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if how == "truncate":
        data = data[:-17]
    elif how == "magic":
        data = b"\x00\x00\x0d\x03" + data[4:]  # type 0x0D: floats, not bytes
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize(
    "stem,how,message",
    [
        ("train-labels-idx1-ubyte", "truncate", r"91 bytes, but the header's shape \(100,\)"),
        (
            "train-images-idx3-ubyte.gz",
            "truncate",
            r"78399 bytes, but the header's shape \(100, 28, 28\)",
        ),
        ("t10k-labels-idx1-ubyte", "magic", r"bad magic number 00000d03"),
    ],
)
def test_malformed_idx_names_the_file_and_the_fault(tmp_path, no_debian, stem, how, message):
    write_fashion(tmp_path / "fashion-mnist")
    _corrupt(tmp_path / "fashion-mnist" / stem, how)
    with pytest.raises(DataError, match=stem.replace(".", r"\.") + ": " + message):
        sources.load_fashion_mnist(tmp_path, download=False)


def test_cut_gzip_and_plain_file_named_gz(tmp_path):
    a = np.zeros((10, 4, 4), np.uint8)
    write_idx(tmp_path / "cut.gz", a)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "cut.gz").read_bytes()[:30])
    with pytest.raises(DataError, match=r"cut\.gz: cannot be read .*truncated"):
        sources.read_idx(tmp_path / "cut.gz")
    (tmp_path / "gzipped").write_bytes(gzip.compress(idx_bytes(a)))
    with pytest.raises(DataError, match=r"gzipped: bad magic number 1f8b.*name it \.gz"):
        sources.read_idx(tmp_path / "gzipped")


def test_idx_images_and_labels_disagree(tmp_path, no_debian):
    write_fashion(tmp_path / "fashion-mnist")
    write_idx(tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte", np.zeros(39, np.uint8))
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte\.gz: images of shape \(40, 28, 28\)"
    ):
        sources.load_fashion_mnist(tmp_path, download=False)
