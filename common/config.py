"""One configuration mechanism for every method: a dataclass whose fields carry default, help and choices.

From the dataclass, `build_parser` generates the argparse flags (`win_size` -> `--win-size`, help with the default
shown, choices checked), `resolve_config` merges dataclass defaults <- YAML file <- flags and checks required
options, and `check_choices` validates a config built in Python (e.g. from a YAML file or an API call). No default
is written anywhere else: help strings show the field's own default.

Switches are 0/1 integers (`choices=(0, 1)`) and take the same three spellings everywhere: `--vis`, `--vis 1`,
`--vis 0`. A field may add old spellings (`aliases=("--data-root",)`) and an "off" flag (`off_flag="--quiet"` sets
the switch to 0), so renamed flags keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

from common.utils import UserError

_ARGPARSE_KEYS = ("choices", "nargs", "const", "metavar")


def option(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field carrying its CLI help and optional `choices`, `nargs`, `required`, `aliases`, `off_flag`."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _arg_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if text.startswith(name) or text.startswith(f"list[{name}"):
            return kind
    return str


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_switch(f: dataclasses.Field) -> bool:
    return tuple(f.metadata.get("choices") or ()) == (0, 1) and _arg_type(f) is int


def build_parser(
    cls: type, prog: str, description: str, default_config: str | Path | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; unspecified flags are left out of the namespace.

    `default_config`: the YAML file read when `--config` is not given ("": none; None: no `--config` flag at all).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if default_config is not None:
        parser.add_argument(
            "--config",
            default=str(default_config),
            help="YAML file of defaults (flags override it; it overrides the built-in defaults)",
        )
    return add_fields(parser, cls)


def add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Sequence[str] | None = None,
    defaults: dict | None = None,
    helps: dict | None = None,
) -> argparse.ArgumentParser:
    """Add the flags of `cls`'s fields (all, or those in `names`) to `parser`; unspecified flags stay unset.

    `defaults` changes the default a command applies (shown in the help; the command must apply it, e.g. by
    building `cls(**{**defaults, **flags})`); `helps` replaces a field's help text for this command.
    """
    defaults, helps = defaults or {}, helps or {}
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        meta = dict(f.metadata)
        required = meta.pop("required", False) and f.name not in defaults and f.name not in helps
        shown = "required" if required else f"default: {defaults.get(f.name, field_default(f))}"
        text = meta.pop("help")
        help_text = (helps[f.name] if f.name in helps else f"{text} ({shown})").replace("%", "%%")
        flags = [_flag(f.name), *meta.pop("aliases", ())]
        off_flag = meta.pop("off_flag", None)
        kwargs = {key: meta.pop(key) for key in _ARGPARSE_KEYS if key in meta}
        if meta:
            raise TypeError(f"{cls.__name__}.{f.name}: unknown option metadata {sorted(meta)}")
        if is_switch(f):
            kwargs.setdefault("nargs", "?")
            kwargs.setdefault("const", 1)
        parser.add_argument(*flags, dest=f.name, type=_arg_type(f), default=argparse.SUPPRESS, help=help_text,
                            **kwargs)  # fmt: skip
        if off_flag:
            parser.add_argument(off_flag, dest=f.name, action="store_const", const=0, default=argparse.SUPPRESS,
                                help=f"the same as {_flag(f.name)} 0")  # fmt: skip
    return parser


def read_yaml(path: Path, cls: type, explicit: bool) -> dict:
    """The options of a YAML file (a mapping); a missing default file is `{}`, a missing explicit one an error."""
    import yaml

    if not path.is_file():
        if explicit:
            raise UserError(f"config file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return data


def check_choices(cfg: Any) -> None:
    """UserError naming the flag when a field's value is not one of its declared choices."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is None or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in choices]
        if bad:
            raise UserError(f"{_flag(f.name)} must be one of {', '.join(map(str, choices))} (got {bad[0]!r})")


def resolve_config(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse argv and merge dataclass defaults <- YAML <- flags. Missing required options are a UserError."""
    args = vars(parser.parse_args(argv))
    values = dict(args)
    if "config" in args and not any(f.name == "config" for f in dataclasses.fields(cls)):
        given = values.pop("config")
        if given:
            explicit = given != parser.get_default("config")
            values = {**read_yaml(Path(given), cls, explicit), **values}
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise UserError(f"bad configuration: {exc}") from exc
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(cfg, f.name) in ("", 0, None) and f.name not in values:
            raise UserError(f"missing required option {_flag(f.name)}")
    check_choices(cfg)
    return cfg
