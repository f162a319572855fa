"""Options declared once: config dataclass fields carry their help and choices, and every CLI
subcommand is generated from its config.

A field made with ``option(default, help, ...)`` becomes ``--field-name``; a field without a
default becomes a required option. Types come from the annotations: ``bool`` fields are flags
(``--no-x`` when the default is true), ``tuple``/``Sequence`` fields take comma-separated values,
``X | None`` takes an ``X``. Defaults live on the dataclass and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Common", "Photos", "add_options", "from_args", "option", "shared_data_root"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices: Iterable | Callable[[], Iterable] | None = None,
           parse: Callable[[str], Any] | None = None, nargs: str | None = None, cli: bool = True) -> Any:
    """A config field with its command-line help. ``choices`` may be a callable, read when the
    parser is built (registries fill up at import); ``parse`` overrides the type's parser;
    ``cli=False`` keeps a field off the command line (programmatic use only)."""
    metadata = {"help": help, "choices": choices, "parse": parse, "nargs": nargs, "cli": cli}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Common:
    """Options every command takes."""

    seed: int = option(0, "seed of every random choice (groups, splits, sampling)")
    device: str = option("auto", "where models run: auto takes a GPU when one is visible",
                         choices=("auto", "cpu", "cuda"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Photos:
    """The labelled photos a command trains, calibrates, compresses, evaluates or builds buckets from:
    a manifest, folders of positives and negatives, or else Caltech-101 (``revolver`` positive).
    ``ngt_ray.training.labelled.labelled_photos`` reads them, split once and for all."""

    manifest: str | None = option(None, "CSV or Parquet of uri,label[,source,split] (a path or any fsspec URL): the "
                                        "labelled photos, instead of Caltech-101")
    positives: tuple[str, ...] = option((), "folders or URLs of photos of the class (with --negatives, instead of "
                                            "Caltech-101)", nargs="+")
    negatives: tuple[str, ...] = option((), "folders or URLs of photos without it", nargs="+")
    data: Path | None = option(None, "Caltech-101 folder holding train/, read without --manifest and --positives "
                                     "(default: $NGT_RAY_DATA/caltech101 or ../shared/data/caltech101)")
    s3_endpoint: str | None = option(None, "S3 endpoint URL for s3:// photos (default: $AWS_ENDPOINT_URL or AWS)")

    @property
    def caltech(self) -> Path:
        """The Caltech-101 folder: ``--data`` or the shared default."""
        if self.data is not None:
            return Path(self.data)
        return shared_data_root() / "caltech101"

    @property
    def photos(self) -> Photos:
        """These photo options alone, apart from the command's others."""
        return Photos(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Photos)})


def shared_data_root() -> Path:
    """``$NGT_RAY_DATA`` or ``../shared/data`` beside the project checkout."""
    env = os.environ.get("NGT_RAY_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _strip_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _parser_for(tp: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(parse one value, is a comma-separated sequence) for a field's type."""
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else str
        return item, True
    if tp in (int, float, str, Path):
        return tp, False
    return None, False


def _split(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(value: str) -> tuple:
        try:
            return tuple(item(v) for v in value.split(",") if v)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {value!r}: {exc}") from None
    return parse


def add_options(parser: argparse.ArgumentParser, config: type, *, skip: Iterable[str] = ()) -> None:
    """Add one option per field of ``config`` (a dataclass) to ``parser``."""
    hints = typing.get_type_hints(config)
    skip = set(skip)
    for f in dataclasses.fields(config):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        help_text = meta.get("help", "")
        tp = _strip_optional(hints[f.name])
        if tp is bool:
            if default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help=f"turn off (on by default): {help_text}")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        choices = meta.get("choices")
        choices = list(choices() if callable(choices) else choices) if choices is not None else None
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if meta.get("nargs"):
            item, _ = _parser_for(hints[f.name])
            kwargs.update(nargs=meta["nargs"], type=meta.get("parse") or item)
        else:
            item, sequence = _parser_for(hints[f.name])
            kwargs["type"] = meta.get("parse") or (_split(item) if sequence else item)
        if choices is not None:
            kwargs["choices"] = choices
        if default is _MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default is not None and help_text:
                shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else default
                kwargs["help"] = f"{help_text} (default: {shown})"
        parser.add_argument(flag, **kwargs)


def from_args(config: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The ``config`` the parsed ``args`` describe (fields the parser does not know keep their
    defaults; ``overrides`` win)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**{**values, **overrides})
