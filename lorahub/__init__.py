"""lorahub: gradient-free composition of LoRA modules (LoraHub, arXiv 2307.13269), batched and exportable."""

from .api import Composition, compose, from_weights
from .errors import LorahubError, LorahubFileError, LorahubIntegrityError, LorahubValueError
from .store import ModuleStore
from .version import __version__

__all__ = [
    "Composition",
    "ModuleStore",
    "compose",
    "from_weights",
    "LorahubError",
    "LorahubFileError",
    "LorahubIntegrityError",
    "LorahubValueError",
    "__version__",
]
