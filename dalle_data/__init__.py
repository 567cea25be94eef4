"""dalle-data: reproducible WebDataset shards and lineage-named DALLE-pytorch checkpoints."""

from dalle_data import compat as _compat  # noqa: F401  (dependency shims, before anything else)

__version__ = "0.1.0"
