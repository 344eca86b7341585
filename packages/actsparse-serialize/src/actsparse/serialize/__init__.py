"""actsparse.serialize: state-dict conversion (and file formats), as a plugin."""

from __future__ import annotations

from actsparse.serialize._masks import dense_masks, from_sparse_coo, sparse_coo_masks, to_sparse_coo
from actsparse.serialize._state import STATE_KEYS, from_torch_ao, to_torch_ao

__version__ = "0.1.0"

__all__ = [
    "STATE_KEYS",
    "__version__",
    "dense_masks",
    "from_sparse_coo",
    "from_torch_ao",
    "sparse_coo_masks",
    "to_sparse_coo",
    "to_torch_ao",
]
