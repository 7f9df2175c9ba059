"""Flat options derived from config dataclasses: the one source of CLI flags, Serve YAML keys and kwargs.

Every leaf field of a config dataclass (``EngineConfig`` and the sub-config
dataclasses it nests, or any other frozen dataclass such as the server's
``ServeOptions``) is one :class:`Option`. ``options(cls)`` walks the fields in
declaration order and derives, without any hand-written list:

* ``name`` (Serve YAML key, ``build_engine_config`` kwarg, argparse dest): the
  prefix of the sub-config holding the field (metadata ``"prefix"`` on the
  parent's field, e.g. ``"kv_"`` on ``EngineConfig.kv_tiers``; ``""`` when
  absent) followed by the field name, unless the field's metadata ``"name"``
  overrides it (``KVCompressionConfig.method`` -> ``kv_compression``);
* ``flag``: ``"--"`` + (metadata ``"flag"`` or ``name``) with ``_`` -> ``-``;
  a bool field becomes a ``--flag / --no-flag`` pair;
* ``help``: metadata ``"help"`` (required: a field without it is an error);
* ``choices``: metadata ``"choices"``, a tuple or a zero-argument callable
  returning one (registries that import torch are read only when
  ``Option.choices()`` is called, i.e. when a parser or model is built);
* ``annotation`` / ``kind`` / ``optional`` / ``default``: from the type hint
  (``int``, ``float``, ``str``, ``bool``, ``tuple[str, ...]``, each optionally
  ``| None``; anything else is an error) and the field default;
* ``path``: the field names from the root to the leaf,
  e.g. ``("offload", "spare_slots")``.

Names must be unique over the whole tree (checked). ``build_config(cls,
values)`` is the reverse mapping: flat ``{name: value}`` -> the nested frozen
dataclasses, whose ``__post_init__`` validates (InvalidParameterError naming
the field); an unknown name raises InvalidParameterError naming it.
``add_arguments(parser, opts)`` and ``namespace_values(ns, opts)`` are the
argparse side; the pydantic side lives at the YAML edge (server/app_args.py).
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from tierserve.errors import InvalidParameterError

_SCALARS = (int, float, str, bool)


def option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field carrying its option metadata: ``help`` and optional ``name``/``flag``/``choices``."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class Option:
    name: str
    flag: str
    path: tuple[str, ...]
    annotation: Any
    kind: type  # int, float, str, bool or tuple (a tuple of str)
    optional: bool
    default: Any
    help: str
    choices_source: tuple[str, ...] | Callable[[], Sequence[str]] | None = None

    def choices(self) -> tuple[str, ...] | None:
        """The allowed values (per item for a tuple option), read from the registry now; None: any."""
        src = self.choices_source
        return None if src is None else tuple(src() if callable(src) else src)

    def coerce(self, value: Any) -> Any:
        """A tuple option also takes ``"a,b"`` (CLI, YAML, kwargs); other values pass unchanged."""
        if self.kind is tuple and isinstance(value, str):
            return split_commas(value)
        if self.kind is tuple and value is not None:
            return tuple(value)
        return value


def split_commas(text: str) -> tuple[str, ...]:
    """``"dram, disk"`` -> ``("dram", "disk")``; ``""`` -> ``()``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _classify(hint: Any, where: str) -> tuple[type, bool]:
    """``(kind, optional)`` of a supported field type hint."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{where}: unsupported option type {hint!r}")
        hint, optional = args[0], True
    if hint in _SCALARS:
        return hint, optional
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, Ellipsis):
        return tuple, optional
    raise TypeError(f"{where}: unsupported option type {hint!r} (int, float, str, bool, tuple[str, ...])")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{f.name}: an option needs a default")


def _walk(cls: type, prefix: str, path: tuple[str, ...]) -> Iterator[Option]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint, where = hints[f.name], ".".join((cls.__name__, f.name))
        if dataclasses.is_dataclass(hint):
            yield from _walk(hint, prefix + f.metadata.get("prefix", ""), path + (f.name,))
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{where}: an option needs metadata 'help'")
        kind, optional = _classify(hint, where)
        name = f.metadata.get("name", prefix + f.name)
        yield Option(name=name, flag="--" + f.metadata.get("flag", name).replace("_", "-"),
                     path=path + (f.name,), annotation=hint, kind=kind, optional=optional,
                     default=_default(f), help=f.metadata["help"], choices_source=f.metadata.get("choices"))


@cache
def options(cls: type) -> tuple[Option, ...]:
    """Every option of the config dataclass ``cls``, in field order; names and flags are unique."""
    opts = tuple(_walk(cls, "", ()))
    for attr in ("name", "flag"):
        seen: dict[str, Option] = {}
        for o in opts:
            other = seen.setdefault(getattr(o, attr), o)
            if other is not o:
                raise TypeError(f"{cls.__name__}: option {attr} {getattr(o, attr)!r} is used by both "
                                f"{'.'.join(other.path)} and {'.'.join(o.path)}")
    return opts


def build_config(cls: type, values: Mapping[str, Any]):
    """The ``cls`` instance of the flat option ``values``; options not given keep the dataclass defaults."""
    by_name = {o.name: o for o in options(cls)}
    tree: dict = {}
    for name, value in values.items():
        opt = by_name.get(name)
        if opt is None:
            raise InvalidParameterError(name, f"unknown option; known options: {', '.join(sorted(by_name))}")
        node = tree
        for part in opt.path[:-1]:
            node = node.setdefault(part, {})
        node[opt.path[-1]] = opt.coerce(value)
    return _construct(cls, tree, (), {o.path: o.name for o in by_name.values()})


def _construct(cls: type, tree: dict, path: tuple[str, ...], names: dict[tuple[str, ...], str]):
    """``cls(**tree)``, nested; an error naming a field of ``cls`` is re-raised under its option name."""
    hints = typing.get_type_hints(cls)
    kwargs = {k: _construct(hints[k], sub, path + (k,), names) if dataclasses.is_dataclass(hints[k]) else sub
              for k, sub in tree.items()}
    try:
        return cls(**kwargs)
    except InvalidParameterError as exc:
        name = names.get(path + (exc.field,), exc.field)
        if name == exc.field:
            raise
        raise InvalidParameterError(name, exc.detail) from exc


def flat_values(config: Any) -> dict[str, Any]:
    """The inverse of ``build_config``: ``{name: value}`` of every option of a config instance."""
    out = {}
    for o in options(type(config)):
        value = config
        for part in o.path:
            value = getattr(value, part)
        out[o.name] = value
    return out


# ---------------------------------------------------------------- argparse
def _tuple_type(opt: Option) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items, allowed = split_commas(text), opt.choices()
        bad = [t for t in items if allowed is not None and t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown item {bad[0]!r}; choose from {', '.join(allowed)}")
        return items
    parse.__name__ = "comma-separated list"
    return parse


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _help(opt: Option, choices: tuple[str, ...] | None) -> str:
    """The help, the choices, and the default unless the help already tells it (or it is None / empty)."""
    text = opt.help
    if choices is not None:
        text += f"; one of: {', '.join(choices)}" + (" (comma-separated)" if opt.kind is tuple else "")
    shown = ",".join(opt.default) if opt.kind is tuple else opt.default
    if "default" not in opt.help and shown not in ("", None):
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, opts: Sequence[Option]) -> None:
    """One argparse flag per option (dest = the option name), defaults and choices from the dataclasses."""
    for opt in opts:
        choices = opt.choices()
        kw: dict[str, Any] = dict(dest=opt.name, default=opt.default, help=_help(opt, choices))
        if opt.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif opt.kind is tuple:
            kw.update(type=_tuple_type(opt), metavar="A,B")
        else:
            kw.update(type=opt.kind, metavar=_METAVARS[opt.kind])
            if choices is not None:
                kw.update(choices=choices, metavar="{" + ",".join(choices) + "}" if len(choices) <= 4 else "NAME")
        parser.add_argument(opt.flag, **kw)


def namespace_values(ns: argparse.Namespace, opts: Sequence[Option]) -> dict[str, Any]:
    """``{name: value}`` of ``opts`` from parsed arguments."""
    return {o.name: getattr(ns, o.name) for o in opts}


def check_choice(field_name: str, value, allowed: tuple[str, ...]) -> None:
    """Raise InvalidParameterError naming ``field_name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise InvalidParameterError(field_name, f"must be one of {allowed}, got {value!r}")
