"""reddino's data layer: RBC image rows in sharded Parquet with a manifest.

- :mod:`~reddino.data.schema`: the row schema (``RBC_SCHEMA``) and ``validate_table``.
- :mod:`~reddino.data.shards`: atomic shard + ``_manifest.json`` writing/reading.
- :mod:`~reddino.data.ingest`: folder / Chula RBC-12 / Pascal VOC → cells or smear patches.
- :mod:`~reddino.data.synth`: procedural synthetic RBCs for demos and tests.
- :mod:`~reddino.data.stream`: Ray Data streaming with filters and source weighting; ``load_table``.
"""

from reddino.data.images import ImageDecodeError, decode_image
from reddino.data.ingest import CHULA_CLASSES, IngestError, ingest
from reddino.data.schema import RBC_SCHEMA, SCHEMA_VERSION, SchemaError, validate_table
from reddino.data.shards import (
    DatasetExistsError,
    Manifest,
    ManifestError,
    manifest_hash,
    read_manifest,
    write_dataset,
)
from reddino.data.stream import load_table, read_rbc_dataset
from reddino.data.synth import SYNTH_CLASSES, generate_synthetic

__all__ = [
    "RBC_SCHEMA",
    "SCHEMA_VERSION",
    "SchemaError",
    "validate_table",
    "Manifest",
    "ManifestError",
    "DatasetExistsError",
    "write_dataset",
    "read_manifest",
    "manifest_hash",
    "ingest",
    "IngestError",
    "CHULA_CLASSES",
    "generate_synthetic",
    "SYNTH_CLASSES",
    "read_rbc_dataset",
    "load_table",
    "decode_image",
    "ImageDecodeError",
]
