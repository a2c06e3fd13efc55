# SPDX-License-Identifier: MIT
# SPDX-FileCopyrightText: 2026 The prefactor_http authors
"""A client for the Prefactor API in one file, standard library only.

Copy this file next to your code (a Lambda function, a locked-down server) and
import it; nothing else needs installing. It speaks the same API as the async
``prefactor-http`` package: the same class, method, argument and exception names,
synchronous, with an ``AsyncPrefactorHttpClient`` facade for asyncio code.

Quick start::

    from prefactor_http import HttpClientConfig, PrefactorHttpClient

    config = HttpClientConfig(api_url="https://app.prefactorai.com", api_token="...")
    with PrefactorHttpClient(config) as client:
        inst = client.agent_instances.register(agent_id="...", agent_version={...})
        client.agent_instances.start(inst.id)
        span = client.agent_spans.create(agent_instance_id=inst.id,
                                         schema_name="agent:llm", status="active")
        client.agent_spans.finish(span.id, status="complete")
        client.agent_instances.finish(inst.id, status="complete")

Promises: connections are reused; every POST, PUT and DELETE carries a key that is
resent on every retry; retries follow ``Retry-After``; one attempt never exceeds
``request_timeout`` and one call never exceeds ``total_timeout``; redirects are
never followed and the token never appears in a repr, a message or a log line.

``python3 -m prefactor_http demo`` shows it working against a local stand-in API.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = [
    # client and configuration
    "HttpClientConfig",
    "PrefactorHttpClient",
    "AsyncPrefactorHttpClient",
    # response models
    "AgentInstance",
    "AgentInstanceSpanCounts",
    "AgentSpan",
    "Agent",
    "AgentSummary",
    "ListResponse",
    "Pagination",
    "BulkItem",
    "BulkRequest",
    "BulkOutput",
    "BulkResponse",
    # request helpers and types
    "AgentVersionForRegister",
    "AgentSchemaVersionForRegister",
    "SpanTypeSchemaForCreate",
    "RuntimeEnvironment",
    "QualitySchemaForCreate",
    "QualitySchemaDetails",
    "FinishInstanceRequest",
    "AgentInstanceRecordQuality",
    "ApiResponse",
    "AgentStatus",
    "FinishStatus",
    "InstancePurpose",
    # errors
    "PrefactorHttpError",
    "PrefactorApiError",
    "PrefactorAuthError",
    "PrefactorNotFoundError",
    "PrefactorConflictError",
    "PrefactorValidationError",
    "PrefactorConnectionError",
    "PrefactorTimeoutError",
    "PrefactorResponseContractError",
    "PrefactorRetryExhaustedError",
    "PrefactorClientError",
    "is_transient_http_error",
    "is_permanent_http_error",
    # testing
    "LocalApiServer",
]

import io
import json
import os
import re
import select
import socket
import sys
import threading
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property, lru_cache, update_wrapper
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (~5 ms)

if TYPE_CHECKING:  # typing-only imports keep `import prefactor_http` cheap
    import logging
    import ssl
    from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any, Callable, Literal, TypeVar

    from typing_extensions import Concatenate, ParamSpec  # in typing from 3.10

    _P = ParamSpec("_P")
    _R = TypeVar("_R")
    AgentStatus = Literal["pending", "active", "complete", "failed", "cancelled", "terminated"]
    FinishStatus = Literal["complete", "failed", "cancelled"]
    InstancePurpose = Literal["live", "smoke_test", "eval"]

# ============================================================================ #
# Constants
# ============================================================================ #

#: A response body larger than this is refused: the API answers in kilobytes, and a
#: runaway proxy or a wrong URL must not exhaust a 128 MiB Lambda's memory.
_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: The API rejects longer idempotency keys (both official clients check 64).
_MAX_KEY_LENGTH = 64
#: Bulk items need keys of 8 to 64 characters (upstream validation rule).
_MIN_BULK_KEY_LENGTH = 8
#: A generated key is the prefix plus a 36-character UUID4, so the prefix may use
#: what is left of the 64.
_MAX_KEY_PREFIX = _MAX_KEY_LENGTH - 36
#: Error messages quote this much of a body that is not the expected JSON.
_SNIPPET_LENGTH = 200
_MAX_QUOTED = 1024 * 1024  # an error body is read for its envelope (and redacted) in its first MiB only

_AGENT_STATUSES = ("pending", "active", "complete", "failed", "cancelled", "terminated")
_FINISH_STATUSES = ("complete", "failed", "cancelled")
_PURPOSES = ("live", "smoke_test", "eval")
#: The public Literal aliases AgentStatus, FinishStatus and InstancePurpose are made
#: by the module __getattr__ at the end, on first use.
_LITERALS = {"AgentStatus": _AGENT_STATUSES, "FinishStatus": _FINISH_STATUSES, "InstancePurpose": _PURPOSES}

_UTC = timezone.utc
_PYTHON = "{}.{}".format(*sys.version_info[:2])
_monotonic = time.monotonic

# ============================================================================ #
# Exceptions
#
#   PrefactorHttpError
#   +-- PrefactorApiError                 the server answered with an error status
#   |   +-- PrefactorAuthError            401, 403
#   |   +-- PrefactorNotFoundError        404
#   |   +-- PrefactorConflictError        409
#   |   +-- PrefactorValidationError      400, 422
#   +-- PrefactorConnectionError          refused, reset, DNS, TLS, dropped
#   |   +-- PrefactorTimeoutError         connect or request timeout
#   +-- PrefactorResponseContractError    2xx body that is not the promised shape
#   +-- PrefactorRetryExhaustedError      every attempt failed (.last_error)
#   +-- PrefactorClientError              misuse at run time (a closed client)
# ============================================================================ #


class PrefactorHttpError(Exception):
    """Base class of every error a call can raise (bad arguments aside)."""

    # Set by the transport: the request failed before any byte of it was sent, or on a
    # reused connection before any byte of its answer (the path had died while idle).
    _unsent = _stale = False


class PrefactorApiError(PrefactorHttpError):
    """The API answered with an error status.

    ``message`` and ``code`` come from the error envelope when the body is JSON;
    ``retry_after`` is the server's ``Retry-After`` in seconds, or None;
    ``body_snippet`` quotes a body that was not the JSON envelope.
    """

    def __init__(
        self,
        message: str,
        code: str,
        status_code: int,
        errors: Any = None,  # positional too: upstream's PrefactorValidationError takes it 4th
        *,
        retry_after: float | None = None,
        body_snippet: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.errors: Any = {} if errors is None else errors
        self.retry_after = retry_after
        self.body_snippet = body_snippet

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status_code}, code {self.code!r})"


class PrefactorAuthError(PrefactorApiError):
    """401 or 403: the token is missing, wrong, expired or not allowed."""


class PrefactorNotFoundError(PrefactorApiError):
    """404: no such resource."""


class PrefactorConflictError(PrefactorApiError):
    """409: the action does not fit the resource's state (already finished)."""


class PrefactorValidationError(PrefactorApiError):
    """400 or 422: the server rejected the request; ``errors`` says why."""


class PrefactorConnectionError(PrefactorHttpError):
    """The request did not get a complete answer: refused, reset, DNS, TLS.

    ``transient`` is False for failures a retry cannot fix (a certificate that
    does not verify).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class PrefactorTimeoutError(PrefactorConnectionError):
    """Connecting, or one attempt, or the whole call took too long."""


class PrefactorResponseContractError(PrefactorHttpError):
    """A success response whose body is not the JSON shape the API promises."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body_snippet: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body_snippet = body_snippet
        self.cause = cause


class PrefactorRetryExhaustedError(PrefactorHttpError):
    """Every attempt failed with a retryable error; ``last_error`` is the last."""

    def __init__(self, message: str, last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


class PrefactorClientError(PrefactorHttpError):
    """The client was used wrongly at run time (for example after ``close()``)."""


#: Status code -> error class; anything else is a plain PrefactorApiError.
_STATUS_ERRORS: dict[int, type[PrefactorApiError]] = {
    400: PrefactorValidationError,
    401: PrefactorAuthError,
    403: PrefactorAuthError,
    404: PrefactorNotFoundError,
    409: PrefactorConflictError,
    422: PrefactorValidationError,
}


def _transient_status(status: int | None) -> bool:
    return status is not None and (status == 429 or status >= 500)


def is_transient_http_error(error: BaseException) -> bool:
    """True when trying the same call again later may succeed."""
    if isinstance(error, PrefactorRetryExhaustedError) and error.last_error is not None:
        return is_transient_http_error(error.last_error)
    if isinstance(error, PrefactorConnectionError):
        return error.transient
    if isinstance(error, (PrefactorApiError, PrefactorResponseContractError)):
        return _transient_status(error.status_code)
    return isinstance(error, OSError)


def is_permanent_http_error(error: BaseException) -> bool:
    """True when retrying the same call can never succeed."""
    if isinstance(error, PrefactorRetryExhaustedError) and error.last_error is not None:
        return is_permanent_http_error(error.last_error)
    if isinstance(error, PrefactorConnectionError):
        return not error.transient
    if isinstance(error, PrefactorApiError):
        return 400 <= error.status_code < 500 and error.status_code != 429
    if isinstance(error, PrefactorResponseContractError):
        return not _transient_status(error.status_code)
    return isinstance(error, PrefactorClientError)


# ============================================================================ #
# Configuration
# ============================================================================ #


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e9:  # 1e300 overflows
        raise ValueError(f"{name} must be positive and at most 1e9 (a number of seconds), got {value!r}")


def _check_header_value(name: str, value: str) -> None:
    """Refuse characters that would break or smuggle an HTTP header."""
    if not value.isprintable() or not value.isascii():
        raise ValueError(f"{name} contains control or non-ASCII characters")


@dataclass
class HttpClientConfig:
    """Where the API is, how to authenticate, and how hard to try.

    The fields of the upstream client keep their names and defaults. New:
    ``total_timeout`` bounds a whole call with its retries and waits (set it from
    a Lambda's remaining time), ``keepalive_timeout`` retires idle connections (a
    NAT gateway forgets them), ``ca_file`` adds a CA bundle (a corporate proxy's),
    ``trust_env`` honours ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``.
    """

    api_url: str
    api_token: str = field(repr=False)
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    max_retries: int = 3
    initial_retry_delay: float = 1.0
    max_retry_delay: float = 60.0
    retry_multiplier: float = 2.0
    retry_on_status_codes: tuple[int, ...] = (429, 500, 502, 503, 504)
    default_idempotency_key: str | None = None
    total_timeout: float | None = None
    keepalive_timeout: float = 15.0
    ca_file: str | None = None
    trust_env: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.api_url, str) or not self.api_url:
            raise ValueError("api_url is required")
        parts = urlsplit(self.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"api_url must be an http:// or https:// URL, got {self.api_url!r}")
        if not self.api_url.isascii() or not self.api_url.isprintable() or " " in self.api_url:
            raise ValueError("api_url must be ASCII without spaces (percent-encode the path, IDNA-encode the host)")
        if any(not 0 < len(label) < 64 for label in parts.hostname.rstrip(".").split(".")):  # as the idna codec
            raise ValueError(f"api_url host {parts.hostname!r} has an empty label or one over 63 characters")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError("api_url must not carry credentials, a query string or a fragment")
        if not isinstance(self.api_token, str) or not self.api_token:
            raise ValueError("api_token is required")
        if self.api_token.strip() != self.api_token or " " in self.api_token:
            raise ValueError("api_token must not contain spaces")
        _check_header_value("api_token", self.api_token)
        for name in ("request_timeout", "connect_timeout", "initial_retry_delay", "max_retry_delay"):
            _positive(name, getattr(self, name))
        _positive("keepalive_timeout", self.keepalive_timeout)
        if self.total_timeout is not None:
            _positive("total_timeout", self.total_timeout)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be non-negative (an integer), got {self.max_retries!r}")
        if self.initial_retry_delay > self.max_retry_delay:
            raise ValueError("initial_retry_delay must be <= max_retry_delay")
        if isinstance(self.retry_multiplier, bool) or not 1 <= self.retry_multiplier < float("inf"):
            raise ValueError("retry_multiplier must be >= 1 and finite")
        codes = tuple(self.retry_on_status_codes)
        for code in codes:
            if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
                raise ValueError(f"retry_on_status_codes holds {code!r}, not an HTTP status")
        self.retry_on_status_codes = codes
        prefix = self.default_idempotency_key
        if prefix is not None:
            if not isinstance(prefix, str) or len(prefix) > _MAX_KEY_PREFIX:
                raise ValueError(
                    f"default_idempotency_key is a prefix for generated keys and must be"
                    f" a string of at most {_MAX_KEY_PREFIX} characters"
                )
            _check_header_value("default_idempotency_key", prefix)
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ValueError(f"ca_file {self.ca_file!r} is not a readable file")

    @classmethod
    def from_env(cls, **overrides: Any) -> HttpClientConfig:
        """Build from ``PREFACTOR_API_URL`` and ``PREFACTOR_API_TOKEN``; keyword
        arguments override them and set any other field."""
        for name in ("api_url", "api_token"):
            variable = "PREFACTOR_" + name.upper()
            overrides.setdefault(name, os.environ.get(variable, ""))
            if not overrides[name]:
                raise ValueError(f"{name} is required: set {variable} or pass {name}=")
        return cls(**overrides)


# ============================================================================ #
# Models
# ============================================================================ #

_FRACTION = re.compile(r"\.(\d+)")


def _parse_datetime(value: Any, where: str) -> datetime:
    """An aware datetime from ISO-8601 with ``Z`` or an offset and 0-9 fraction
    digits; a naive one is taken as UTC."""
    parsed = _parse_iso(value) if isinstance(value, str) and len(value) <= 64 else None  # longer: none, uncached
    if parsed is None:
        raise PrefactorResponseContractError(f"{where} is not an ISO-8601 timestamp")  # unquoted: it may be a secret
    return parsed


@lru_cache(maxsize=256)  # a response repeats its timestamps (inserted_at == updated_at)
def _parse_iso(text: str) -> datetime | None:
    # 3.9/3.10: fromisoformat knows neither "Z" nor 1, 2, 4, 5, 7-9 fraction digits.
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(_FRACTION.sub(lambda m: "." + (m.group(1) + "00000")[:6], text, 1))
        except ValueError:
            return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=_UTC)


def _build(cls: Any, data: Any, where: str) -> Any:
    """Build a response dataclass leniently: known keys become fields (converted
    where the class says so), unknown keys go to ``extra``, missing keys keep
    their defaults. Never ``cls(**data)``: a new server field must not break us."""
    if not isinstance(data, dict):
        raise PrefactorResponseContractError(f"{where} must be a JSON object, got {type(data).__name__}")
    names, converters = _MODEL_FIELDS.get(cls) or _model_fields(cls)
    values = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names} if len(values) < len(data) else {}
    for key, convert in converters:
        value = values.get(key)
        if value is not None:
            values[key] = convert(value, f"{where}.{key}")
    if "id" in names and not isinstance(values.get("id"), str):
        raise PrefactorResponseContractError(f"{where} has no string 'id'")
    return cls(extra=extra, **values)


_MODEL_FIELDS: dict[Any, tuple[frozenset[str], list[tuple[str, Any]]]] = {}


def _model_fields(cls: Any) -> tuple[frozenset[str], list[tuple[str, Any]]]:
    """A model's field names (``extra`` aside) and, read from their annotations, the
    converters of those not taken as they are: timestamps and nested models."""
    converters: list[tuple[str, Any]] = []
    for name, spec in cls.__dataclass_fields__.items():
        kind = globals().get(str(spec.type).split(" |")[0])  # "datetime | None" -> datetime
        if kind is datetime:
            converters.append((name, _parse_datetime))
        elif hasattr(kind, "__dataclass_fields__"):
            converters.append((name, lambda value, where, nested=kind: _build(nested, value, where)))
    _MODEL_FIELDS[cls] = frozenset(cls.__dataclass_fields__) - {"extra"}, converters
    return _MODEL_FIELDS[cls]


@dataclass
class AgentInstanceSpanCounts:
    """How many spans an instance has, by state."""

    total: int = 0
    active: int = 0
    complete: int = 0
    failed: int = 0
    cancelled: int = 0
    finished: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class AgentInstance:
    """One run of an agent: registered, started, finished or terminated."""

    id: str
    type: str = "agent_instance"
    account_id: str | None = None
    agent_id: str | None = None
    agent_version_id: str | None = None
    environment_id: str | None = None
    agent_deployment_id: str | None = None
    status: str | None = None
    inserted_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    termination_reason: str | None = None
    external_identifier: str | None = None
    span_counts: AgentInstanceSpanCounts | None = None
    purpose: str | None = None
    quality_payloads: dict[str, Any] | None = None
    quality_summaries: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class AgentSpan:
    """One recorded step of an agent instance (an LLM call, a tool call)."""

    id: str
    type: str = "agent_span"
    account_id: str | None = None
    agent_id: str | None = None
    agent_instance_id: str | None = None
    parent_span_id: str | None = None
    schema_name: str | None = None
    schema_title: str | None = None
    status: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    result_payload: dict[str, Any] | None = None
    summary: str | None = None
    started_at: datetime | None = None
    inserted_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class AgentSummary:
    """An agent as a list row."""

    id: str
    type: str = "agent"
    name: str | None = None
    description: str | None = None
    external_identifier: str | None = None
    status: str | None = None
    owner_person_id: str | None = None
    team_id: str | None = None
    available_actions: dict[str, Any] | None = None
    inserted_at: datetime | None = None
    updated_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Agent(AgentSummary):
    """An agent of the account: a summary's fields plus risk profile and counts."""

    risk_profile_id: str | None = None
    instance_counts: dict[str, Any] | None = None


@dataclass
class Pagination:
    """Where a list page sits; ``next_page_offset`` is None on the last page."""

    item_count: int | None = None
    item_end: int | None = None
    item_start: int | None = None
    next_page_offset: int | None = None
    page_count: int | None = None
    page_index: int | None = None
    page_offset: int | None = None
    page_size: int | None = None
    previous_page_offset: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ListResponse:
    """One page of a list: ``summaries`` plus where the page sits."""

    status: str = "success"
    summaries: list[Any] = field(default_factory=list)
    pagination: Pagination | None = None
    sorting: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BulkOutput:
    """The result of one bulk item: ``status`` is ``success`` or ``error``."""

    status: str = "success"
    details: Any = None
    summaries: list[Any] | None = None
    pagination: dict[str, Any] | None = None
    code: str | None = None
    message: str | None = None
    errors: Any = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BulkResponse:
    """Bulk results keyed by item idempotency key. Items after the first failing
    one are not processed and have no entry."""

    status: str = "success"
    outputs: dict[str, BulkOutput] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


class BulkItem:
    """One action of a bulk request: ``BulkItem(_type="agent_spans/create",
    idempotency_key="...", **params)``; params are the single endpoint's body
    fields, flat. Raises ValueError on a missing type or a bad key."""

    __slots__ = ("idempotency_key", "params", "type")

    def __init__(self, _type: str | None = None, idempotency_key: str | None = None, **params: Any):
        if _type is None:
            _type = params.pop("type", None)
        problems = _bulk_item_problems(_type, idempotency_key)
        if problems:
            raise ValueError("invalid BulkItem: " + "; ".join(problems))
        self.type: str = _type  # type: ignore[assignment,unused-ignore]
        self.idempotency_key: str = idempotency_key  # type: ignore[assignment]
        self.params = params

    def to_dict(self) -> dict[str, Any]:
        """The item as sent on the wire."""
        return {"_type": self.type, "idempotency_key": self.idempotency_key, **self.params}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.params[name]  # params read like attributes, as upstream
        except KeyError:
            raise AttributeError(name) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BulkItem) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"BulkItem(_type={self.type!r}, idempotency_key={self.idempotency_key!r}, ...)"


def _bulk_item_problems(kind: Any, key: Any) -> list[str]:
    problems = []
    if not isinstance(kind, str) or not kind:
        problems.append("_type is required (e.g. 'agent_spans/create')")
    if not isinstance(key, str):
        problems.append("idempotency_key is required")
    elif not _MIN_BULK_KEY_LENGTH <= len(key) <= _MAX_KEY_LENGTH:
        problems.append(f"idempotency_key must be {_MIN_BULK_KEY_LENGTH}-{_MAX_KEY_LENGTH} characters, got {len(key)}")
    return problems


class BulkRequest:
    """Items for ``/api/v1/bulk``: at least one, keys 8-64 characters and unique.
    Dicts are accepted as items. One ValueError lists every problem."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[BulkItem | Mapping[str, Any]]):
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise TypeError("items must be a list of BulkItem or dicts")
        problems: list[str] = []
        built: list[BulkItem] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            if not isinstance(item, BulkItem):
                if not hasattr(item, "keys"):
                    problems.append(f"item {index}: expected a BulkItem or dict, got {type(item).__name__}")
                    continue
                params = dict(item)
                kind = params.pop("_type") if "_type" in params else params.pop("type", None)
                key = params.pop("idempotency_key", None)
                found = _bulk_item_problems(kind, key)
                if found:
                    problems.extend(f"item {index}: {problem}" for problem in found)
                    continue
                item = BulkItem(kind, key, **params)
            key = item.idempotency_key
            if key in seen:
                problems.append(f"item {index}: idempotency_key {key!r} repeats item {seen[key]}")
            seen.setdefault(key, index)
            built.append(item)
        if not built and not problems:
            problems.append("at least one item is required")
        if problems:
            raise ValueError("invalid bulk request:\n  " + "\n  ".join(problems))
        self.items = built

    def to_dict(self) -> dict[str, Any]:
        return {"items": [item.to_dict() for item in self.items]}

    def __repr__(self) -> str:
        return f"BulkRequest(items=[{len(self.items)} items])"


class _RequestModel:
    """Request helper: serialised as its fields that are not None."""

    def __init__(self, **fields: Any) -> None:  # the dataclasses below have their own
        self.__dict__.update(fields)

    def to_dict(self) -> dict[str, Any]:
        return {k.rstrip("_"): v for k, v in self.__dict__.items() if v is not None}  # schema_ is sent as schema


@dataclass
class AgentVersionForRegister(_RequestModel):
    """``agent_version`` of a register call (a dict works as well)."""

    name: str | None = None
    external_identifier: str | None = None
    description: str | None = None
    runtime_environment: RuntimeEnvironment | dict[str, Any] | None = None


@dataclass
class SpanTypeSchemaForCreate(_RequestModel):
    """One span type of a schema version (a dict works as well)."""

    name: str
    params_schema: dict[str, Any]
    result_schema: dict[str, Any] | None = None
    title: str | None = None
    description: str | None = None
    template: str | None = None
    data_risk: dict[str, Any] | None = None


@dataclass
class AgentSchemaVersionForRegister(_RequestModel):
    """``agent_schema_version`` of a register call (a dict works as well)."""

    external_identifier: str | None = None
    span_schemas: dict[str, Any] | None = None
    span_result_schemas: dict[str, Any] | None = None
    span_type_schemas: list[Any] | None = None
    quality_schemas: list[Any] | None = None


# The other models upstream 0.4.3 exports: keyword fields in, serialised as above (a dict works too).
class RuntimeEnvironment(_RequestModel): ...


class QualitySchemaForCreate(_RequestModel): ...


class QualitySchemaDetails(_RequestModel): ...


class FinishInstanceRequest(_RequestModel): ...


class AgentInstanceRecordQuality(_RequestModel): ...


class ApiResponse(_RequestModel): ...


# ============================================================================ #
# Request validation and encoding
# ============================================================================ #


def _json_default(value: Any) -> Any:
    if isinstance(value, (_RequestModel, BulkItem, BulkRequest)):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_decode = json.JSONDecoder().decode
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_json_default).encode
#: Bounds of a JSON answer. Depth: the C decoder recurses, within the recursion limit (1,000 unless raised;
#: raised, a deep body crashes the process). Values ("[", "{" and "," each): a 32 MiB body of "{}," is 900 MiB
#: as objects; one takes 160 bytes at most, so ~40 MB, and the strings' text. 500 bulk outputs of 1 KB: ~20,000.
_MAX_JSON_DEPTH, _MAX_JSON_VALUES = 1000, 250_000
_JSON_STRING = re.compile(rb'"[^"]*"?')  # once escapes are gone; never fails, so never backtracks
_DEPTH_STEP, _NOT_BRACKET = bytes.maketrans(b"[{]}", b"\1\1\xff\xff"), bytes(set(range(256)) - set(b"[{]}"))


def _load_json(data: bytes) -> Any:
    """A JSON body's value; over a bound, a ValueError (counted when a cheap count says it may be)."""
    opens = data.count(b"[") + data.count(b"{")
    deep = opens > _MAX_JSON_DEPTH and sys.getrecursionlimit() > _MAX_JSON_DEPTH  # (else RecursionError stops it)
    if deep or opens + data.count(b",") > _MAX_JSON_VALUES:
        from array import array
        from itertools import accumulate

        text = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes gone: each '"' opens or closes a string
        text = _JSON_STRING.sub(b"", text, 2 * _MAX_JSON_VALUES + 2)  # a piece each; more strings need more values
        steps = array("b", text.translate(_DEPTH_STEP, _NOT_BRACKET))  # +1 at each "[" or "{", -1 at its end
        if sum(map(text.count, b"[{,")) > _MAX_JSON_VALUES or max(accumulate(steps), default=0) > _MAX_JSON_DEPTH:
            raise ValueError(f"JSON of over {_MAX_JSON_VALUES} values or {_MAX_JSON_DEPTH} levels deep refused")
    return _decode(data.decode())


def _encode_body(body: Any, operation: str) -> bytes:
    """JSON bytes, or a ValueError naming the argument that is not JSON."""
    try:
        return _encode(body).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        fields = body if isinstance(body, dict) else {}
        culprit = "the request body" if fields else "json_data"  # only request() sends a body that is not a dict
        details = fields.get("details")
        pairs = [*(details.items() if isinstance(details, dict) else ()), *fields.items()]
        for key, value in pairs:
            try:
                _encode(value)
            except (ValueError, TypeError, RecursionError):
                culprit = repr(key)
                break
        raise ValueError(f"{operation}: {culprit} is not valid JSON ({exc})") from None


def _check_id(value: Any, name: str) -> str:
    """An id as one percent-encoded path segment; '../x?y' cannot go elsewhere."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value.replace("-", "").replace("_", "").isalnum() and value.isascii():  # PFIDs: nothing to encode
        return value
    if not value.strip() or value in (".", ".."):
        raise ValueError(f"{name} must be a non-empty id, got {value!r}")
    return quote(value, safe="")


def _check_key(key: Any, name: str = "idempotency_key") -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name} must be a non-empty string")
    if len(key) > _MAX_KEY_LENGTH:
        raise ValueError(f"{name} must be at most {_MAX_KEY_LENGTH} characters, got {len(key)}")
    _check_header_value(name, key)
    return key


def _check_choice(value: Any, allowed: tuple[str, ...], name: str) -> Any:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _check_mapping(value: Any, name: str) -> Any:
    if value is not None and not hasattr(value, "keys") and not isinstance(value, _RequestModel):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    return value


def _timestamp(value: Any, name: str) -> str | None:
    """Aware datetime -> UTC ISO-8601 with ``Z``; naive datetimes are refused."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return value.astimezone(_UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _uuid4() -> str:
    """A random (version 4) UUID, without importing uuid."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


# ============================================================================ #
# Retry policy
# ============================================================================ #


def _parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date);
    None when absent or unreadable. Never negative."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"-?[0-9]+(\.[0-9]*)?", value):  # delta-seconds (a sign or fraction tolerated); not 1e9, 1_0
        seconds = float(value)  # so many digits that it is inf: longer than any max_retry_delay
    else:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


def _backoff(config: HttpClientConfig, retry: int, rand: Callable[[], float]) -> float:
    """``initial * multiplier**retry`` with jitter x0.75-1.25, capped."""
    base = config.max_retry_delay  # when multiplier**retry overflows, it is far past the cap
    with suppress(OverflowError):
        base = config.initial_retry_delay * config.retry_multiplier**retry
    return min(base * (0.75 + rand() * 0.5), config.max_retry_delay)


def _random() -> float:
    return int.from_bytes(os.urandom(7), "big") / 2**56


# ============================================================================ #
# Transport: the only code that touches socket and ssl
# ============================================================================ #


class _DeadlineSocket(socket.socket):
    """A socket whose reads share one deadline, so a server trickling a byte a
    second still cannot hold an attempt past ``request_timeout``. The deadline is
    set when the socket is made and again for every attempt."""

    deadline: float

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        _check_deadline(self)
        return super().recv_into(buffer, nbytes, flags)


def _check_deadline(sock: Any) -> None:
    """Shrink the socket timeout to what is left of the attempt."""
    remaining = sock.deadline - _monotonic()
    if remaining <= 0:
        raise socket.timeout("timed out")
    sock.settimeout(remaining)


@lru_cache(maxsize=1)
def _tls_socket_class() -> Any:
    """The TLS twin of _DeadlineSocket, made when the first https URL needs it."""
    import ssl

    class _DeadlineTLSSocket(ssl.SSLSocket):
        deadline: float

        def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
            _check_deadline(self)
            return super().recv_into(buffer, nbytes, flags)  # type: ignore[arg-type,unused-ignore]

    return _DeadlineTLSSocket


def _open_socket(address: tuple[str, int], timeout: float, deadline: float) -> _DeadlineSocket:
    """socket.create_connection, but the socket is a _DeadlineSocket, and name
    resolution and trying one address after another stay within the deadline."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, addr in _resolve(host, port, min(_monotonic() + timeout, deadline)):
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline  # bounds a proxy's CONNECT answer too
        try:
            sock.settimeout(max(min(timeout, deadline - _monotonic()), 0.001))
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address found for {host}")


_getaddrinfo = socket.getaddrinfo  # replaceable in tests by a resolver that never answers
_lookups: dict[tuple[str, int], list[Any]] = {}  # (host, port) -> [result, thread] of the last lookup


def _resolve(host: str, port: int, deadline: float) -> list[Any]:
    """getaddrinfo (which has no timeout) in a daemon thread, waited for until the deadline; one
    under way is waited for again, not repeated (a resolver that never answers: one thread)."""
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        lookup: list[Any] | None = _lookups.get((host, port))
    if lookup is None or not lookup[1].is_alive():
        lookup = [socket.timeout(f"cannot resolve {host} in time")]
        lookup.append(threading.Thread(target=_lookup, args=(host, port, lookup), daemon=True))
        try:
            lookup[1].start()
        except RuntimeError:  # no thread to be had (a memory-capped container)
            raise OSError(f"cannot start a thread to resolve {host}") from None
        _lookups[host, port] = lookup
    lookup[1].join(max(deadline - _monotonic(), 0))
    if isinstance(lookup[0], BaseException):
        raise lookup[0]
    return lookup[0]  # type: ignore[no-any-return]


def _lookup(host: str, port: int, lookup: list[Any]) -> None:
    try:
        lookup[0] = _getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except BaseException as exc:  # handed to the callers
        lookup[0] = exc


def _proxy_for(scheme: str, host: str, port: int) -> str | None:
    """The proxy URL for a request, read from the environment as curl does. NO_PROXY
    entries: a name (and its subdomains) or an IP, with an optional port (``[::1]:443``),
    or an IP range (``10.0.0.0/8``, as requests reads it)."""
    env = os.environ
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY", "")  # an empty one does not hide the other
    for entry in no_proxy.replace(" ", "").lower().split(","):
        if "/" in entry:
            from ipaddress import ip_address, ip_network

            with suppress(ValueError):  # the host is a name, or the range is no range
                if ip_address(host) in ip_network(entry, strict=False):
                    return None
        with_port = entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry)  # not "::1"
        name, _, entry_port = entry.rpartition(":") if with_port else (entry, "", "")
        name = name.strip("[]").lstrip(".")
        if entry == "*" or (name and (host == name or host.endswith("." + name)) and entry_port in ("", str(port))):
            return None
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if env.get(name) and (name != "HTTP_PROXY" or "REQUEST_METHOD" not in env):  # CGI: HTTP_PROXY is a header
            return env[name]
    return None


class _Transport:
    """Keep-alive HTTP/1.1 connections to one origin, one per thread, each with
    the buffered reader ``_read_response`` reads its answers from."""

    def __init__(self, config: HttpClientConfig, headers: list[tuple[str, str]]) -> None:
        parts = urlsplit(config.api_url)
        self.tls = parts.scheme == "https"
        self.host: str = parts.hostname  # type: ignore[assignment]
        self.port = parts.port or (443 if self.tls else 80)
        self.config = config  # read at each use: a Lambda may change timeouts between calls
        self.secrets = [config.api_token]
        self.proxy: tuple[str, int] | None = None
        self.proxy_auth: str | None = None
        self.target_prefix = parts.path.rstrip("/")
        bracketed = f"[{self.host}]" if ":" in self.host else self.host
        self.target = f"{bracketed}:{self.port}"  # CONNECT's, always with the port
        self.authority = bracketed if self.port == (443 if self.tls else 80) else self.target
        proxy = _proxy_for(parts.scheme, self.host.lower(), self.port) if config.trust_env else None
        if proxy:
            self._use_proxy(proxy)
        if self.proxy and not self.tls:  # plain HTTP through a proxy: absolute URL, credentials inline
            self.target_prefix = f"http://{self.authority}{self.target_prefix}"
            if self.proxy_auth:
                headers = [*headers, ("Proxy-Authorization", self.proxy_auth)]
        self.head = "".join(f"{k}: {v}\r\n" for k, v in [("Host", self.authority), *headers]).encode()
        auth = f"Proxy-Authorization: {self.proxy_auth}\r\n" if self.proxy_auth else ""  # made once: no call holds it
        self.connect = f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n{auth}\r\n".encode()
        self._local = threading.local()  # a thread's connection, closed when the thread ends
        self._lock = threading.Lock()
        self._open: dict[Any, Any] = {}  # socket -> reader, for close(); not the connections themselves
        self.closed = False

    def _use_proxy(self, url: str) -> None:
        try:  # urlsplit's and .port's own errors may quote the password; an unencoded '/?#' ends it early
            proxy: Any = urlsplit(url if "://" in url else "http://" + url)
            self.proxy = (proxy.hostname, 8080 if proxy.port is None else proxy.port)
            valid = proxy.scheme == "http" and all(self.proxy) and "@" not in proxy.path + proxy.query + proxy.fragment
        except ValueError:
            proxy = valid = None
        if not valid:
            raise ValueError("the proxy URL (not shown) must be http://[user:pass@]host[:port], '/?#@' percent-encoded")
        if proxy.username is not None:
            from base64 import b64encode

            user, password = unquote(proxy.username), unquote(proxy.password or "")
            token = b64encode(f"{user}:{password}".encode()).decode()
            self.proxy_auth = "Basic " + token
            self.secrets += [password, token]

    @cached_property
    def _ssl_context(self) -> ssl.SSLContext:
        import ssl

        context = ssl.create_default_context()  # verified; honours SSL_CERT_FILE
        if self.config.ca_file:
            context.load_verify_locations(cafile=self.config.ca_file)
        context.sslsocket_class = _tls_socket_class()
        return context

    def _connect(self, deadline: float) -> _Connection:
        """A new connection (through the proxy's tunnel, TLS verified) for this thread."""
        timeout = max(min(self.config.connect_timeout, deadline - _monotonic()), 0.001)  # for each step
        sock: Any = _open_socket(self.proxy or (self.host, self.port), timeout, deadline)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy and self.tls:
                sock.sendall(self.connect)
                with sock.makefile("rb") as reader:  # nothing follows the answer until TLS starts; no body is read
                    answer, _ = _read_response(reader, "CONNECT")
                if answer.status // 100 != 2:  # a 407 (credentials) or 403 is not fixed by trying again
                    why = self.redact(f"{answer.status} {answer.reason}")
                    text = f"proxy {self.proxy[0]}:{self.proxy[1]} refused the tunnel to {self.target}: {why}"
                    raise PrefactorConnectionError(text, transient=_transient_status(answer.status))
            if self.tls:
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)
                sock.deadline = deadline
        except BaseException:
            sock.close()
            raise
        conn = _Connection(sock, self._open)
        with self._lock:
            if self.closed or _CALL.stop.is_set():  # close() or a cancel came while connecting
                conn.close()
                raise PrefactorClientError("the client was closed during the call")
            self._open[sock] = conn.reader
        self._local.conn = conn
        return conn

    def _drop(self, conn: _Connection) -> None:
        self._local.conn = None
        conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            conns, self._open = self._open, {}
        for sock, reader in conns.copy().items():  # a copy: a connection dropped meanwhile removes itself
            _shutdown(sock)  # first: closing the reader would wait for a thread blocked reading it
            reader.close()
            sock.close()

    def redact(self, text: str | bytes) -> str:
        """The text (a body: UTF-8) without secrets; over _MAX_QUOTED, cut, less a margin for a cut secret."""
        cut, text = len(text) > _MAX_QUOTED, text[:_MAX_QUOTED]
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        redacted = _redactor(*self.secrets).sub("[REDACTED]", text)
        return redacted[:-64] if cut else redacted

    def round_trip(
        self, method: str, path: str, head: bytes, body: bytes | None, deadline: float, timeout_text: str
    ) -> tuple[_Response, bytes]:
        """One attempt: send, read the whole answer. Raises our errors only."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        reused = answered = False
        try:
            if conn is not None and (
                _monotonic() - conn.used > self.config.keepalive_timeout or conn.was_closed() or conn.pid != os.getpid()
            ):
                self._drop(conn)  # idle too long, closed by the server while idle, or forked: a new one, free
                conn = None
            reused = conn is not None
            if conn is None:
                wait = min(self.config.connect_timeout, deadline - _monotonic())
                text, timeout_text = timeout_text, f"no connection within {wait:.3g}s"
                conn, timeout_text = self._connect(deadline), text
            sock = conn.sock
            sock.deadline = deadline
            sock.settimeout(max(deadline - _monotonic(), 0.001))
            sock.sendall(f"{method} {self.target_prefix}{path} HTTP/1.1\r\n".encode() + self.head + head)
            if body:
                sock.sendall(body)  # apart from the head, as http.client does: one send was 2x slower on nginx
            answered = not reused or bool(conn.reader.peek(1))  # the recv the reader makes anyway
            response, data = _read_response(conn.reader, method)
            conn.used = _monotonic()
            if response.will_close or conn.dirty():
                self._drop(conn)
            return response, data
        except BaseException as exc:  # any: a KeyboardInterrupt's or a signal-raised timeout's answer may yet come
            if conn is not None:
                self._drop(conn)
            if isinstance(exc, _TooLarge):
                raise PrefactorResponseContractError(
                    f"{method} {path}: response of {exc.args[1]} bytes or more refused"
                    f" (limit {_MAX_RESPONSE_BYTES} bytes)",
                    status_code=exc.args[0],
                ) from None
            if not isinstance(exc, (OSError, ValueError, MemoryError)):
                raise
            where = f"{method} {path}"
            if self.proxy and (conn is None or not self.tls):  # it came from talking to the proxy
                where += ": proxy {}:{}".format(*self.proxy)
            error = self._translate(exc, where, timeout_text)
            error._unsent = conn is None  # failed while connecting: nothing of the request left
            error._stale = reused and not answered and not isinstance(error, PrefactorTimeoutError)
            raise error from exc

    def _translate(self, exc: BaseException, where: str, timeout_text: str) -> PrefactorConnectionError:
        """Map one socket, ssl or parsing failure to our errors (it stays the cause, redacted)."""
        exc.args = tuple(self.redact(a) if isinstance(a, str) else a for a in exc.args)
        exc.__cause__ = exc.__context__ = exc.__traceback__ = None  # a parse error's cause, its frames hold raw bytes
        name = type(exc).__name__
        if isinstance(exc, socket.timeout) or name == "TimeoutError":
            return PrefactorTimeoutError(f"{where}: {timeout_text}")
        if name == "SSLCertVerificationError":
            return PrefactorConnectionError(
                f"{where}: TLS certificate verification failed for {self.host}"
                f" ({getattr(exc, 'verify_message', exc)}); set ca_file if a proxy re-signs traffic",
                transient=False,
            )
        host, port = self.proxy or (self.host, self.port)
        if isinstance(exc, socket.gaierror):
            return PrefactorConnectionError(f"{where}: cannot resolve {host}: {exc}")
        if isinstance(exc, ConnectionRefusedError):
            return PrefactorConnectionError(f"{where}: connection refused by {host}:{port}")
        if isinstance(exc, _CutShort):
            return PrefactorConnectionError(f"{where}: {exc}")
        if isinstance(exc, ValueError):
            return PrefactorConnectionError(f"{where}: malformed HTTP response ({self.redact(str(exc))[:120]})")
        return PrefactorConnectionError(f"{where}: {name}: {self.redact(str(exc))[:200]}")


@lru_cache(maxsize=8)  # made on the first error, not at start
def _redactor(*secrets: str) -> re.Pattern[str]:
    """One pattern for the secrets, each character as it is, JSON-escaped (its UTF-16
    code units) or %-escaped (its UTF-8 bytes): the whole secret or (cut by a length
    limit) its first half, 4 to 8 characters, or more; a secret under 4 characters
    only where it is not part of a longer word."""

    def unit(c: str) -> str:
        escaped = "".join(f"\\\\u{unit}" for unit in re.findall("....", c.encode("utf-16-be").hex()))  # 1 or 2 units
        utf8 = "".join(f"%{byte:02x}" for byte in c.encode())
        return f"(?:{re.escape(c)}|(?i:{escaped}|{utf8})|\\\\{re.escape(c)})"

    patterns = []
    for secret in filter(None, secrets):
        n = min(8, max(4, len(secret) // 2))
        head = "".join(map(unit, secret[:n]))
        rest = "[" + re.escape("".join(set(secret[n:]))) + "]|\\\\u[0-9a-fA-F]{4}|%[0-9a-fA-F]{2}|\\\\."
        patterns.append(f"(?<!\\w){head}(?!\\w)" if len(secret) < 4 else head + f"(?:{rest})*" * (len(secret) > n))
    return re.compile("|".join(patterns))


class _Connection:
    """One kept-alive connection: socket, buffered reader, idle-close check, last use.
    Dropped unclosed (its thread ended, its client was dropped), it closes itself."""

    __slots__ = ("pid", "pool", "raw", "reader", "sock", "used", "was_closed")

    def __init__(self, sock: Any, pool: dict[Any, Any]) -> None:
        self.sock = sock
        self.pool = pool  # the transport's open sockets
        self.raw = _CountingSocketIO(sock, "rb")
        self.reader = io.BufferedReader(self.raw)
        self.was_closed = _closed_check(sock)  # closed by the server (or bytes arrived) while idle
        self.pid = os.getpid()  # a forked child must not talk on its parent's connection
        self.used = _monotonic()
        sock.owner = self.pid, threading.get_ident()  # for _shutdown

    def dirty(self) -> bool:
        """Bytes wait past the answer: in the reader's buffer, or decrypted inside TLS."""
        return self.reader.tell() != self.raw.received or (hasattr(self.sock, "pending") and self.sock.pending() > 0)

    def close(self) -> None:
        self.pool.pop(self.sock, None)
        self.reader.close()
        self.sock.close()

    __del__ = close


class _CountingSocketIO(socket.SocketIO):
    """The raw side of a connection's reader: its tell() counts the bytes received."""

    received = 0

    def readinto(self, b: Any) -> int | None:
        n = super().readinto(b)
        self.received += n or 0
        return n

    def tell(self) -> int:
        return self.received


def _shutdown(sock: Any, thread: int | None = None) -> None:
    """Wake the thread blocked on a socket (of this process; of ``thread`` if given)."""
    if sock.owner[0] == os.getpid() and thread in (None, sock.owner[1]):
        with suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not ssl's: it drops the TLS state


class _TooLarge(Exception):
    """The answer is over _MAX_RESPONSE_BYTES: args are (status, size so far)."""


class _CutShort(ConnectionError):
    """The connection ended before the answer did."""


class _Response:
    """Status line and headers of an answer (header names in lower case)."""

    __slots__ = ("headers", "reason", "status", "will_close")

    def __init__(self, status: int, reason: str, headers: dict[str, str], will_close: bool) -> None:
        self.status, self.reason, self.headers, self.will_close = status, reason, headers, will_close


#: Limits: bytes of the status line and header fields together (of the trailers; of one
#: chunk-size line), field lines (an obs-fold continuation counts), 1xx answers before the real one.
_MAX_HEAD, _MAX_FIELDS, _MAX_INTERIM = 65536, 100, 10
#: The grammar (RFC 9112), one regex per ABNF rule. A line may end in a bare LF (§2.2).
#: status-line = HTTP-version SP status-code [ SP reason-phrase ], code 100-599 but not
#: 101 (we never ask to switch protocols); a missing SP before an empty reason tolerated
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) (?!101)([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r?\n")
#: field-line = field-name ":" OWS field-value OWS, or an obs-fold continuation (SP / HTAB first)
_FIELD_LINE = re.compile("(?:([!#$%&'*+.^_`|~0-9A-Za-z-]+):|[\t ])([\t\x20-\x7e\x80-\xff]*)\r?\n")
#: chunk-size [ chunk-ext ] CRLF, chunk-size = 1*HEXDIG (at most 16 of them)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[\t ]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r?\n")
#: Content-Length = 1*DIGIT; a list of one value repeated is that value (RFC 9110 §8.6)
_CONTENT_LENGTH = re.compile("([0-9]{1,18})(?:[\t ]*,[\t ]*\\1)*")


def _read_response(reader: Any, method: str) -> tuple[_Response, bytes]:
    """Read one HTTP/1.x answer (status, headers, body by Content-Length, chunked or
    up to the close) from a buffered reader. What RFC 9112 does not allow is a
    ValueError, not a guess. (http.client's email-based header parsing cost more
    per call than everything else the client does.)"""
    for _ in range(_MAX_INTERIM + 1):
        line = reader.readline(_MAX_HEAD)
        status_line = _STATUS_LINE.fullmatch(line)
        if status_line is None:
            cut = _CutShort("server closed the connection without answering")
            raise ValueError(f"bad status line {line!r}") if line else cut
        status = int(status_line[2])
        headers = _read_fields(reader, _MAX_HEAD - len(line))
        if status >= 200:
            break  # an interim 1xx answer is followed by the real one
    else:
        raise ValueError(f"more than {_MAX_INTERIM} interim 1xx answers")
    connection = headers.get("connection", "").lower()
    will_close = "close" in connection or (status_line[1] == b"0" and "keep-alive" not in connection)
    response = _Response(status, (status_line[3] or b"").strip().decode("latin-1"), headers, will_close)
    coding, length = headers.get("transfer-encoding"), headers.get("content-length")
    if method in ("HEAD", "CONNECT") or status in (204, 304):  # CONNECT: a refusal's body is not waited for
        response.will_close |= status in (204, 304) and (coding is not None or length not in (None, "0"))
        return response, b""
    if coding is not None:
        if coding.lower() != "chunked":  # the list of codings must be chunked alone: we asked for no other
            raise ValueError(f"unsupported Transfer-Encoding {coding!r}")
        response.will_close |= length is not None  # a smuggling pattern: framed by chunked, never reused
        return response, _read_chunked(reader, status)
    if length is None:
        response.will_close = True
        data = reader.read(_MAX_RESPONSE_BYTES + 1)  # to the close
        if len(data) > _MAX_RESPONSE_BYTES:
            raise _TooLarge(status, len(data))
        return response, data
    valid = _CONTENT_LENGTH.fullmatch(length)
    if valid is None:
        raise ValueError(f"bad Content-Length {length!r}")
    size = int(valid[1])
    if size > _MAX_RESPONSE_BYTES:
        raise _TooLarge(status, size)
    data = reader.read(size)
    if len(data) < size:
        raise _CutShort(f"response cut short after {len(data)} of {size} bytes")
    return response, data


def _read_fields(reader: Any, budget: int) -> dict[str, str]:
    """Header (or trailer) fields up to the empty line, names in lower case; a
    repeated name's values joined by ", ", obs-fold continuations unfolded (§5.2)."""
    fields: dict[str, str] = {}
    name, field_line = "", _FIELD_LINE.fullmatch
    for _ in range(_MAX_FIELDS + 1):
        line = reader.readline(budget)
        budget -= len(line)
        if line == b"\r\n" or line == b"\n":
            return fields
        field = field_line(line.decode("latin-1"))
        if field is None or not (name or field[1]):  # (an obs-fold continues nothing before the first field)
            if line.endswith(b"\n") or not budget:
                raise ValueError(f"bad header line {line!r}" if budget else f"headers over {_MAX_HEAD} bytes")
            raise _CutShort("connection closed inside the response headers")
        key, value = field.groups()
        value = value.strip(" \t")
        if key is None:  # obs-fold: more of the previous field's value
            fields[name] = f"{fields[name]} {value}".strip(" ")
        else:
            name = key.lower()
            fields[name] = f"{fields[name]}, {value}" if name in fields else value
    raise ValueError(f"more than {_MAX_FIELDS} header lines")


def _read_chunked(reader: Any, status: int) -> bytes:
    body = bytearray()  # not a list of pieces: a million 1-byte chunks would cost 50 bytes each
    while True:  # bounded: every round adds at least one byte towards _MAX_RESPONSE_BYTES
        line = reader.readline(_MAX_HEAD)
        chunk_line = _CHUNK_LINE.fullmatch(line)
        if chunk_line is None:
            cut = _CutShort(f"response cut short after {len(body)} bytes")
            raise cut if line[-1:] != b"\n" and len(line) < _MAX_HEAD else ValueError(f"bad chunk size {line!r}")
        chunk = int(chunk_line[1], 16)
        if chunk == 0:
            _read_fields(reader, _MAX_HEAD)  # trailer fields, bounded, then ignored
            return bytes(body)
        if len(body) + chunk > _MAX_RESPONSE_BYTES:
            raise _TooLarge(status, len(body) + chunk)
        data = reader.read(chunk + 2)
        if len(data) < chunk + 2:
            raise _CutShort(f"response cut short after {len(body) + len(data)} bytes")
        if data[chunk:] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        body += memoryview(data)[:chunk]


def _closed_check(sock: Any) -> Callable[[], bool]:
    """A check, made once per connection: the idle socket is readable, so the server
    closed it (or sent junk) and it must not carry the next request."""
    if not hasattr(select, "poll"):  # Windows
        return lambda: bool(select.select([sock], [], [], 0)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return lambda: bool(poller.poll(0))


# ============================================================================ #
# Endpoint groups
# ============================================================================ #


class _Group:
    __slots__ = ("_client",)

    def __init__(self, client: PrefactorHttpClient) -> None:
        self._client = client

    def _one(self, cls: type[_R], method: str, path: str, operation: str, body: Any = None, query: Any = None) -> _R:
        """Call, and build the answer's ``details`` as ``cls``."""
        return _details(cls, self._client._call(method, path, body=body, query=query, operation=operation), operation)


class _AgentInstances(_Group):
    """``client.agent_instances``: register, start, finish, get, record_quality."""

    __slots__ = ()

    def register(
        self,
        agent_version: Mapping[str, Any] | AgentVersionForRegister,
        agent_schema_version: Mapping[str, Any] | AgentSchemaVersionForRegister | None = None,
        agent_id: str | None = None,
        environment_id: str | None = None,
        id: str | None = None,
        idempotency_key: str | None = None,
        update_current_version: bool = True,
        purpose: InstancePurpose | None = None,
        external_identifier: str | None = None,
    ) -> AgentInstance:
        """Register a new instance (status ``pending``). POST /agent_instance/register"""
        if agent_version is None:
            raise ValueError("agent_version is required")
        body = _drop_none(
            agent_version=_check_mapping(agent_version, "agent_version"),
            agent_schema_version=_check_mapping(agent_schema_version, "agent_schema_version"),
            update_current_version=bool(update_current_version),
            agent_id=agent_id,
            environment_id=environment_id,
            id=id,
            purpose=_check_choice(purpose, _PURPOSES, "purpose"),
            external_identifier=external_identifier,
            idempotency_key=self._client._key(idempotency_key),
        )
        return self._one(AgentInstance, "POST", "/api/v1/agent_instance/register", "agent_instances.register", body)

    def start(
        self, agent_instance_id: str, timestamp: datetime | None = None, idempotency_key: str | None = None
    ) -> AgentInstance:
        """Mark an instance as running (status ``active``)."""
        path = f"/api/v1/agent_instance/{_check_id(agent_instance_id, 'agent_instance_id')}/start"
        body = {"timestamp": _timestamp(timestamp, "timestamp"), "idempotency_key": self._client._key(idempotency_key)}
        return self._one(AgentInstance, "POST", path, "agent_instances.start", body)

    def finish(
        self,
        agent_instance_id: str,
        status: FinishStatus | None = None,
        timestamp: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> AgentInstance:
        """Mark an instance as finished. A 409 (already finished or terminated)
        is raised as PrefactorConflictError: whether that is fine is yours to say."""
        path = f"/api/v1/agent_instance/{_check_id(agent_instance_id, 'agent_instance_id')}/finish"
        body = _drop_none(
            status=_check_choice(status, _FINISH_STATUSES, "status"),
            timestamp=_timestamp(timestamp, "timestamp"),
            idempotency_key=self._client._key(idempotency_key),
        )
        return self._one(AgentInstance, "POST", path, "agent_instances.finish", body)

    def get(self, agent_instance_id: str) -> AgentInstance:
        """Fetch one instance (status, termination_reason, span counts)."""
        path = f"/api/v1/agent_instance/{_check_id(agent_instance_id, 'agent_instance_id')}"
        return self._one(AgentInstance, "GET", path, "agent_instances.get")

    def record_quality(
        self,
        agent_instance_id: str,
        name: str,
        payload: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AgentInstance:
        """Set (or with ``payload=None`` clear) one named quality payload."""
        path = f"/api/v1/agent_instance/{_check_id(agent_instance_id, 'agent_instance_id')}/record_quality"
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string")
        body = {
            "name": name,
            "payload": _check_mapping(payload, "payload"),
            "idempotency_key": self._client._key(idempotency_key),
        }
        return self._one(AgentInstance, "POST", path, "agent_instances.record_quality", body)


class _AgentSpans(_Group):
    """``client.agent_spans``: create, finish."""

    __slots__ = ()

    def _post(
        self, path: str, body: dict[str, Any], operation: str, callback: Callable[[str | None], None] | None
    ) -> AgentSpan:
        data = self._client._call("POST", path, body=body, operation=operation)
        control = data.get("control")
        if callback is not None and isinstance(control, dict) and control.get("terminate"):
            callback(control.get("reason"))  # before details: the signal must not be lost
        return _details(AgentSpan, data, operation)

    def create(
        self,
        agent_instance_id: str,
        schema_name: str,
        status: AgentStatus,
        payload: Mapping[str, Any] | None = None,
        result_payload: Mapping[str, Any] | None = None,
        id: str | None = None,
        parent_span_id: str | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        idempotency_key: str | None = None,
        *,
        control_signal_callback: Callable[[str | None], None] | None = None,
    ) -> AgentSpan:
        """Record a span. ``control_signal_callback(reason)`` runs when the server
        says the instance was terminated."""
        _check_id(agent_instance_id, "agent_instance_id")
        if not isinstance(schema_name, str) or not schema_name:
            raise ValueError("schema_name must be a non-empty string")
        if status not in _AGENT_STATUSES:
            raise ValueError(f"status must be one of {', '.join(_AGENT_STATUSES)}; got {status!r}")
        key = self._client._key(idempotency_key)
        details = _drop_none(
            agent_instance_id=agent_instance_id,
            schema_name=schema_name,
            status=status,
            payload=_check_mapping(payload, "payload") or {},
            result_payload=_check_mapping(result_payload, "result_payload"),
            id=id,
            parent_span_id=parent_span_id,
            started_at=_timestamp(started_at, "started_at"),
            finished_at=_timestamp(finished_at, "finished_at"),
            idempotency_key=key,
        )
        # The key goes both inside details (Python SDK) and at the top (TS SDK).
        body = {"details": details, "idempotency_key": key}
        return self._post("/api/v1/agent_spans", body, "agent_spans.create", control_signal_callback)

    def finish(
        self,
        agent_span_id: str,
        status: FinishStatus | None = None,
        result_payload: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
        idempotency_key: str | None = None,
        *,
        control_signal_callback: Callable[[str | None], None] | None = None,
    ) -> AgentSpan:
        """Finish a span. A 409 (already finished) is PrefactorConflictError."""
        path = f"/api/v1/agent_spans/{_check_id(agent_span_id, 'agent_span_id')}/finish"
        body = _drop_none(
            status=_check_choice(status, _FINISH_STATUSES, "status"),
            result_payload=_check_mapping(result_payload, "result_payload"),
            timestamp=_timestamp(timestamp, "timestamp"),
            idempotency_key=self._client._key(idempotency_key),
        )
        return self._post(path, body, "agent_spans.finish", control_signal_callback)


class _Agents(_Group):
    """``client.agents``: create, get, update, show, list, retire, reinstate, delete."""

    __slots__ = ()

    def _path(self, agent_id: str, action: str = "") -> str:
        return f"/api/v1/agent/{_check_id(agent_id, 'agent_id')}{action}"

    def create(self, details: Mapping[str, Any], idempotency_key: str | None = None) -> Agent:
        """Create an agent; ``details`` needs ``name``."""
        fields = _details_arg(details)
        if not fields.get("name"):
            raise ValueError("details['name'] is required")
        body = {"details": fields, "idempotency_key": self._client._key(idempotency_key)}
        return self._one(Agent, "POST", "/api/v1/agent", "agents.create", body)

    def get(self, agent_id: str) -> Agent:
        """One agent by id."""
        return self._one(Agent, "GET", self._path(agent_id), "agents.get")

    def update(self, agent_id: str, details: Mapping[str, Any], idempotency_key: str | None = None) -> Agent:
        """Change name, description, owner, risk profile or team (PUT)."""
        body = {"details": _details_arg(details), "idempotency_key": self._client._key(idempotency_key)}
        return self._one(Agent, "PUT", self._path(agent_id), "agents.update", body)

    def show(
        self,
        *,
        agent_id: str | None = None,
        external_identifier: str | None = None,
        environment_id: str | None = None,
        include_counts: bool = False,
        include_risk_rollup: bool = False,
    ) -> Agent:
        """Look an agent up by exactly one of ``agent_id`` / ``external_identifier``."""
        if (agent_id is None) == (external_identifier is None):
            raise ValueError("give exactly one of agent_id and external_identifier")
        query = _drop_none(
            agent_id=agent_id,
            external_identifier=external_identifier,
            environment_id=environment_id,
            include_counts=include_counts or None,
            include_risk_rollup=include_risk_rollup or None,
        )
        return self._one(Agent, "GET", "/api/v1/agent/show", "agents.show", query=query)

    def _action(self, agent_id: str, action: str, method: str, key: str | None) -> Agent:
        # The key goes in the body, for DELETE too (as upstream): a retried delete
        # whose answer was lost gets the first answer again, not a 404.
        body = {"idempotency_key": self._client._key(key)}
        return self._one(Agent, method, self._path(agent_id, action), "agents." + (action.strip("/") or "delete"), body)

    def retire(self, agent_id: str, idempotency_key: str | None = None) -> Agent:
        """Retire an agent (POST /api/v1/agent/{id}/retire)."""
        return self._action(agent_id, "/retire", "POST", idempotency_key)

    def reinstate(self, agent_id: str, idempotency_key: str | None = None) -> Agent:
        """Reinstate a retired agent."""
        return self._action(agent_id, "/reinstate", "POST", idempotency_key)

    def delete(self, agent_id: str, idempotency_key: str | None = None) -> Agent:
        """Delete an agent (DELETE); a lost answer retried is not "not found"."""
        return self._action(agent_id, "", "DELETE", idempotency_key)

    _FILTERS = ("risk_profile_id", "team_id", "owner_person_id", "sorting")  # list_agents' filters, in order

    def _page(self, offset: int | None, page_size: int | None, *filters: str | None) -> ListResponse:
        if page_size is not None and not (type(page_size) is int and 1 <= page_size <= 100):
            raise ValueError(f"page_size must be an integer from 1 to 100, got {page_size!r}")
        if offset is not None and not (type(offset) is int and offset >= 0):
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        query = _drop_none(**dict(zip(self._FILTERS, filters)))
        query.update(_drop_none(**{"pagination[offset]": offset, "pagination[page_size]": page_size}))
        data = self._client._call("GET", "/api/v1/agent", query=query, operation="agents.list_agents")
        page: ListResponse = _build(ListResponse, data, "agents.list_agents response")
        if not isinstance(page.summaries, list):
            raise PrefactorResponseContractError("agents.list_agents: 'summaries' is not a list")
        page.summaries = [_build(AgentSummary, row, f"summaries[{i}]") for i, row in enumerate(page.summaries)]
        return page

    def list_agents(
        self,
        risk_profile_id: str | None = None,
        team_id: str | None = None,
        owner_person_id: str | None = None,
        sorting: str | None = None,
        offset: int | None = None,
        page_size: int | None = None,
    ) -> list[AgentSummary]:
        """One page of agents."""
        return self._page(offset, page_size, risk_profile_id, team_id, owner_person_id, sorting).summaries

    def iter_agents(
        self,
        risk_profile_id: str | None = None,
        team_id: str | None = None,
        owner_person_id: str | None = None,
        sorting: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[AgentSummary]:
        """Every agent, page by page; a page is fetched when the last is used up."""
        offset: int | None = None
        while True:
            page = self._page(offset, page_size, risk_profile_id, team_id, owner_person_id, sorting)
            yield from page.summaries
            following = page.pagination.next_page_offset if page.pagination else None
            if following is None or not page.summaries:
                return
            if not isinstance(following, int) or following <= (offset or 0):
                what = following if isinstance(following, int) else type(following).__name__  # a str may be a secret
                raise PrefactorResponseContractError(f"agents.list_agents: next_page_offset {what} is no step forward")
            offset = following


class _Bulk(_Group):
    """``client.bulk``: many writes in one request."""

    __slots__ = ()

    def execute(self, request: BulkRequest | Sequence[BulkItem | Mapping[str, Any]]) -> BulkResponse:
        """Send the items in order; the server stops at the first that fails.
        Items with no entry in ``outputs`` were not processed."""
        if not isinstance(request, BulkRequest):
            request = BulkRequest(request)
        data = self._client._call("POST", "/api/v1/bulk", body=request.to_dict(), operation="bulk.execute")
        response: BulkResponse = _build(BulkResponse, data, "bulk.execute response")
        if not isinstance(response.outputs, dict):
            raise PrefactorResponseContractError("bulk.execute: 'outputs' is not an object")
        items = enumerate(response.outputs.items())  # named by index: a key sent back may be a secret
        response.outputs = {k: _build(BulkOutput, v, f"outputs[{i}]") for i, (k, v) in items}
        return response


def _details(cls: type[_R], data: dict[str, Any], operation: str) -> _R:
    if "details" not in data:
        raise PrefactorResponseContractError(f"{operation}: response has no 'details'")
    return _build(cls, data["details"], f"{operation} details")  # type: ignore[no-any-return]


def _details_arg(details: Any) -> dict[str, Any]:
    if isinstance(details, _RequestModel):
        return details.to_dict()
    if not hasattr(details, "keys"):
        raise TypeError(f"details must be a dict, got {type(details).__name__}")
    return {k: v for k, v in dict(details).items() if v is not None}


# ============================================================================ #
# Client
# ============================================================================ #


_LOGGER: logging.Logger | None = None


def _logger() -> logging.Logger | None:
    """The library logger, once the application has imported logging: an
    application that never did cannot have enabled it."""
    global _LOGGER
    if _LOGGER is None and "logging" in sys.modules:
        _LOGGER = sys.modules["logging"].getLogger("prefactor_http")
    return _LOGGER


class PrefactorHttpClient:
    """The synchronous client: ``with PrefactorHttpClient(config) as client: ...``.
    Share one between threads: each thread gets its own keep-alive connection."""

    def __init__(self, config: HttpClientConfig, *, sdk_header: str | None = None) -> None:
        if not isinstance(config, HttpClientConfig):
            raise TypeError("config must be an HttpClientConfig")
        self.config = config
        self.sdk_header = sdk_header
        headers = [
            ("Authorization", "Bearer " + config.api_token),
            ("Accept", "application/json"),
            ("User-Agent", f"prefactor-http-stdlib/{__version__} python/{_PYTHON}"),
        ]
        self._transport = _Transport(config, headers)
        self._closed = False
        self._sleep: Callable[[float], None] = time.sleep  # injectable for tests
        self._random: Callable[[], float] = _random

    # The groups are made on each access, not kept: a kept group would point back at
    # the client, and a dropped, unclosed client would hold its sockets until gc ran.
    @property
    def agent_instances(self) -> _AgentInstances:
        return _AgentInstances(self)

    @property
    def agent_spans(self) -> _AgentSpans:
        return _AgentSpans(self)

    @property
    def agents(self) -> _Agents:
        return _Agents(self)

    @property
    def bulk(self) -> _Bulk:
        return _Bulk(self)

    def __enter__(self) -> PrefactorHttpClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrefactorHttpClient(api_url={self.config.api_url!r})"

    @property
    def sdk_header(self) -> str | None:
        """``X-Prefactor-SDK`` entries before this client's own; settable, also as ``_sdk_header``."""
        return self._sdk

    @sdk_header.setter
    def sdk_header(self, value: str | None) -> None:
        entry = f"{(value or '').strip()} prefactor-http-stdlib@{__version__}".lstrip()
        _check_header_value("sdk_header", entry)
        self._sdk, self._sdk_line = value, f"X-Prefactor-SDK: {entry}\r\n".encode()

    _sdk_header = sdk_header

    def close(self) -> None:
        """Close every pooled connection; later calls raise PrefactorClientError."""
        self._closed = True
        self._transport.close()

    def validate_token(self) -> dict[str, Any]:
        """GET /api/v1/ping: the response body; PrefactorAuthError if refused."""
        return self._call("GET", "/api/v1/ping", operation="validate_token")

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_data: Any = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Call any endpoint with the client's retries and errors: the escape hatch.
        A mutating call's JSON-object body gets an ``idempotency_key`` (yours, its
        ``details``' or one made for this call) unless it has one; the key also goes
        in an ``Idempotency-Key`` header, as upstream. A mutating call whose body cannot
        carry a key (none, a list) is not retried once it may have reached the server."""
        method = method.upper()
        if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ValueError(f"unsupported method {method!r}")
        if not isinstance(path, str) or not re.fullmatch(r'/[!"$-~]*', path):  # printable ASCII, no space or '#'
            raise ValueError(f"path must start with '/' and hold no spaces or '#', got {path!r}")
        keyed = isinstance(json_data, dict)  # only a JSON object can carry the key
        body = json_data if keyed else {}
        inner = body["details"].get("idempotency_key") if isinstance(body.get("details"), dict) else None
        given = [k for k in (idempotency_key, body.get("idempotency_key"), inner) if k is not None]  # all must agree
        if any(k != given[0] for k in given):
            raise ValueError(f"{method} {path}: idempotency_key and the key in json_data differ")
        key = self._key(given[0] if given else None) if given or method != "GET" else None
        if key and keyed and body.get("idempotency_key") is None:  # span create's key in details goes on top too
            json_data = {**body, "idempotency_key": key}
        extra = [("Idempotency-Key", key)] if key else None
        resend = keyed or method == "GET"  # a mutation whose body cannot carry the key is sent at most once
        op = f"{method} {path}"
        return self._call(method, path, body=json_data, query=params, operation=op, extra_headers=extra, resend=resend)

    def _key(self, key: str | None) -> str:
        """The caller's key, checked, or a new one made once per call."""
        if key is None:
            return (self.config.default_idempotency_key or "") + _uuid4()
        return _check_key(key)

    def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
        resend: bool = True,
    ) -> dict[str, Any]:
        """Send with retries: one flat loop of send, decide, log, sleep. With
        ``resend=False`` only an attempt that sent nothing is retried."""
        if self._closed:
            raise PrefactorClientError("the client is closed")
        if query:
            path += ("&" if "?" in path else "?") + urlencode({k: _query_value(v) for k, v in query.items()})
        payload = None
        head = b"\r\n" if method == "GET" else b"Content-Length: 0\r\n\r\n"
        if body is not None:
            payload = _encode_body(body, operation)
            head = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
        if extra_headers:
            head = "".join(f"{k}: {v}\r\n" for k, v in extra_headers).encode() + head
        head = self._sdk_line + head
        config = self.config
        total_deadline = _monotonic() + config.total_timeout if config.total_timeout else float("inf")
        attempt, free = 0, resend  # free: one resend that costs no retry (promise 1)
        while True:
            began = _monotonic()
            deadline = min(began + config.request_timeout, total_deadline)
            limit = "total_timeout" if deadline == total_deadline else "request_timeout"
            timeout_text = f"no answer within {limit}={getattr(config, limit)}s"  # config may change between calls
            try:
                status, result = self._interpret(  # the body goes straight in: no local here holds it
                    *self._transport.round_trip(method, path, head, payload, deadline, timeout_text), method, path
                )
            except PrefactorHttpError as error:
                self._log(method, path, attempt, began, error)
                if error._stale and free:  # a kept-alive connection had died: send again at once
                    free = False
                    continue
                delay = self._retry_delay(error, attempt, total_deadline)
                if delay is None or not (resend or error._unsent):
                    raise
                if attempt >= config.max_retries:
                    if config.max_retries == 0:
                        raise
                    raise PrefactorRetryExhaustedError(
                        f"{operation} failed after {attempt + 1} attempts: {error}", error
                    ) from error
                self._sleep(delay)
                if self._closed:
                    raise PrefactorClientError("the client was closed during the call") from error
                attempt += 1
                continue
            self._log(method, path, attempt, began, status)
            return result

    def _retry_delay(self, error: PrefactorHttpError, attempt: int, total_deadline: float) -> float | None:
        """Seconds to wait before the next attempt, or None: raise ``error`` now."""
        config = self.config
        if isinstance(error, PrefactorConnectionError):
            retryable = error.transient
        else:  # an error answer (API or contract) whose status the config lists; any other error is not
            retryable = getattr(error, "status_code", None) in config.retry_on_status_codes
        retry_after = getattr(error, "retry_after", None)
        if not retryable or (retry_after is not None and retry_after > config.max_retry_delay):
            return None  # not retryable, or the server asks for more patience than we were given
        if attempt >= config.max_retries:
            return 0.0  # retryable, but the attempts are spent: the caller decides
        delay = _backoff(config, attempt, self._random) if retry_after is None else retry_after
        return None if _monotonic() + delay >= total_deadline else delay

    def _interpret(self, response: _Response, data: bytes, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """A 2xx answer's status and JSON object, or our error, raised with no local holding the body."""
        status, redact, headers = response.status, self._transport.redact, response.headers
        kind = headers.get("content-type") or "no content type"
        if 200 <= status < 300:
            try:
                result = _load_json(data)
            except (ValueError, RecursionError, MemoryError) as exc:  # not JSON, too deep, too many values:
                # the error holds the raw body (.doc, .object), so it is neither kept nor chained
                result = ValueError(redact(str(exc)))
            if isinstance(result, dict):
                return status, result
            cause = result if isinstance(result, ValueError) else None
            quoted = _snippet(redact(data))
            expected = f"JSON, got {kind}: {quoted}" if cause else f"a JSON object, got {type(result).__name__}"
            del data, result
            raise PrefactorResponseContractError(
                redact(f"{method} {path}: expected {expected}"), status_code=status, body_snippet=quoted, cause=cause
            )
        text = redact(data)
        del data
        try:
            envelope = _load_json(text.encode())
        except (ValueError, RecursionError, MemoryError):
            envelope = None
        snippet = None if isinstance(envelope, dict) else _snippet(text)
        envelope = envelope if isinstance(envelope, dict) else {}
        message = envelope.get("message") or envelope.get("error")
        if status == 407 and self._transport.proxy:  # the proxy's own answer (plain HTTP through it)
            message = "{} {}: proxy {}:{} asks for credentials (407)".format(method, path, *self._transport.proxy)
        if not message and 300 <= status < 400:
            target = _snippet(redact(headers.get("location") or "?"))
            message = f"{method} {path}: redirect to {target} not followed"
        if not message:
            message = f"{method} {path}: HTTP {status} ({kind})" + (f": {snippet}" if snippet else "")
        retry_after = _parse_retry_after(headers.get("retry-after"))
        cls = _STATUS_ERRORS.get(status, PrefactorApiError)
        code, errors = str(envelope.get("code") or "unknown"), envelope.get("errors")
        raise cls(redact(str(message)), code, status, errors, retry_after=retry_after, body_snippet=snippet)

    def _log(self, method: str, path: str, attempt: int, began: float, outcome: Any) -> None:
        log = _logger()
        if log is not None and log.isEnabledFor(10):  # logging.DEBUG
            elapsed = (_monotonic() - began) * 1000
            if isinstance(outcome, BaseException):
                outcome = f"{type(outcome).__name__}: {self._transport.redact(str(outcome))}"
            log.debug("%s %s -> %s in %.1f ms (attempt %d)", method, path.split("?")[0], outcome, elapsed, attempt + 1)


def _query_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _snippet(text: str) -> str:
    collapsed = " ".join(text.split())
    return collapsed if len(collapsed) <= _SNIPPET_LENGTH else collapsed[:_SNIPPET_LENGTH] + "..."


# ============================================================================ #
# Async facade
# ============================================================================ #


class _Call(threading.local):
    stop = threading.Event()  # never set; AsyncPrefactorHttpClient's workers set their call's own

    def sleep(self, delay: float) -> None:  # an async call's backoff wait: it ends with the call
        if self.stop.wait(delay):
            raise PrefactorClientError("the call was cancelled (or its client closed)")


_CALL = _Call()


class _Stop(threading.Event):
    """Set when the task awaiting a call is cancelled (or its client closed): the
    call stops at its next step, as AsyncPrefactorHttpClient says."""

    thread: int | None = None  # the worker running the call, while it runs
    lock = threading.Lock()

    def run(self, function: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        self.thread = threading.get_ident()  # before the check below: cancel() then sees it
        _CALL.stop = self
        try:
            _CALL.sleep(0)  # raises if cancelled as it left the queue
            return function(*args, **kwargs)
        finally:
            del _CALL.stop
            with self.lock:
                self.thread = None

    def cancel(self, transport: _Transport) -> None:
        with self.lock:
            self.set()
            for sock in transport._open.copy() if self.thread else ():  # others change it meanwhile
                _shutdown(sock, self.thread)  # the read waiting for an answer ends now


def _aio(method: Callable[Concatenate[Any, _P], _R]) -> Callable[Concatenate[_AsyncGroup, _P], Coroutine[Any, Any, _R]]:
    """The awaitable twin of a sync method, with its signature and docstring."""

    async def call(self: _AsyncGroup, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await self._workers.run(method, self._group, *args, **kwargs)

    return update_wrapper(call, method)


def _aiter(
    method: Callable[Concatenate[Any, _P], Iterator[_R]],
) -> Callable[Concatenate[_AsyncGroup, _P], AsyncIterator[_R]]:
    """The async twin of a sync generator method: each item is fetched in a worker."""

    async def call(self: _AsyncGroup, /, *args: _P.args, **kwargs: _P.kwargs) -> AsyncIterator[_R]:
        items = method(self._group, *args, **kwargs)
        while (item := await self._workers.run(next, items, None)) is not None:
            yield item

    return update_wrapper(call, method)


class _Workers:
    """An async client's worker threads, made on first use, and its calls under way.
    Nothing here points back at the client: dropped unclosed, it is freed at once."""

    def __init__(self, sync: PrefactorHttpClient, size: int) -> None:
        self.sync, self.size = sync, size
        self.pool: ThreadPoolExecutor | None = None
        self.calls: set[_Stop] = set()

    async def run(self, function: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        import asyncio

        if self.sync._closed:
            raise PrefactorClientError("the client is closed")
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.size, "prefactor-http")
        stop = _Stop()
        self.calls.add(stop)
        try:
            return await asyncio.wrap_future(self.pool.submit(stop.run, function, *args, **kwargs))
        except asyncio.CancelledError:
            stop.cancel(self.sync._transport)  # (a queued call was withdrawn from the pool)
            raise
        finally:
            self.calls.discard(stop)

    def close(self) -> None:
        for stop in list(self.calls):
            stop.cancel(self.sync._transport)
        self.sync.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)  # soon: their waits and sockets were ended above


class _AsyncGroup:
    def __init__(self, workers: _Workers, group: Any) -> None:
        self._workers, self._group = workers, group


class _AsyncAgentInstances(_AsyncGroup):
    register = _aio(_AgentInstances.register)
    start = _aio(_AgentInstances.start)
    finish = _aio(_AgentInstances.finish)
    get = _aio(_AgentInstances.get)
    record_quality = _aio(_AgentInstances.record_quality)


class _AsyncAgentSpans(_AsyncGroup):
    create = _aio(_AgentSpans.create)
    finish = _aio(_AgentSpans.finish)


class _AsyncAgents(_AsyncGroup):
    create = _aio(_Agents.create)
    get = _aio(_Agents.get)
    update = _aio(_Agents.update)
    show = _aio(_Agents.show)
    retire = _aio(_Agents.retire)
    reinstate = _aio(_Agents.reinstate)
    delete = _aio(_Agents.delete)
    list_agents = _aio(_Agents.list_agents)
    iter_agents = _aiter(_Agents.iter_agents)


class _AsyncBulk(_AsyncGroup):
    execute = _aio(_Bulk.execute)


class AsyncPrefactorHttpClient(_AsyncGroup):
    """The same groups and methods, awaitable: ``async with`` and ``await``.

    Calls run the sync client in this client's own worker threads, up to
    ``max_concurrency`` at once; the threads start with the first call and end,
    with their connections, at ``close()``. Cancelling an awaited call stops it at
    its next step, with no further attempt: queued, it never starts; connecting,
    the connection is closed unused; waiting for the answer, its socket is shut
    down; in backoff, the wait ends. What was sent may still have been stored.
    """

    def __init__(self, config: HttpClientConfig, *, sdk_header: str | None = None, max_concurrency: int = 100) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        self._sync = sync = PrefactorHttpClient(config, sdk_header=sdk_header)
        sync._sleep = _CALL.sleep
        super().__init__(_Workers(sync, max_concurrency), sync)
        self.config = config
        self.agent_instances = _AsyncAgentInstances(self._workers, sync.agent_instances)
        self.agent_spans = _AsyncAgentSpans(self._workers, sync.agent_spans)
        self.agents = _AsyncAgents(self._workers, sync.agents)
        self.bulk = _AsyncBulk(self._workers, sync.bulk)

    async def __aenter__(self) -> AsyncPrefactorHttpClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncPrefactorHttpClient(api_url={self.config.api_url!r})"

    sdk_header = _sdk_header = property(
        lambda self: self._sync.sdk_header, lambda self, value: setattr(self._sync, "sdk_header", value)
    )

    validate_token = _aio(PrefactorHttpClient.validate_token)
    request = _aio(PrefactorHttpClient.request)

    async def close(self) -> None:
        """Stop the calls under way, close the connections, end the worker threads."""
        self._workers.close()


# ============================================================================ #
# LocalApiServer: a stand-in for the API on loopback
# ============================================================================ #

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def _pfid() -> str:
    """A PFID-shaped id: 48-bit milliseconds, then 112 random bits, in base32."""
    value = int(time.time() * 1000) << 112 | int.from_bytes(os.urandom(14), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(155, -1, -5))


def _now_text() -> str:
    return datetime.now(_UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class _Reject(Exception):
    """An error answer of the stand-in: status, code, message, field errors."""

    def __init__(self, status: int, code: str, message: str, errors: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def envelope(self) -> dict[str, Any]:
        return _drop_none(status="error", code=self.code, message=self.message, errors=self.errors)


_TERMINAL = ("complete", "failed", "cancelled", "terminated")


def _find(records: dict[str, dict[str, Any]], record_id: str, what: str) -> dict[str, Any]:
    """The stored instance, span or agent with this id, or the stand-in's 404."""
    if record_id not in records:
        raise _Reject(404, "not_found", f"{what} {record_id} not found")
    return records[record_id]


class LocalApiServer:
    """An in-process stand-in for the Prefactor API on 127.0.0.1 (a free port).

    ``with LocalApiServer() as api: client = PrefactorHttpClient(api.config())``.
    It keeps what it stores in ``instances``, ``spans`` and ``agents`` (dicts by
    id, in the API's shape) and every request in ``requests``; it checks the
    bearer token, replays the first answer for a repeated idempotency key, runs
    bulk items in order and stops at the first error, and enforces the instance
    and span lifecycles. Faults: ``fail_next`` (an error status), ``drop_next``
    (close the connection before or after processing, or right after answering).
    """

    def __init__(self, token: str = "local-token", *, port: int = 0) -> None:
        self.token = token
        self.instances: dict[str, dict[str, Any]] = {}
        self.spans: dict[str, dict[str, Any]] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self._replies: dict[tuple[str, ...], tuple[int, dict[str, Any]]] = {}
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._port = port
        self._server: Any = None
        self._ids = {"account_id": _pfid(), "environment_id": _pfid(), "agent_deployment_id": _pfid()}

    # -- lifecycle -------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise PrefactorClientError("LocalApiServer is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalApiServer:
        """Listen and serve in a daemon thread (imports http.server only now)."""
        import http.server

        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave without delay
            timeout = 60  # an idle keep-alive connection is let go after this

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload, headers, after = api._dispatch(self.command, self.path, self.headers, raw)
                if status:
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    headers.update({"Content-Type": "application/json", "Content-Length": str(len(data))})
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                self.close_connection = self.close_connection or after is not None

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = serve

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="LocalApiServer", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalApiServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def config(self, **overrides: Any) -> HttpClientConfig:
        """A config for this server; retry delays are short unless overridden."""
        fast = {"trust_env": False, "initial_retry_delay": 0.01, "max_retry_delay": 0.5}
        return HttpClientConfig(**{"api_url": self.url, "api_token": self.token, **fast, **overrides})

    # -- faults ----------------------------------------------------------------
    def fail_next(
        self, status: int, times: int = 1, retry_after: float | str | None = None, path: str | None = None
    ) -> None:
        """Answer the next ``times`` requests (on ``path``, or any) with ``status``."""
        self._add_fault(kind="status", status=status, times=times, retry_after=retry_after, path=path)

    def drop_next(self, times: int = 1, *, when: str = "before", path: str | None = None) -> None:
        """Close the connection of the next ``times`` requests without answering:
        ``before`` processing, ``after`` processing (the record is kept), or
        ``idle``: answer, then close the kept-alive connection."""
        if when not in ("before", "after", "idle"):
            raise ValueError("when must be 'before', 'after' or 'idle'")
        self._add_fault(kind=when, times=times, path=path)

    def _add_fault(self, **fault: Any) -> None:
        if fault["times"] > 0:  # times=0 injects nothing
            with self._lock:
                self._faults.append(fault)

    def terminate(self, instance_id: str, reason: str) -> None:
        """Terminate an instance: later span responses carry ``control``."""
        with self._lock:
            instance = self.instances[instance_id]
            instance.update(status="terminated", termination_reason=reason, updated_at=_now_text())

    # -- dispatch ----------------------------------------------------------------
    def _take_fault(self, path: str) -> dict[str, Any]:
        for fault in self._faults:
            if fault["path"] in (None, path):
                fault["times"] -= 1
                if fault["times"] <= 0:
                    self._faults.remove(fault)
                return fault
        return {"kind": None}

    def _dispatch(
        self, method: str, target: str, headers: Any, raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str], str | None]:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query))
        with self._lock:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = _Reject(400, "invalid_json", "the request body is not JSON")
            self.requests.append(
                {"method": method, "path": parts.path, "query": query, "headers": dict(headers.items()), "body": body}
            )
            fault = self._take_fault(parts.path)
            kind = fault["kind"]
            if kind == "before":
                return 0, {}, {}, "close"
            if kind == "status":
                extra = {} if fault["retry_after"] is None else {"Retry-After": str(fault["retry_after"])}
                message = f"injected fault: HTTP {fault['status']}"
                return fault["status"], _Reject(0, "injected", message).envelope(), extra, None
            if headers.get("Authorization") != "Bearer " + self.token:
                return 401, _Reject(0, "unauthorized", "missing or invalid API token").envelope(), {}, None
            status, payload = self._answer(method, unquote(parts.path), query, body)
            if kind == "after":  # processed and stored, but the answer is lost
                return 0, {}, {}, "close"
            return status, payload, {}, ("close" if kind == "idle" else None)

    def _answer(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, dict[str, Any]]:
        """Route one request; replay a repeated idempotency key's first answer."""
        key = body.get("idempotency_key") if isinstance(body, dict) else None
        if key is None and isinstance(body, dict) and isinstance(body.get("details"), dict):
            key = body["details"].get("idempotency_key")
        if key is not None and (method, path, key) in self._replies:
            return self._replies[method, path, key]
        try:
            if isinstance(body, _Reject):
                raise body
            for verb, pattern, handler in _ROUTES:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    answer = 200, handler(self, body if isinstance(body, dict) else {}, query, *match.groups())
                    break
            else:
                raise _Reject(404, "not_found", f"no route for {method} {path}")
        except _Reject as reject:
            answer = reject.status, reject.envelope()
        except Exception as exc:  # a handler's bug is a 500 with an envelope, as a real server's would be
            answer = 500, _Reject(0, "internal_error", f"{type(exc).__name__}: {exc}").envelope()
        if key is not None:  # a copy: a replay is the first answer as sent, not the record as it is now
            answer = self._replies[method, path, key] = (answer[0], json.loads(json.dumps(answer[1])))
        return answer

    # -- endpoints -----------------------------------------------------------------
    def _count(self, span: dict[str, Any], old: str | None) -> None:
        """Keep the instance's span_counts current as a span is created or finished."""
        counts = self.instances[span["agent_instance_id"]]["span_counts"]
        if old is None:
            counts["total"] += 1
        else:
            counts[old] = counts.get(old, 0) - 1
        counts[span["status"]] = counts.get(span["status"], 0) + 1
        counts["finished"] = counts["complete"] + counts["failed"] + counts["cancelled"]

    def _register(self, body: dict[str, Any], query: Any) -> dict[str, Any]:
        version = body.get("agent_version")
        if not isinstance(version, dict):
            raise _Reject(422, "validation_error", "agent_version is required", {"agent_version": ["is required"]})
        now = _now_text()
        instance = {
            "type": "agent_instance",
            "id": body.get("id") or _pfid(),
            **self._ids,
            "agent_id": body.get("agent_id") or _pfid(),
            "agent_version_id": _pfid(),
            "status": "pending",
            "inserted_at": now,
            "updated_at": now,
            **dict.fromkeys(("started_at", "finished_at", "termination_reason")),
            "purpose": body.get("purpose", "live"),
            "external_identifier": body.get("external_identifier"),
            "quality_payloads": {},
            "span_counts": dict.fromkeys(("total", "active", "complete", "failed", "cancelled", "finished"), 0),
            "quality_summaries": {},
        }
        self.instances[instance["id"]] = instance
        return {"status": "success", "details": instance}

    def _start(self, body: dict[str, Any], query: Any, instance_id: str) -> dict[str, Any]:
        instance = _find(self.instances, instance_id, "agent instance")
        if instance["status"] != "pending":
            raise _Reject(409, "invalid_action", f"cannot start an instance that is {instance['status']}")
        instance.update(status="active", started_at=body.get("timestamp") or _now_text(), updated_at=_now_text())
        return {"status": "success", "details": instance}

    def _finish_instance(self, body: dict[str, Any], query: Any, instance_id: str) -> dict[str, Any]:
        instance = _find(self.instances, instance_id, "agent instance")
        if instance["status"] in _TERMINAL:
            raise _Reject(409, "invalid_action", f"agent instance is already {instance['status']}")
        if instance["status"] != "active":
            raise _Reject(
                422, "validation_error", "agent instance must be active to finish", {"status": ["must be active"]}
            )
        status = body.get("status") or "complete"
        if status not in _FINISH_STATUSES:
            raise _Reject(422, "validation_error", f"invalid status {status!r}", {"status": ["is invalid"]})
        instance.update(status=status, finished_at=body.get("timestamp") or _now_text(), updated_at=_now_text())
        return {"status": "success", "details": instance}

    def _get_instance(self, body: Any, query: Any, instance_id: str) -> dict[str, Any]:
        return {"status": "success", "details": _find(self.instances, instance_id, "agent instance")}

    def _record_quality(self, body: dict[str, Any], query: Any, instance_id: str) -> dict[str, Any]:
        instance = _find(self.instances, instance_id, "agent instance")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _Reject(422, "validation_error", "name is required", {"name": ["is required"]})
        if body.get("payload") is None:
            instance["quality_payloads"].pop(name, None)
        else:
            instance["quality_payloads"][name] = body["payload"]
        return {"status": "success", "details": instance}

    def _control(self, instance_id: str, answer: dict[str, Any]) -> dict[str, Any]:
        instance = self.instances.get(instance_id) or {}
        if instance.get("status") == "terminated":
            answer["control"] = {"terminate": True, "reason": instance.get("termination_reason")}
        return answer

    def _create_span(self, body: dict[str, Any], query: Any) -> dict[str, Any]:
        details = body.get("details")
        if not isinstance(details, dict):
            raise _Reject(422, "validation_error", "details is required", {"details": ["is required"]})
        problems = {
            name: ["is required"] for name in ("agent_instance_id", "schema_name", "status") if not details.get(name)
        }
        if details.get("status") and details["status"] not in _AGENT_STATUSES:
            problems["status"] = ["is invalid"]
        if problems:
            raise _Reject(422, "validation_error", "invalid span", problems)
        instance = _find(self.instances, details["agent_instance_id"], "agent instance")
        now = _now_text()
        span = {
            "type": "agent_span",
            "id": details.get("id") or _pfid(),
            "account_id": instance["account_id"],
            "agent_id": instance["agent_id"],
            "agent_instance_id": instance["id"],
            "parent_span_id": details.get("parent_span_id"),
            "schema_name": details["schema_name"],
            "schema_title": None,
            "status": details["status"],
            "payload": details.get("payload") or {},
            "result_payload": details.get("result_payload"),
            "summary": None,
            "started_at": details.get("started_at") or now,
            "finished_at": details.get("finished_at"),
            "inserted_at": now,
            "updated_at": now,
        }
        self.spans[span["id"]] = span
        self._count(span, None)
        return self._control(instance["id"], {"status": "success", "details": span})

    def _finish_span(self, body: dict[str, Any], query: Any, span_id: str) -> dict[str, Any]:
        span = _find(self.spans, span_id, "agent span")
        old, status = span["status"], body.get("status") or "complete"
        if old in _TERMINAL:
            raise _Reject(409, "invalid_action", f"agent span is already {old}")
        if status not in _FINISH_STATUSES or (old == "pending" and status != "cancelled"):
            raise _Reject(
                422, "validation_error", f"cannot finish a {old} span as {status}", {"status": ["is invalid"]}
            )
        span.update(status=status, finished_at=body.get("timestamp") or _now_text(), updated_at=_now_text())
        self._count(span, old)
        if body.get("result_payload") is not None:
            span["result_payload"] = body["result_payload"]
        return self._control(span["agent_instance_id"], {"status": "success", "details": span})

    def _ping(self, body: Any, query: Any) -> dict[str, Any]:
        return {"status": "success"}

    def _create_agent(self, body: dict[str, Any], query: Any) -> dict[str, Any]:
        details = body.get("details")
        if not isinstance(details, dict) or not details.get("name"):
            raise _Reject(422, "validation_error", "details.name is required", {"name": ["is required"]})
        now = _now_text()
        agent = {
            "type": "agent",
            **dict.fromkeys(("description", "external_identifier", "owner_person_id", "risk_profile_id", "team_id")),
            **details,
            "id": details.get("id") or _pfid(),
            "status": "active",
            "inserted_at": now,
            "updated_at": now,
        }
        self.agents[agent["id"]] = agent
        return {"status": "success", "details": agent}

    def _agent_by_id(self, body: dict[str, Any], query: Any, agent_id: str) -> dict[str, Any]:
        return {"status": "success", "details": _find(self.agents, agent_id, "agent")}

    def _update_agent(self, body: dict[str, Any], query: Any, agent_id: str) -> dict[str, Any]:
        agent = _find(self.agents, agent_id, "agent")
        details = body.get("details") or {}
        if "external_identifier" in details:
            raise _Reject(422, "validation_error", "external_identifier cannot be changed")
        agent.update(details, updated_at=_now_text())
        return {"status": "success", "details": agent}

    def _delete_agent(self, body: dict[str, Any], query: Any, agent_id: str) -> dict[str, Any]:
        return {"status": "success", "details": self.agents.pop(_find(self.agents, agent_id, "agent")["id"])}

    def _agent_action(self, body: dict[str, Any], query: Any, agent_id: str, action: str) -> dict[str, Any]:
        agent = _find(self.agents, agent_id, "agent")
        wanted = "retired" if action == "retire" else "active"
        if agent["status"] == wanted:
            raise _Reject(409, "invalid_action", f"agent is already {wanted}")
        agent.update(status=wanted, updated_at=_now_text())
        return {"status": "success", "details": agent}

    def _show_agent(self, body: Any, query: dict[str, str]) -> dict[str, Any]:
        if "agent_id" in query:
            return self._agent_by_id(body, query, query["agent_id"])
        for agent in self.agents.values():
            if agent.get("external_identifier") == query.get("external_identifier"):
                return {"status": "success", "details": agent}
        raise _Reject(404, "not_found", "no such agent")

    def _list_agents(self, body: Any, query: dict[str, str]) -> dict[str, Any]:
        wanted = {f: query[f] for f in ("risk_profile_id", "team_id", "owner_person_id") if f in query}
        rows = [a for a in self.agents.values() if all(a.get(f) == v for f, v in wanted.items())]
        offset = int(query.get("pagination[offset]", 0))
        size = int(query.get("pagination[page_size]", 20))
        page = rows[offset : offset + size]
        following = offset + size if offset + size < len(rows) else None
        pagination = {"item_count": len(rows), "page_offset": offset, "page_size": size, "next_page_offset": following}
        return {"status": "success", "summaries": page, "pagination": pagination, "sorting": None}

    def _bulk(self, body: dict[str, Any], query: Any) -> dict[str, Any]:
        items = body.get("items")
        if not isinstance(items, list) or not items:
            raise _Reject(422, "validation_error", "items must be a non-empty list", {"items": ["is required"]})
        outputs: dict[str, Any] = {}
        for item in items:
            kind, key = item.get("_type"), item.get("idempotency_key")
            target = _BULK_TYPES.get(kind)
            if target is None:
                outputs[key] = _Reject(0, "invalid_type", f"unknown _type {kind!r}").envelope()
                break
            method, path = target
            for name in ("agent_instance_id", "agent_span_id", "agent_id"):
                path = path.replace(f"{{{name}}}", str(item.get(name)))
            params = {k: v for k, v in item.items() if k != "_type"}
            if kind == "agent_spans/create" and "details" not in params:
                params = {"details": params, "idempotency_key": key}
            status, answer = self._answer(method, path, {}, params)
            outputs[key] = answer
            if status >= 400:
                break
        return {"status": "success", "outputs": outputs}


def _route(method: str, pattern: str, handler: Callable[..., dict[str, Any]]) -> tuple[str, str, Any]:
    return method, pattern.replace("{id}", "([^/]+)"), handler  # compiled on first use (re's cache)


_ROUTES = [
    _route("POST", "/api/v1/agent_instance/register", LocalApiServer._register),
    _route("POST", "/api/v1/agent_instance/{id}/start", LocalApiServer._start),
    _route("POST", "/api/v1/agent_instance/{id}/finish", LocalApiServer._finish_instance),
    _route("POST", "/api/v1/agent_instance/{id}/record_quality", LocalApiServer._record_quality),
    _route("GET", "/api/v1/agent_instance/{id}", LocalApiServer._get_instance),
    _route("POST", "/api/v1/agent_spans", LocalApiServer._create_span),
    _route("POST", "/api/v1/agent_spans/{id}/finish", LocalApiServer._finish_span),
    _route("GET", "/api/v1/ping", LocalApiServer._ping),
    _route("POST", "/api/v1/bulk", LocalApiServer._bulk),
    _route("POST", "/api/v1/agent", LocalApiServer._create_agent),
    _route("GET", "/api/v1/agent", LocalApiServer._list_agents),
    _route("GET", "/api/v1/agent/show", LocalApiServer._show_agent),
    _route("GET", "/api/v1/agent/{id}", LocalApiServer._agent_by_id),
    _route("PUT", "/api/v1/agent/{id}", LocalApiServer._update_agent),
    _route("DELETE", "/api/v1/agent/{id}", LocalApiServer._delete_agent),
    _route("POST", "/api/v1/agent/{id}/(retire|reinstate)", LocalApiServer._agent_action),
]

#: Bulk ``_type`` -> the single endpoint it runs; ids come from the item's fields.
_BULK_TYPES = {
    "agent_instances/register": ("POST", "/api/v1/agent_instance/register"),
    "agent_instances/start": ("POST", "/api/v1/agent_instance/{agent_instance_id}/start"),
    "agent_instances/finish": ("POST", "/api/v1/agent_instance/{agent_instance_id}/finish"),
    "agent_spans/create": ("POST", "/api/v1/agent_spans"),
    "agent_spans/finish": ("POST", "/api/v1/agent_spans/{agent_span_id}/finish"),
    "agents/create": ("POST", "/api/v1/agent"),
    "agents/list": ("GET", "/api/v1/agent"),
}


# ============================================================================ #
# Command line: python3 -m prefactor_http {demo,ping,send}
# ============================================================================ #


def _cli_config(args: Any, local: LocalApiServer | None = None, **defaults: Any) -> HttpClientConfig:
    """Flags, then PREFACTOR_API_URL / PREFACTOR_API_TOKEN; a bad value is a ValueError."""
    values = {**defaults, **_drop_none(request_timeout=args.timeout, max_retries=args.retries)}
    if local is not None:
        return local.config(**values)
    url = args.api_url or os.environ.get("PREFACTOR_API_URL")
    token = args.api_token or os.environ.get("PREFACTOR_API_TOKEN")
    if not url or not token:
        raise ValueError("set PREFACTOR_API_URL and PREFACTOR_API_TOKEN (or --api-url/--api-token)")
    return HttpClientConfig(api_url=url, api_token=token, **values)


def _cli_failure(error: BaseException) -> tuple[int, str]:
    """Exit status and message of a failure, the same for every command: 2 token
    refused or bad configuration, 3 network failure, 1 any other error answer."""
    cause = getattr(error, "last_error", None) or error
    if isinstance(cause, PrefactorAuthError):
        return 2, f"auth failed: {cause}; check PREFACTOR_API_TOKEN"
    if isinstance(cause, PrefactorConnectionError):
        return 3, f"network failure: {error}; check PREFACTOR_API_URL, proxies and the network"
    if isinstance(cause, (ValueError, OSError)):
        return 2, f"error: {cause}"
    return 1, f"unexpected answer: {error}"


def _cli_demo(args: Any) -> int:
    """Run one agent lifecycle and print it as a tree with timings."""
    local = None if args.api_url or os.environ.get("PREFACTOR_API_URL") else LocalApiServer()
    with local or nullcontext():  # the stand-in stops however the demo ends
        config = _cli_config(args, local)
        if local is not None:
            print(f"No API configured: using a local stand-in at {local.url}\n")
        with PrefactorHttpClient(config) as client:
            began = _monotonic()
            schemas = [
                {"name": n, "params_schema": {"type": "object"}} for n in ("agent:run", "agent:llm", "agent:tool")
            ]
            inst = client.agent_instances.register(
                {"name": "demo agent", "external_identifier": "demo-v1"},
                {"external_identifier": "demo-schema-v1", "span_type_schemas": schemas},
                agent_id=None if local is None else "demo-agent",
                purpose="smoke_test",
            )
            client.agent_instances.start(inst.id)
            spans = client.agent_spans
            tree = []
            run = spans.create(inst.id, "agent:run", "active", {"task": "what is 6 x 7?"})
            for branch, name, payload, result in (
                ("├─", "agent:llm", {"model": "demo-model", "prompt": "6 x 7?"}, {"response": "use the calculator"}),
                ("└─", "agent:tool", {"tool": "calculator", "input": "6*7"}, {"output": 42}),
            ):
                t0 = _monotonic()
                child = spans.create(inst.id, name, "active", payload, parent_span_id=run.id)
                done = spans.finish(child.id, "complete", result)
                tree.append(f"   {branch} {name:<10} {done.id}  {done.status}  {(_monotonic() - t0) * 1000:.1f} ms")
            run_done = spans.finish(run.id, "complete", {"answer": 42})
            run_ms = (_monotonic() - began) * 1000
            finished = client.agent_instances.finish(inst.id, "complete")
            total = (_monotonic() - began) * 1000
    print(f"agent instance {inst.id}  {finished.status}  {total:.1f} ms")
    print(f"└─ agent:run  {run.id}  {run_done.status}  {run_ms:.1f} ms")
    print("\n".join(tree))
    counts = finished.span_counts
    if counts is not None:
        print(f"\nspans: {counts.total} total, {counts.complete} complete")
    return 0


def _cli_ping(args: Any) -> int:
    """Check the URL and token and print the round-trip time."""
    config = _cli_config(args, max_retries=0, request_timeout=10.0)
    began = _monotonic()
    with PrefactorHttpClient(config) as client:
        client.validate_token()
    print(f"ok: {config.api_url} accepted the token in {(_monotonic() - began) * 1000:.1f} ms")
    return 0


def _cli_send(args: Any) -> int:
    """Send JSON-lines bulk items in chunks. A line not stored goes, byte for byte,
    to the rejects file, written aside and moved into place at the end, so it may be
    the input. A refused token, an unreachable API or Ctrl-C stops the sending."""
    import tempfile

    config = _cli_config(args)
    rejects = os.path.abspath(args.rejects)
    if os.path.islink(rejects) or (os.path.exists(rejects) and not os.path.isfile(rejects)):
        raise ValueError(f"--rejects {rejects} exists and is not a regular file")
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # clears the progress line, shown on a terminal only
    source = open(0 if args.file == "-" else args.file, "rb", closefd=args.file != "-")  # noqa: SIM115
    handle, temp = tempfile.mkstemp(".tmp", ".prefactor-rejects-", os.path.dirname(rejects))
    counts = {"ok": 0, "rejected": 0}
    keys: dict[str, int] = {}  # the line where each key was seen
    stop: list[tuple[int, str]] = []  # exit status and message of the failure that ended sending
    chunk: list[tuple[int, bytes, dict[str, Any]]] = []
    number, raw = 0, b""  # the line being read, until it is in the chunk or the rejects file

    def reject(line: bytes, why: str | None) -> None:
        out.write(line if line.endswith(b"\n") else line + b"\n")
        counts["rejected"] += 1
        if why:
            print(f"{clear}rejected: {why}", file=sys.stderr)

    def take(number: int, line: bytes) -> None:
        what = "not UTF-8"
        try:  # a line is split at b"\n" only (a lone \r is JSON whitespace); a BOM may start the file
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            what = "not JSON"  # without its ending: a cut-off string is not an "invalid control character"
            item = json.loads(text.rstrip("\r\n"))
            _encode(item)  # NaN, Infinity, 1e400: read by json.loads, refused by the encoder
            what = "not a bulk item"
            key = BulkRequest([item]).items[0].idempotency_key
            if key in keys:
                raise ValueError(f"idempotency_key {key!r} repeats line {keys[key]}")
            keys[key] = number
            chunk.append((number, line, item))
        except (ValueError, RecursionError) as exc:
            reject(line, f"line {number}: {what}: {' '.join(str(exc).split())}")

    def flush() -> None:
        outputs: dict[str, Any] = {}
        try:
            if chunk:
                outputs = client.bulk.execute([item for _, _, item in chunk]).outputs
        except PrefactorHttpError as exc:
            code, message = _cli_failure(exc)
            if code > 1:  # token refused or API unreachable: send nothing more
                stop.append((code, message))
            else:
                print(f"{clear}rejected: lines {chunk[0][0]}-{chunk[-1][0]}: {message}", file=sys.stderr)
        for number, line, item in chunk:
            output = outputs.get(item["idempotency_key"])
            if output is not None and output.status == "success":
                counts["ok"] += 1
            else:  # an error, after one (not processed), or the whole request failed (outputs empty)
                why = f"{output.code}: {output.message}" if output else "not processed (an earlier item failed)"
                reject(line, f"line {number}: {why}" if outputs else None)
        chunk.clear()
        if clear:
            print(f"{clear}{counts['ok']} sent, {counts['rejected']} rejected", end="", file=sys.stderr)

    try:
        with PrefactorHttpClient(config) as client, source, open(handle, "wb") as out:
            try:
                for number, raw in enumerate(source, 1):
                    if stop and raw.strip(b" \t\r\n"):  # sending has ended: the rest goes to the rejects file as is
                        reject(raw, None)
                    elif raw.strip(b" \t\r\n"):  # blank lines are skipped; NBSP or form feed is not JSON
                        take(number, raw)
                    raw = b""
                    if len(chunk) >= args.chunk:
                        flush()
                flush()
            except KeyboardInterrupt:  # Ctrl-C: the lines read and not stored, and the rest of a FILE, are kept
                rest = f"; stdin after line {number} was not read" if args.file == "-" else ""
                stop.insert(0, (130, "interrupted" + rest))
                for line in [*(line for _, line, _ in chunk), raw, *(() if rest else source)]:
                    if line.strip(b" \t\r\n"):
                        reject(line, None)
        os.replace(temp, rejects)
    except BaseException:  # the rejects file is never deleted unless it was moved into place
        print(f"{clear}the lines rejected so far are kept in {temp}", file=sys.stderr)
        raise
    if not counts["rejected"]:
        os.remove(rejects)  # a clean run leaves no rejects file, not even an earlier one
    print(clear, end="", file=sys.stderr)
    written = f"; rejects written to {rejects}" if counts["rejected"] else ""
    print(f"{counts['ok']} sent, {counts['rejected']} rejected{written}")
    if stop:
        print(f"{stop[0][1]}; every line read and not stored is in the rejects file", file=sys.stderr)
    return stop[0][0] if stop else int(counts["rejected"] > 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python3 -m prefactor_http`` and ``prefactor-http``."""
    import argparse

    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--api-url", help="API base URL (default: $PREFACTOR_API_URL)")
    common.add_argument("--api-token", help="API token (default: $PREFACTOR_API_TOKEN; prefer the variable)")
    common.add_argument("--timeout", type=float, help="seconds for one attempt (default: ping 10, others 30)")
    common.add_argument("--retries", type=int, help="retries of a failed request (default: ping 0, others 3)")
    common.add_argument("-v", "--verbose", action="store_true", help="log every HTTP attempt to stderr")
    parser = argparse.ArgumentParser(
        prog="prefactor-http",
        description="Prefactor API client tools. Options go before or after the command.",
        epilog="exit status: 0 ok, 1 items rejected by the API, 2 token refused or bad usage, 3 network failure",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"prefactor-http {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, run, what in (
        ("demo", _cli_demo, "run one agent lifecycle and print it as a tree"),
        ("ping", _cli_ping, "check the URL and token"),
        ("send", _cli_send, "send bulk items from JSON lines"),
    ):
        commands.add_parser(name, parents=[common], help=what).set_defaults(run=run)
    send = commands.choices["send"]
    send.add_argument("file", nargs="?", default="-", help="JSON-lines file, or - for stdin (default)")
    send.add_argument("--chunk", type=int, default=100, help="items per bulk request (default 100)")
    send.add_argument("--rejects", default="prefactor-rejects.jsonl", help="where failed lines go (may be FILE)")
    unset = argparse.Namespace(api_url=None, api_token=None, timeout=None, retries=None, verbose=False)
    args = parser.parse_args(argv, unset)  # the options given, before or after the command
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s")
    if getattr(args, "chunk", 1) < 1:
        parser.error("--chunk must be at least 1")
    try:
        return int(args.run(args))
    except (PrefactorHttpError, ValueError, OSError) as exc:
        code, message = _cli_failure(exc)
        print(" ".join(message.split()), file=sys.stderr)  # one line, never a traceback
        return code


def __getattr__(name: str) -> Any:
    """The Literal type aliases, built when first asked for (typing is not
    imported with the module)."""
    if name in _LITERALS:
        from typing import Literal

        alias = Literal[_LITERALS[name]]  # type: ignore[valid-type]  # a tuple spreads: Literal["a", "b"]
        globals()[name] = alias
        return alias
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
