"""Host-side input pipeline: deterministic shuffling, sharding, augmentation.

Everything here is plain numpy. The permutation of an epoch depends only on
``(seed, epoch)`` and the augmentation of a batch only on
``(seed, epoch, step)``, so a run can be resumed at any step and gives the
same batches. Augmentation parameters are drawn for the whole *global* batch
before it is split between processes, so the union of the per-process
batches is identical for any ``process_count``.
"""

from __future__ import annotations

import operator
from typing import Dict, Iterator, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lipjax.data.dataset import Dataset

# Tags that keep the random streams of shuffling and augmentation apart.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def _non_negative_int(value, what: str) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None
  if value < 0:
    raise ValueError(f"{what} must be non-negative, got {value}")
  return value


def num_batches(dataset: Union[Dataset, int], batch_size: int, *,
                drop_remainder: bool = True) -> int:
  """Number of (global) batches :func:`batches` yields per epoch.

  Every process yields this many batches, whatever its ``process_index``.

  Args:
    dataset: A :class:`Dataset` or a number of examples.
    batch_size: Global batch size (summed over processes).
    drop_remainder: Whether the last incomplete batch is dropped.

  Returns:
    The number of batches.
  """
  n = len(dataset) if isinstance(dataset, Dataset) else _non_negative_int(dataset, "dataset")
  batch_size = operator.index(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return n // batch_size if drop_remainder else -(-n // batch_size)


def crop_and_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, *,
                  padding: int = 4) -> np.ndarray:
  """Zero-pads images, crops them back to size and optionally mirrors them.

  Output image ``i`` is the ``H x W`` window at ``offsets[i] = (dy, dx)`` of
  image ``i`` zero-padded by ``padding`` pixels on every side, flipped left
  to right when ``flips[i]``. ``offsets[i] == (padding, padding)`` with no
  flip is the identity. Vectorised: one padded copy per call, then a single
  gather of the windows from a strided view.

  Args:
    images: ``(B, H, W, C)`` array (any dtype).
    offsets: Integer ``(B, 2)`` array with values in ``[0, 2 * padding]``.
    flips: Boolean ``(B,)`` array.
    padding: Zero padding in pixels on each side.

  Returns:
    Array of the same shape and dtype as ``images``.
  """
  b, h, w, c = images.shape
  offsets = np.asarray(offsets)
  flips = np.asarray(flips, dtype=bool)
  if offsets.shape != (b, 2) or flips.shape != (b,):
    raise ValueError(f"expected offsets of shape ({b}, 2) and flips of shape ({b},), "
                     f"got {offsets.shape} and {flips.shape}")
  if b and (offsets.min() < 0 or offsets.max() > 2 * padding):
    raise ValueError(f"offsets must lie in [0, {2 * padding}]")
  padded = np.zeros((b, h + 2 * padding, w + 2 * padding, c), dtype=images.dtype)
  padded[:, padding:padding + h, padding:padding + w] = images
  # View of every H x W window: (B, 2p + 1, 2p + 1, C, H, W); no copy.
  windows = sliding_window_view(padded, (h, w), axis=(1, 2))
  out = windows[np.arange(b), offsets[:, 0], offsets[:, 1]]   # (B, C, H, W) copy
  out[flips] = out[flips, :, :, ::-1]
  return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def augmentation_params(batch_size: int, *, seed: int, epoch: int, step: int,
                        padding: int = 4):
  """Draws crop offsets and flips for one global batch.

  Args:
    batch_size: Global batch size.
    seed: Non-negative experiment seed.
    epoch: Non-negative epoch number.
    step: Non-negative batch index within the epoch.
    padding: Crop padding; offsets are drawn from ``[0, 2 * padding]``.

  Returns:
    ``(offsets, flips)``: ``int64`` ``(batch_size, 2)`` and ``bool``
    ``(batch_size,)``, a function of ``(seed, epoch, step)`` only.
  """
  rng = np.random.default_rng([seed, epoch, _AUGMENT_STREAM, step])
  offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
  flips = rng.integers(0, 2, size=batch_size).astype(bool)
  return offsets, flips


def batches(dataset: Dataset, batch_size: int, *, seed: int, epoch: int,
            shuffle: bool = True, augment: bool = False, drop_remainder: bool = True,
            process_index: int = 0, process_count: int = 1,
            padding: int = 4) -> Iterator[Dict[str, np.ndarray]]:
  """Iterates over one epoch of this process's share of each global batch.

  The epoch's example order is a permutation drawn from ``(seed, epoch)``
  (or the stored order when ``shuffle=False``). It is cut into global
  batches of ``batch_size`` examples; process ``p`` of ``P`` gets examples
  ``[p * batch_size / P, (p + 1) * batch_size / P)`` of each, so the
  processes' shares are disjoint and together form the global batch.

  With ``drop_remainder=False`` the last global batch may be smaller; it is
  split into ``P`` contiguous near-equal parts (which may differ in size by
  one, or be empty), so every process still yields the same number of
  batches, :func:`num_batches`.

  Args:
    dataset: The data to iterate over.
    batch_size: Global batch size; must be divisible by ``process_count``.
    seed: Non-negative seed of shuffling and augmentation.
    epoch: Non-negative epoch number; each epoch gets a fresh permutation.
    shuffle: Whether to permute the examples.
    augment: Whether to apply a random crop (after ``padding`` pixels of
        zero padding) and a random horizontal flip; drawn per global batch
        from ``(seed, epoch, step)``.
    drop_remainder: Whether to drop the last incomplete global batch.
    process_index: Index of this process, in ``[0, process_count)``.
    process_count: Number of processes sharing each global batch.
    padding: Zero padding of the random crop, in pixels.

  Yields:
    Dicts with ``"image"``: ``float32`` ``(b, H, W, C)`` and ``"label"``:
    ``int32`` ``(b,)``, where ``b = batch_size // process_count`` (except
    possibly for the last batch when ``drop_remainder=False``). The arrays
    are fresh copies.

  Raises:
    ValueError: If ``batch_size`` is not divisible by ``process_count`` or
        an argument is out of range.
  """
  seed = _non_negative_int(seed, "seed")
  epoch = _non_negative_int(epoch, "epoch")
  batch_size = operator.index(batch_size)
  process_count = operator.index(process_count)
  process_index = operator.index(process_index)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if process_count < 1:
    raise ValueError(f"process_count must be positive, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  if batch_size % process_count:
    raise ValueError(
        f"The global batch_size ({batch_size}) must be divisible by process_count "
        f"({process_count}) so that every process gets an equal share; use a multiple "
        f"of {process_count}.")
  padding = _non_negative_int(padding, "padding")

  n = len(dataset)
  order = (np.random.default_rng([seed, epoch, _SHUFFLE_STREAM]).permutation(n)
           if shuffle else None)
  for step in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
    start = step * batch_size
    size = min(batch_size, n - start)           # < batch_size only for the last batch.
    lo = process_index * size // process_count  # == process_index * local size
    hi = (process_index + 1) * size // process_count
    if order is None:
      images = dataset.images[start + lo:start + hi].copy()
      labels = dataset.labels[start + lo:start + hi].copy()
    else:
      idx = order[start + lo:start + hi]
      images = dataset.images[idx]
      labels = dataset.labels[idx]
    if augment:
      offsets, flips = augmentation_params(size, seed=seed, epoch=epoch, step=step,
                                           padding=padding)
      images = crop_and_flip(images, offsets[lo:hi], flips[lo:hi], padding=padding)
    yield {"image": images, "label": labels}
