"""``lorahub`` command line: flags/YAML -> config dataclasses -> one library call per command. No math here.

One module per command group (:mod:`.compose`: compose, merge; :mod:`.modules`; :mod:`.hub`; :mod:`.train`;
:mod:`.bbh`), all built by :mod:`.flags`. Errors follow one policy: a :class:`~lorahub.errors.LorahubError`
prints ``lorahub: error: ...`` on stderr and exits with status 2 (argparse's own usage errors exit 2 too).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from ..errors import LorahubError
from . import bbh, compose, hub, modules, train
from .flags import read_configs

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorahub", description="Gradient-free composition of LoRA modules (LoraHub).")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (compose, modules, hub, train, bbh):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorahub ARGS``; returns the exit status (0, 1 for a failed check, 2 for an error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        configs = read_configs(args)
        return int(args.run(*configs, command="lorahub " + shlex.join(argv)) or 0)
    except LorahubError as e:
        print(f"lorahub: error: {e}", file=sys.stderr)
        return 2
