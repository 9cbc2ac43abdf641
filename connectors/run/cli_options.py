"""`convoflow run`'s command-line options, made from `RunSettings`' fields: one declaration of every
setting serves the command line, the config file and the environment."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
import typer
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from rich.markup import escape

from connectors.run.settings import RunSettings, cli_of

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", dir_okay=False, help="TOML file of run options; CONVOFLOW_* variables and options given here override it."),
]


def settings_command(body: Callable[[Path | None, dict[str, Any]], None]) -> Callable[..., None]:
    """A typer command with `--config FILE` and an option per setting, each defaulting to "not given":
    it calls `body(config, given)` with only the options on the command line (or in their envvar)."""

    def command(**values: Any) -> None:
        config = values.pop("config")
        body(config, {name: value for name, value in values.items() if value is not None and value != []})

    parameters = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOption)]
    for name, field in RunSettings.model_fields.items():
        annotation = Annotated[_cli_type(field.annotation) | None, _option(name, field)]  # type: ignore[valid-type]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = body.__doc__
    command.__name__ = body.__name__
    return command


def _cli_type(annotation: Any) -> Any:
    """The type typer parses an option as: the setting's, less None; a secret as plain text."""
    kinds = [k for k in get_args(annotation) if k is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]
    kind = kinds[0]
    return str if kind is SecretStr else kind


def _option(name: str, field: FieldInfo) -> Any:
    cli = cli_of(name)
    limits: dict[str, Any] = {}
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            limits["min"] = rule.ge
        elif isinstance(rule, annotated_types.Le):
            limits["max"] = rule.le
    if cli.exists:
        limits.update(exists=True, dir_okay=False)
    default = field.default
    text = escape(field.description or "")
    if default is not None and default != [] and not isinstance(default, bool):
        text += escape(f" [default: {getattr(default, 'value', default)}]")
    return typer.Option(
        *cli.flags, help=text, rich_help_panel=cli.panel, hidden=cli.hidden, show_default=False, **limits,
    )
