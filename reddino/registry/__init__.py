"""MLflow model registry for reddino backbones and probes.

Backbones are registered as pyfunc models that turn images into embeddings (and carry the exported
timm weights as an artifact); probes are sklearn models tagged with the backbone version they need.
Users pull `models:/<name>@<alias>`; the `candidate` alias is set on register and `champion` moves only
when a candidate beats both its random-init baseline (same architecture, same evaluation) and the current
champion on a named evaluation metric.
"""

from reddino.registry.core import (
    BackboneEmbedder,
    list_models,
    load_backbone,
    promote,
    pull,
    register_backbone,
    register_probe,
)

__all__ = ["BackboneEmbedder", "list_models", "load_backbone", "promote", "pull", "register_backbone", "register_probe"]
