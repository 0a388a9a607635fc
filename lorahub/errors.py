"""Exception types. Every error lorahub raises on bad input is a ``LorahubError``.

Messages name the culprit (file, module, tensor, argument), what was expected and what was found,
and, where there is one, the fix.
"""

from __future__ import annotations


class LorahubError(Exception):
    """Base class of every error lorahub raises on purpose."""


class LorahubValueError(ValueError, LorahubError):
    """An argument, example, module or file has a value lorahub cannot use."""


class LorahubFileError(FileNotFoundError, LorahubError):
    """A file or model that lorahub needs cannot be found (locally or, offline, on the hub)."""


class LorahubIntegrityError(LorahubError):
    """A file's content does not match what its manifest promises (sha256, shapes)."""


class LorahubBusyError(LorahubError):
    """Another process is writing the same output (it holds the output's lock): one writer per folder."""


# Why a MixLoRA folder is refused wherever a plain (mergeable) LoRA is needed: the store, export, compose.
NOT_MERGEABLE = (
    "is a MixLoRA model: its router picks experts per token, so the update depends on the input and "
    "cannot be folded into fixed weights (no static composition, no --merged export). Run it with "
    "lorahub.mixlora.predict_mixlora or `lorahub bbh --adapter DIR`"
)
