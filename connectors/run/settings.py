"""The settings of `convoflow run`: one model filled from the command line, `CONVOFLOW_*` variables
and a TOML file, in that order of precedence (pydantic-settings reads the variables and the file).

A TOML file holds any `run` option by its long name, dashes or underscores alike
(`window-size = 60`, `kafka_brokers = "127.0.0.1:9092"`); a relative path in it is taken from the
file's folder. A variable is `CONVOFLOW_` and the name in capitals (`CONVOFLOW_WINDOW_SIZE=60`);
lists are JSON (`CONVOFLOW_KAFKA_CONFIG='["acks=all"]'`). A bad value or an unknown key is a
`SettingsError` naming where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import TomlConfigSettingsSource

from connectors.kafka.outputs import OutputTopics
from dataflows.errors import ConvoflowError
from dataflows.parse import MAX_LINE_BYTES

ENV_PREFIX = "CONVOFLOW_"
DEFAULT_PATTERNS = Path(__file__).resolve().parents[2] / "samples" / "patterns.yaml"
SECRET_WORDS = ("password", "secret", "token", "key")
"""A `kafka_config` setting whose name holds one of these is shown redacted."""
REDACTED = "<redacted>"


class SettingsError(ConvoflowError):
    """A setting that cannot be used, named by where it came from."""


class LlmMode(StrEnum):
    off = "off"
    on = "on"
    auto = "auto"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


@dataclass(frozen=True)
class Cli:
    """How a setting appears as a `run` option: its flags (default `--name-with-dashes`), its help
    panel, whether a path must exist."""

    flags: tuple[str, ...] = ()
    panel: str | None = None
    exists: bool = False
    hidden: bool = False


def _help(text: str, default: Any = None, **limits: Any) -> Any:
    return Field(default, description=text, **limits)


class RunSettings(BaseSettings):
    """Every option of `convoflow run`, with its default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    input: Annotated[Path | None, Cli(flags=("--input",))] = _help(
        "JSONL file of events to replay (or read a topic: --kafka-brokers).")
    out_dir: Path | None = _help("Folder for JSONL outputs [default: out for a file; none when reading Kafka].")
    speed_factor: float = _help("Replay gaps between timestamps this many times faster; 0 = no waiting.", default=1.0, ge=0.0)
    window_size: float = _help("Tumbling window length in seconds.", default=30.0)
    max_out_of_orderness: float = _help("Watermark delay in seconds.", default=5.0)
    max_line_bytes: int = _help("Longest input line in bytes; a longer one goes to dead_letter unread.",
                                default=MAX_LINE_BYTES, ge=1)
    max_window_messages: int = _help(
        "Messages listed per window record (the earliest); the rest are counted in its overflow.", default=10_000, ge=1)
    max_open_windows: int = _help("Open windows per session; one more closes the session's oldest early.",
                                  default=1_000, ge=1)
    processes: int = _help("Local Bytewax processes forming one cluster.", default=1, ge=1)
    workers: int = _help("Worker threads in each process.", default=1, ge=1)
    addresses: Annotated[str | None, Cli(panel="Cluster")] = _help(
        "host:port of every process of a cluster across machines, comma-separated.")
    process_id: Annotated[int | None, Cli(panel="Cluster")] = _help("This process's index in --addresses.", ge=0)
    overwrite: bool = _help("Replace the outputs of an earlier run in --out-dir.", default=False)
    writer_threads: Annotated[bool, Cli(flags=("--writer-threads/--no-writer-threads",))] = _help(
        "Encode and write each JSONL output on a thread of its own while the worker goes on "
        "(off: encoded by the worker that makes them: one compute thread per process).", default=True)
    quiet: bool = _help("No live view; print only the summary.", default=False)
    log_format: LogFormat = _help("How the run's own log lines are written to stderr.", default=LogFormat.text)
    metrics_port: int | None = _help(
        "Serve Prometheus metrics on this port (127.0.0.1; process N of a local cluster on port + N).", ge=0, le=65535)
    metrics_host: str = _help("Address the metrics endpoint listens on.", default="127.0.0.1")
    patterns: Path = _help("YAML or JSON file of pattern definitions (alerts output).", default=DEFAULT_PATTERNS)
    no_patterns: Annotated[bool, Cli(flags=("--no-patterns",))] = _help("Detect no patterns.", default=False)
    lake: bool = _help("Also write every output to Iceberg tables (see --lake-dir).", default=False)
    lake_dir: Path | None = _help("Folder of the embedded Iceberg catalog and warehouse [default: OUT_DIR/lake].")
    catalog: Annotated[str | None, Cli(panel="Lake")] = _help("Write to this catalog of PyIceberg's configuration instead.")
    lake_commit_rows: Annotated[int, Cli(panel="Lake")] = _help("Rows per Iceberg commit.", default=50_000, ge=1)
    lake_commit_interval: Annotated[float, Cli(panel="Lake")] = _help("Seconds at most between commits.",
                                                                      default=30.0, ge=0.1)
    lake_keep_snapshots: Annotated[int, Cli(panel="Lake")] = _help("Snapshots kept when old ones are expired.",
                                                                   default=50, ge=1)
    profiles: Annotated[bool, Cli(panel="Lake")] = _help(
        "Attach each user's history from the lake to messages (user_context).", default=True)
    profiles_refresh: Annotated[float, Cli(panel="Lake")] = _help("Seconds between checks for new lake snapshots.",
                                                                  default=60.0, ge=0.0)
    profiles_as_of: Annotated[str | None, Cli(panel="Lake")] = _help("Read the history as of this time or snapshot id.")
    rules: Annotated[Path | None, Cli(exists=True)] = _help(
        "JSONL rules stream joined to every message (see `rules check`).")
    kafka_brokers: str | None = _help("Read --input-topic live from these Kafka brokers and write to topics.")
    input_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of input events.", default="websocket_fanout")
    output_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of accepted messages (chat envelope).",
                                                             default=OutputTopics.messages)
    windows_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of closed windows.", default=OutputTopics.windows)
    alerts_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of pattern alerts.", default=OutputTopics.alerts)
    late_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of late events.", default=OutputTopics.late)
    dead_letter_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of rejected input.",
                                                                  default=OutputTopics.dead_letter)
    moderated_topic: Annotated[str, Cli(panel="Kafka")] = _help("Topic of messages blocked by the rules.",
                                                                default=OutputTopics.moderated)
    rules_topic: Annotated[str, Cli(panel="Kafka")] = _help(
        "Topic of the rules stream, read from its beginning (ignored with --rules).", default="rules")
    rules_grace: Annotated[float, Cli(panel="Kafka")] = _help(
        "Seconds a live message waits for rules stamped before it.", default=1.0, ge=0.0)
    create_topics: Annotated[bool, Cli(panel="Kafka")] = _help(
        "Create missing topics (with the input topic's partition count).", default=False)
    kafka_config: Annotated[list[str], Cli(panel="Kafka")] = _help(
        "Any librdkafka setting as key=value (repeatable).", default=[])
    kafka_config_file: Annotated[Path | None, Cli(panel="Kafka", exists=True)] = _help(
        "A properties file of librdkafka settings (key=value lines).")
    from_beginning: Annotated[bool, Cli(flags=("--from-beginning/--from-latest",), panel="Kafka")] = _help(
        "Where to start reading the input topic; without recovery every run starts there.", default=True)
    stop_at_end: Annotated[bool, Cli(panel="Kafka")] = _help(
        "Stop at the input topic's current end instead of waiting.", default=False)
    llm: Annotated[LlmMode, Cli(panel="LLM")] = _help(
        "Window assistant and translation: auto = on when a key or base URL is set.", default=LlmMode.auto)
    llm_base_url: Annotated[str | None, Cli(panel="LLM")] = _help(
        "OpenAI-compatible endpoint (vLLM, Ollama, ...); also read from OPENAI_BASE_URL.",
        validation_alias=AliasChoices("llm_base_url", f"{ENV_PREFIX}LLM_BASE_URL", "OPENAI_BASE_URL"))
    llm_model: Annotated[str, Cli(panel="LLM")] = _help("Model name.", default="gpt-4o-mini")
    llm_api_key: Annotated[SecretStr | None, Cli(panel="LLM")] = _help(
        "API key (never printed); also read from OPENAI_API_KEY.",
        validation_alias=AliasChoices("llm_api_key", f"{ENV_PREFIX}LLM_API_KEY", "OPENAI_API_KEY"))
    llm_concurrency: Annotated[int, Cli(panel="LLM")] = _help("Calls in flight per worker.", default=16, ge=1)
    llm_timeout: Annotated[float, Cli(panel="LLM")] = _help("Seconds per HTTP attempt.", default=30.0, ge=0.1)
    llm_max_retries: Annotated[int, Cli(panel="LLM")] = _help("Retries of 429/5xx/timeouts.", default=2, ge=0)
    llm_rate_limit: Annotated[float | None, Cli(panel="LLM")] = _help(
        "Requests per second per worker (default: unpaced).", ge=0.01)
    recovery_dir: Annotated[Path | None, Cli(panel="Recovery")] = _help(
        "Snapshot state here; the same command resumes after a crash.")
    snapshot_interval: Annotated[float, Cli(panel="Recovery")] = _help(
        "Seconds between snapshots (at most this much is redone).", default=5.0, ge=0.05)
    backup_interval: Annotated[float, Cli(panel="Recovery")] = _help(
        "Seconds superseded snapshots are kept (for backups).", default=0.0, ge=0.0)
    block_kib: Annotated[int, Cli(hidden=True)] = _help("Size of the file blocks dealt to partitions, in KiB.",
                                                        default=1024, ge=1)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load_settings` reads the layers itself, to say where a bad value came from.
        return (init_settings,)


def cli_of(name: str) -> Cli:
    """A setting's command-line form."""
    return next((m for m in RunSettings.model_fields[name].metadata if isinstance(m, Cli)), Cli())


def flag_of(name: str) -> str:
    """The option a setting is given by on the command line (its first flag)."""
    flags = cli_of(name).flags
    return flags[0].split("/")[0] if flags else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class LoadedSettings:
    """The effective settings and where each one that is not a default came from."""

    settings: RunSettings
    sources: dict[str, str]


def load_settings(config: Path | None, given: Mapping[str, Any]) -> LoadedSettings:
    """`given` (the options on the command line) over `CONVOFLOW_*` variables over the TOML file
    `config`, over the defaults."""
    from_file = _file_values(config) if config is not None else {}
    from_env = _env_values()
    layers = (("command line", dict(given)), ("environment", from_env), (str(config), from_file))
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for origin, values in reversed(layers):
        merged.update(values)
        sources.update(dict.fromkeys(values, origin))
    try:
        settings = RunSettings(**merged)
    except ValidationError as exc:
        raise SettingsError(_first_problem(exc, config, from_env, given)) from None
    return LoadedSettings(settings, sources)


def _file_values(config: Path) -> dict[str, Any]:
    """The TOML file's settings, keys with underscores, relative paths from the file's folder."""
    if not config.is_file():
        raise SettingsError(f"--config {config}: no such file")
    try:
        raw = TomlConfigSettingsSource(RunSettings, toml_file=config)()
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{config}: not a TOML file: {exc}") from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    for key, value in values.items():
        if isinstance(value, str) and _is_path(key) and not Path(value).is_absolute():
            values[key] = os.path.normpath(config.absolute().parent / value)
    return values


def _is_path(key: str) -> bool:
    field = RunSettings.model_fields.get(key)
    if field is None:
        return False
    annotation = field.annotation
    kinds = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return Path in kinds


def _env_values() -> dict[str, Any]:
    """The `CONVOFLOW_*` variables that name a setting (decoded as pydantic-settings decodes them)."""
    return dict(EnvSettingsSource(RunSettings)())


def _first_problem(error: ValidationError, config: Path | None, from_env: Mapping[str, Any],
                   given: Mapping[str, Any]) -> str:
    """One line for the first invalid setting, named as the user gave it."""
    problem = error.errors()[0]
    key = str(problem["loc"][0]) if problem["loc"] else "?"
    message = problem["msg"]
    if problem["type"] == "extra_forbidden":
        return f"{config}: unknown key {key!r} (the keys are `convoflow run`'s options: see `convoflow run --help`)"
    if key in given:
        return f"{flag_of(key)}: {message}"
    if key in from_env:
        return f"{ENV_PREFIX}{key.upper()}: {message}"
    return f"{config}: {key}: {message}"


def redacted(settings: RunSettings) -> dict[str, Any]:
    """The settings as plain values, with secrets shown as `REDACTED`: the API key, credentials in
    the LLM URL, and Kafka settings named like a password, secret, token or key."""
    values = settings.model_dump(mode="json")
    if settings.llm_api_key is not None:
        values["llm_api_key"] = REDACTED
    if settings.llm_base_url:
        values["llm_base_url"] = _without_credentials(settings.llm_base_url)
    values["kafka_config"] = [_redacted_pair(pair) for pair in settings.kafka_config]
    return values


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _redacted_pair(pair: str) -> str:
    name, sep, _ = pair.partition("=")
    return f"{name}={REDACTED}" if sep and any(word in name.lower() for word in SECRET_WORDS) else pair


def as_toml(values: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """`values` as TOML lines, each set one followed by where it came from; unset ones commented out."""
    import orjson

    lines = []
    for key, value in values.items():
        origin = sources.get(key, "default")
        if value is None:
            lines.append(f"# {key} = (not set)")
            continue
        text = orjson.dumps(value).decode() if not isinstance(value, bool) else str(value).lower()
        lines.append(f"{key} = {text}  # {origin}")
    return "\n".join(lines) + "\n"

