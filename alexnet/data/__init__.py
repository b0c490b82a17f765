"""The data plane without Ray, as small stages with one owner each (webdataset's style).

* :mod:`alexnet.data.records`: a shard's records as untrusted input (plain tar only, member size cap,
  header checks, lost records counted);
* :mod:`alexnet.data.codec`: a record -> a sample -> a batch: worker pixels (decode, crop, flip,
  lighting) or JPEG bytes with the same draws for the device (:mod:`alexnet.data.encoded`);
* :mod:`alexnet.data.batch`: the typed batches (a replica's rows, labels only, pixels on a device);
* :mod:`alexnet.data.reader`: the epoch's plan as virtual streams, ``Stream`` (resumable);
* :mod:`alexnet.data.val`: a validation pass's plan and batches (runs and ``alexnet eval`` alike);
* :mod:`alexnet.data.index`: ``DatasetIndex.load(url)`` (classes, shard counts, mean, RGB PCA);
* :mod:`alexnet.data.transforms`: the paper's crop/flip/lighting draws, 10-crop, ``to_model_input``;
* :mod:`alexnet.data.writer`, :mod:`alexnet.data.sources`, :mod:`alexnet.data.imagenet`: ``alexnet
  shards`` (ImageFolder or ImageNet as downloaded -> WebDataset shards).

``cluster/data.py`` and ``cluster/val.py`` serve these from Ray actors.
"""
