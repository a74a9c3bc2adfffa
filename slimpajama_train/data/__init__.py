"""Training data: the global sample order (``order``), the dataset over the shards (``dataset``),
the loaders of each rank's micro-batches (``loader``) and their worker processes (``workers``)."""
