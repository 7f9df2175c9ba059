"""AppArgs: the Serve app's ``args`` (serve YAML ``args:``, or the ``serve`` command), validated by pydantic.

The model is generated, not written: one field per option of
``config_fields.options(EngineConfig)`` (every engine option, offload, KV
tiers and KV compression included) and of ``options(ServeOptions)`` (the
serving options), with the dataclass default, help as the description and the
registry's names as a ``Literal`` where the option has choices. ``extra="forbid"``
rejects an unknown key, naming it. After the types, the values build the
EngineConfig and ServeOptions, whose ``__post_init__`` checks the ranges; an
InvalidParameterError there becomes a ValidationError naming the field.
A tuple option (``kv_tiers``) takes a YAML list or a ``"dram,disk"`` string.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from tierserve.config import EngineConfig
from tierserve.config_fields import Option, build_config, options, split_commas
from tierserve.errors import InvalidParameterError
from tierserve.server.serve_options import ServeOptions


def _split(value: Any) -> Any:
    return split_commas(value) if isinstance(value, str) else value


class _AppArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())  # "model" and any "model_*" option

    def engine_config(self) -> EngineConfig:
        return build_config(EngineConfig, {o.name: getattr(self, o.name) for o in options(EngineConfig)})

    def serve_options(self) -> ServeOptions:
        return build_config(ServeOptions, {o.name: getattr(self, o.name) for o in options(ServeOptions)})

    @model_validator(mode="after")
    def _build_configs(self):
        try:
            self.engine_config()
            self.serve_options()
        except InvalidParameterError as exc:
            raise ValueError(str(exc)) from exc
        return self


def _annotation(opt: Option) -> Any:
    choices = opt.choices()
    item: Any = str if opt.kind is tuple else opt.kind
    if choices is not None:
        item = Literal[choices]
    ann: Any = tuple[item, ...] if opt.kind is tuple else item
    if opt.optional:
        ann = Optional[ann]  # noqa: UP007 - built at run time from a type object
    return Annotated[ann, BeforeValidator(_split)] if opt.kind is tuple else ann


def app_args_model() -> type[BaseModel]:
    """The pydantic model of every engine and serving option (names must not collide)."""
    opts = (*options(EngineConfig), *options(ServeOptions))
    fields: dict[str, Any] = {}
    for o in opts:
        if o.name in fields:
            raise TypeError(f"option {o.name!r} is both an engine and a serving option")
        fields[o.name] = (_annotation(o), Field(o.default, description=o.help))
    return create_model("AppArgs", __base__=_AppArgsBase, **fields)


AppArgs = app_args_model()
