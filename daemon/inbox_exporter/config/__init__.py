"""The configuration file: load it, or fail with one line naming the path.

Three modules, one job each:
- `schema`: the shape of the file (strict pydantic models, value checks, built-in defaults);
- `resolve`: from the validated file to one immutable `Inbox` per entry (defaults, presets,
  secrets from environment variables and files, cross-field rules);
- `alerting`: the alerting section, resolved.
This module reads the YAML and turns pydantic's errors into a `ConfigError` with the path a user
can find in their file (`inboxes[sales].smtp.port: must be 1-65535`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from .alerting import Alerting, no_alerting, resolve_alerting
from .resolve import Delivery, Inbox, OAuth2, resolve_inboxes
from .schema import (
    DEADLINE_STEPS,
    DEFAULT_INTERVAL,
    DEFAULT_TIMEOUT,
    ChecksModel,
    ConfigError,
    ConfigModel,
    MetricsModel,
    WebModel,
    parse_duration,
)

__all__ = [
    "DEADLINE_STEPS",
    "DEFAULT_INTERVAL",
    "DEFAULT_TIMEOUT",
    "Alerting",
    "Config",
    "ConfigError",
    "Delivery",
    "Inbox",
    "OAuth2",
    "load_config",
    "model_error",
    "parse_config",
    "parse_duration",
    "read_text",
    "yaml_error",
]


@dataclass(frozen=True)
class Config:
    inboxes: tuple[Inbox, ...]
    source: str
    checks: ChecksModel = field(default_factory=ChecksModel)
    metrics: MetricsModel = field(default_factory=MetricsModel)
    alerting: Alerting = field(default_factory=no_alerting)
    probe_key: SecretStr | None = None  # from checks.probe_key_env
    web: WebModel = field(default_factory=WebModel)

    def inbox(self, name: str) -> Inbox:
        for i in self.inboxes:
            if i.name == name:
                return i
        raise KeyError(name)


# libyaml's parser when PyYAML has it: the pure-Python one takes seconds and ~150 MB of
# transient memory for a 10,000-inbox file.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[misc,valid-type]  # a base chosen at import
    """A YAML loader that rejects a key given twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str, environ: Mapping[str, str] | None = None,
                strict_secrets: bool = True) -> Config:
    """Read and validate a config file; raise ConfigError (one line) on any problem.

    `strict_secrets=False` tolerates a refresh token that does not exist yet (`oauth login`
    is about to create it)."""
    return parse_config(read_text(path), path, os.environ if environ is None else environ,
                        strict_secrets)


def read_text(path: str) -> str:
    """A config file's text; ConfigError (one line) when it cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", path) from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError("", f"line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}): "
                          "save the file as UTF-8", path) from None


def yaml_error(e: yaml.YAMLError, source: str) -> ConfigError:
    """PyYAML's error as one line: where, and what."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ConfigError("", f"{where}invalid YAML: {problem}", source)


def parse_config(text: str, source: str, environ: Mapping[str, str],
                 strict_secrets: bool = True) -> Config:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "must be a mapping with `inboxes:`", source)
    try:
        model = ConfigModel.model_validate(data)
    except ValidationError as e:
        raise model_error(e, data, source) from None
    probe_key = None
    if model.checks.probe_key_env is not None:
        if model.checks.probe_key_file is not None:
            raise ConfigError("checks.probe_key_env", "set at most one of probe_key_env, "
                              "probe_key_file", source)
        value = environ.get(model.checks.probe_key_env)
        if not value:
            raise ConfigError("checks.probe_key_env", f"environment variable "
                              f"{model.checks.probe_key_env} is not set", source)
        probe_key = SecretStr(value)
    return Config(resolve_inboxes(model, source, environ, strict_secrets), source, model.checks,
                  model.metrics, resolve_alerting(model.alerting, source, environ), probe_key,
                  model.web)


def model_error(exc: ValidationError, data: dict, source: str) -> ConfigError:
    """pydantic's first error as a one-line ConfigError naming the path in the file."""
    errors = exc.errors()
    err = errors[0]
    path = _render_path(err["loc"], data)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(path, _message(err) + more, source)


def _render_path(loc: tuple, data: Any) -> str:
    """('inboxes', 0, 'smtp', 'port') -> 'inboxes[sales].smtp.port' (the inbox's name if it has one)."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            label = part
            if isinstance(node, list) and part < len(node):
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label = node["name"]
            out += f"[{label}]"
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue  # pydantic's internal validator names
        else:
            node = node.get(part) if isinstance(node, dict) else None
            out += f".{part}" if out else str(part)
    return out


_TYPE_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "literal_error":
        return f"must be one of {err['ctx']['expected'].replace(chr(39), '')}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return _TYPE_MESSAGES.get(kind, err["msg"])
