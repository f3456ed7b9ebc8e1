"""Using a trained backbone: embed a dataset (Ray Data batch inference), fit and register a probe on frozen
features, classify cells and summarise morphology per smear and source.

(``reddino embed`` itself is :func:`reddino.features.embedding.embed`: the store every consumer reads.)
* :mod:`~reddino.infer.probe` - ``reddino probe fit``: k-fold scored probe, saved and registered.
* :mod:`~reddino.infer.classify` - ``reddino classify``: per-cell predictions, per-smear/source fractions.
"""
