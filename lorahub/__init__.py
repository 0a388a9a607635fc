"""lorahub: gradient-free composition of LoRA modules (LoraHub, arXiv 2307.13269), batched and exportable."""

from .errors import LorahubError, LorahubFileError, LorahubIntegrityError, LorahubValueError

__version__ = "0.1.0"

__all__ = [
    "LorahubError",
    "LorahubFileError",
    "LorahubIntegrityError",
    "LorahubValueError",
    "__version__",
]
