"""The data pipeline without Ray: shard writer, ``dataset.json`` index, transforms, deterministic readers.

* :mod:`alexnet.data.writer`: ``build_shards`` (ImageFolder -> WebDataset shards), ``build_synthetic``;
* :mod:`alexnet.data.sources`, :mod:`alexnet.data.imagenet`: what SRC may hold (ImageNet as downloaded);
* :mod:`alexnet.data.index`: ``DatasetIndex.load(url)`` (classes, shard counts, mean, RGB PCA);
* :mod:`alexnet.data.transforms`: the paper's crop/flip/lighting draws, 10-crop, ``to_model_input``;
* :mod:`alexnet.data.reader`: ``ReaderSpec``, ``Stream`` (the epoch as virtual streams), ``val_batches``.
* :mod:`alexnet.data.encoded`: JPEG bytes + drawn crops per batch, batched decode on the trainer's device.

``cluster/data.py`` runs the readers in Ray actors.
"""

from alexnet.data.index import DatasetIndex
from alexnet.data.reader import (
    ReaderSpec,
    ReaderStats,
    Stream,
    epoch_batches,
    steps_per_epoch,
    val_batches,
)
from alexnet.data.transforms import to_model_input

__all__ = [
    "DatasetIndex",
    "ReaderSpec",
    "ReaderStats",
    "Stream",
    "epoch_batches",
    "steps_per_epoch",
    "to_model_input",
    "val_batches",
]
