"""actsparse.serialize: state files and state-dict conversion, as serializer plugins.

``save(sparsifier, path)`` writes a state file, ``load(path)`` reads one back
into a state dict for ``ActivationSparsifier.load_state_dict``. See
docs/formats.md for the formats.
"""

from __future__ import annotations

import importlib.metadata

from actsparse.serialize._files import DEFAULT_FORMAT, detect_format, load, load_into, save
from actsparse.serialize._formats import FORMAT_VERSION
from actsparse.serialize._limits import DEFAULT_MAX_ELEMENTS, MAX_ELEMENTS_ENV_VAR
from actsparse.serialize._masks import dense_masks, from_sparse_coo, sparse_coo_masks, to_sparse_coo
from actsparse.serialize._safetensors import MAX_HEADER_BYTES
from actsparse.serialize._state import STATE_KEYS, from_torch_ao, to_torch_ao

__version__ = importlib.metadata.version("actsparse-serialize")

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_MAX_ELEMENTS",
    "FORMAT_VERSION",
    "MAX_ELEMENTS_ENV_VAR",
    "MAX_HEADER_BYTES",
    "STATE_KEYS",
    "__version__",
    "dense_masks",
    "detect_format",
    "from_sparse_coo",
    "from_torch_ao",
    "load",
    "load_into",
    "save",
    "sparse_coo_masks",
    "to_sparse_coo",
    "to_torch_ao",
]
