"""dalle-data: reproducible WebDataset shards and lineage-named DALLE-pytorch checkpoints."""

__version__ = "0.1.0"
