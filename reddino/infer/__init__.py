"""Using a trained backbone: embed a dataset (Ray Data batch inference), fit and register a probe on frozen
features, classify cells and summarise morphology per smear and source.

* :mod:`~reddino.infer.embed` - ``reddino embed``: Parquet shards of embeddings + manifest, resumable.
* :mod:`~reddino.infer.probe` - ``reddino probe fit``: k-fold scored probe, saved and registered.
* :mod:`~reddino.infer.classify` - ``reddino classify``: per-cell predictions, per-smear/source fractions.
"""
