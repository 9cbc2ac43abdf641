"""What the LLM stage needs without importing LangChain: configuration, requests, language codes.

`connectors.llm.client` (the client) imports LangChain and the openai SDK, about 2 s at start-up; the
CLI and every worker import this instead and load the client only when calls are on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import SecretStr

from dataflows.errors import ConvoflowError

Mode = Literal["off", "on", "auto"]
Status = Literal["ok", "skipped", "invalid_response", "error"]


@dataclass(frozen=True)
class LlmConfig:
    """How to reach the model. `mode="auto"` turns calls on when an API key or a base URL is set.

    `rate_limit` is model calls per second (None: unpaced); `timeout` is seconds per HTTP attempt;
    `max_retries` counts extra attempts after a retryable HTTP failure or timeout.
    """

    mode: Mode = "auto"
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: SecretStr | None = field(default=None, repr=False)
    concurrency: int = 16
    timeout: float = 30.0
    max_retries: int = 2
    rate_limit: float | None = None
    structured_method: Literal["json_mode", "json_schema"] = "json_mode"
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        problems = [
            f"mode {self.mode!r} is not one of off, on, auto" if self.mode not in ("off", "on", "auto") else "",
            f"concurrency {self.concurrency} must be at least 1" if self.concurrency < 1 else "",
            f"timeout {self.timeout} must be positive" if self.timeout <= 0 else "",
            f"max retries {self.max_retries} must not be negative" if self.max_retries < 0 else "",
            f"rate limit {self.rate_limit} must be positive" if self.rate_limit is not None and self.rate_limit <= 0 else "",
        ]
        if self.mode == "on" and self.api_key is None and self.base_url is None:
            problems.append("mode 'on' needs an API key (or OPENAI_API_KEY) or a base URL (or OPENAI_BASE_URL)")
        if any(problems):
            msg = "LLM configuration: " + "; ".join(p for p in problems if p)
            raise ConvoflowError(msg)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, api_key: str | None = None,
                 base_url: str | None = None, **options: Any) -> LlmConfig:
        """A config from explicit options, falling back to OPENAI_API_KEY and OPENAI_BASE_URL in `env`."""
        env = os.environ if env is None else env
        key = api_key or env.get("OPENAI_API_KEY") or None
        return cls(api_key=SecretStr(key) if key else None, base_url=base_url or env.get("OPENAI_BASE_URL") or None,
                   **options)

    @property
    def enabled(self) -> bool:
        return self.mode == "on" or (self.mode == "auto" and (self.api_key is not None or self.base_url is not None))

    @property
    def off_reason(self) -> str | None:
        """Why calls are off, or None when they are on."""
        if self.enabled:
            return None
        return "LLM mode is off" if self.mode == "off" else "LLM mode auto: no API key or base URL configured"


class TranslationRequest(NamedTuple):
    """A text to translate into `target`; `source` is the message's language when known.

    `model` names the model for this request (e.g. one a `language_model` rule picks for the
    target language); None: the config's model.
    """

    text: str
    target: str
    source: str | None = None
    model: str | None = None


def language_code(language: str) -> str:
    """The primary subtag of a language tag, lower-cased: `es-MX` and `ES` are both `es`."""
    return language.strip().replace("_", "-").split("-")[0].lower()


def same_language(source: str | None, target: str) -> bool:
    """True when the message's known language is the target language (compared by primary subtag)."""
    return source is not None and bool(source.strip()) and language_code(source) == language_code(target)


def describe_error(error: BaseException, config: LlmConfig) -> str:
    """`error` as one line of at most 500 characters, with `config`'s API key masked should it appear."""
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    if config.api_key is not None:
        text = text.replace(config.api_key.get_secret_value(), "***")
    return text[:500]
