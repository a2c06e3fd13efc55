"""Tests for prefactor_http: real servers on 127.0.0.1, real sockets, no mocks.

Two tiers of server: ``LocalApiServer`` (the stateful stand-in shipped in the
module) for behaviour, and ``FaultServer`` below, a raw-socket server that plays a
script of actions per connection to inject faults. ``sleep`` and ``random`` are
injected into clients so backoff is asserted exactly and nothing waits.

Run: ``python -m unittest -v`` (nothing to install) or ``pytest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import prefactor_http as ph
from prefactor_http import (
    BulkItem,
    BulkRequest,
    HttpClientConfig,
    LocalApiServer,
    PrefactorHttpClient,
)

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "test-token-0123456789"
UTC = timezone.utc

# A self-signed certificate for localhost / 127.0.0.1, valid until 2126, made once
# with `openssl req -x509 -newkey rsa:2048 -nodes -days 36500 -subj /CN=localhost
# -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext
# basicConstraints=critical,CA:TRUE`, so no tool is needed when the tests run.
CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIDJzCCAg+gAwIBAgIUFNxTahe9Dml2yhiQQV2Q604JFMswDQYJKoZIhvcNAQEL
BQAwFDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEzMDAxMzIwM1oYDzIxMjYx
MTA2MDEzMjAzWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwggEiMA0GCSqGSIb3DQEB
AQUAA4IBDwAwggEKAoIBAQDesw6nNV/N5C2+Gl1mN24Inabt7bicMfYhF8xft6jd
KWHiECOYNZqmdf1oVgwHx9ssz9MlCTldjejK637s5KXTV1ApVeaDxv3qj3IbC40A
No2m7+a2GElj7wBzQreTqpv4fonmJfw6sXmAdAtdSO1DpvEkVGjAbGGKrmV+sOpJ
CDpcFJVaYZpgNlhIuYsd/yI3KAXo56no2qeXbBOG5mgdaUD7RWe0WCLse6MHTNHK
UdYZChrXfrkbne1AdZgMMv74TGLkFh72cS4/XJWIIidXmkIYoS2Jyh5YGk7t3UF1
j12pAMcE8/ZoUStFwbVBFkwAhN/V0sWHyq0eNYXdWk77AgMBAAGjbzBtMB0GA1Ud
DgQWBBR9sM91QmhVnBrpfyGkGWwZV/atJzAfBgNVHSMEGDAWgBR9sM91QmhVnBrp
fyGkGWwZV/atJzAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwDwYDVR0TAQH/
BAUwAwEB/zANBgkqhkiG9w0BAQsFAAOCAQEAK6apzIfLDnqOVnWB2VYu3sG/YoTq
TIPdSx7sy4O7/d0MECIfDXTahYXENDR3eoh7YxiCKl5eiEogQ8sAERLECldDRMI6
GlBt+2S/2QdS9+L/goGEjxpvaC1ckiFzVm5CMgctjBklXrWMBWrKEyqQDXyOflbq
fPR1Ah71wWAljUdK6YVS+I1lgPMvA9m6TfNKtHZHS6LZkXWTz2uqjgGc+HL2Omhs
28y98StVIfaVdtKZPB5Oo/glQD8GO5enLvxg1iNzVJ0lrgsI8PVuyjk93nYbkUZ4
fvgEtRqvm32uXaMoV1uEEpjQtaO9SVme0AHyaN8LMBAH063U5ejmxb2WrA==
-----END CERTIFICATE-----
"""
KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDesw6nNV/N5C2+
Gl1mN24Inabt7bicMfYhF8xft6jdKWHiECOYNZqmdf1oVgwHx9ssz9MlCTldjejK
637s5KXTV1ApVeaDxv3qj3IbC40ANo2m7+a2GElj7wBzQreTqpv4fonmJfw6sXmA
dAtdSO1DpvEkVGjAbGGKrmV+sOpJCDpcFJVaYZpgNlhIuYsd/yI3KAXo56no2qeX
bBOG5mgdaUD7RWe0WCLse6MHTNHKUdYZChrXfrkbne1AdZgMMv74TGLkFh72cS4/
XJWIIidXmkIYoS2Jyh5YGk7t3UF1j12pAMcE8/ZoUStFwbVBFkwAhN/V0sWHyq0e
NYXdWk77AgMBAAECggEAXv3MkckkCOw8ELspPMkG/9jTU+jTFpj/DiWbEPcDqfaV
YHqW3D19LmTkxwTxE76NgENTopgZJo06D5g85youi4PSVxdjgLE4LL2sI9oc9krO
yDbLV7/rShuvuvpp2Kxs5CWBh7CLMrPyCjc1g8BwKCvE70Sr++we/Ssfctdez/BN
LXqjMepJvuHTVIMEXocaVz3Jj/QnU3llVYASieeA6wi5s3ObpiIiVF7V+Bw03ueW
RUBdEUAFVan3MzxaU7wvW7yjfgc77WYNrXNfSzxTz80R9FK7IuxKYNzMYqFprSIz
zH7A7BvouAcE9cpORRX5o82crxQLFrs7OhQ2Bbj0vQKBgQD4an3jdxbB7K0c0lJ8
fwg5MsisgLKMthQ9lIBtK+ZR5xTD9bp5gUwP5I9VCsCgLhEyyuV0jkZ2wnHiBWGV
aP+PjqDaztvHK9isevryLKKPnP9tMHS7v39n/vUy4d5NE+M+moR5ZJEEjpB3KPe0
lSyEu61XEBm5BDqP3UDAiTgqzwKBgQDlf5OVj/+RQxdKLQg8AZyl7vlnC5kN8eik
ldNCAVPO9cj0TwkJQ0yv5fzQG/wKwMh5GUUNIYZVK503aRKKN45hPexuLJUn8zzq
Qu6F6g912BgD/zspTiegUWCo+dexTPjutgj523uhiIH39ZUVhlKxJCoxL53ENgfV
ce/WpFd0FQKBgQC8Y95ms7jBhqDeO66slZYB8r52+/7scWU2MjmXEXTQ5iM8XU12
uhSZ9OayQr5Ee8s1LuQGmaNciyfcleIkcgVltG/OoJPSHzFp1LYdFLaPnSukfdv5
Skfv8U24scxpvcxXfM08VoUX5JowlBQOkha57q6NWTt4sXlMAyoJGcdLxwKBgQCh
TAoBKyTXBo1e38mSyxs68HuvddJLn8L/siG5mU86/ToQo1/Zd8h1NDJ8Xb7GG/qK
Sj1i3jYYtD+aCyoxpJxYMfpy8LigTG96wjH8QqY9D/TJEmCVRk3JeohyGq8C+PNY
au5iFWWOAXA/QwZWC4Mg5ycUTMAYgFT/KkYD2JtyhQKBgDQPFMAFQ2CGB77vqYH/
XznP6JqWm7jZji4nYyYcnxpZYh3i6lwpepoASaRmSU3lVkN6za9lpz6lLZjd1z9i
35AMZojnvKRK/vIyRZi4tGqwPopmritSNlwXNiUDwV61D6IQTGsScq+W0jnnku/G
Iue4g5ebWUVwXJql+9J7HMU/
-----END PRIVATE KEY-----
"""

_ENV_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


def clean_env() -> dict:
    """Drop proxy, CA and PREFACTOR_* variables; return them for restoring."""
    saved = {}
    for name in list(os.environ):
        if name.upper() in _ENV_VARS or name.startswith("PREFACTOR_"):
            saved[name] = os.environ.pop(name)
    return saved


_SAVED_ENV: dict = {}


def setUpModule() -> None:
    _SAVED_ENV.update(clean_env())


def tearDownModule() -> None:
    clean_env()
    os.environ.update(_SAVED_ENV)


def make_client(url: str, **overrides) -> tuple[PrefactorHttpClient, list]:
    """A client whose sleeps are recorded (not slept) and whose jitter is 1.0."""
    overrides.setdefault("trust_env", False)
    client = PrefactorHttpClient(HttpClientConfig(api_url=url, api_token=TOKEN, **overrides))
    sleeps: list = []
    client._sleep = sleeps.append
    client._random = lambda: 0.5  # jitter factor 0.75 + 0.5 * 0.5 = 1.0
    return client, sleeps


# ---------------------------------------------------------------------------- #
# Raw-socket fault server
# ---------------------------------------------------------------------------- #


def http_response(status=200, body=b"", headers=None, reason="OK") -> bytes:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def ok_body(**details) -> dict:
    return {"status": "success", "details": {"id": "inst-1", **details}}


def read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return None
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        piece = conn.recv(65536)
        if not piece:
            break
        body += piece
    return head + b"\r\n\r\n" + body


class Listener:
    """Accepts on 127.0.0.1 and hands connection n to ``self.handle(conn, n)``."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handle, args=(conn, self.connections - 1), daemon=True).start()

    def close(self):
        self.sock.close()


class FaultServer(Listener):
    """Connection n plays ``scripts[n]`` (the last script repeats). Actions:
    ``("reply", bytes)`` read a request, send bytes (``"truncate"``: then close);
    ``("drop_before",)`` close on
    accept; ``("drop_after",)`` read, close; ``("stall",)`` read, never answer;
    ``("trickle", bytes)`` read, send a byte every 50 ms; ``("close",)`` close an
    idle kept-alive connection and set ``idle_closed``."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.requests: list = []
        self.idle_closed = threading.Event()
        self.stopping = threading.Event()
        super().__init__()

    def handle(self, conn, index):
        self._play(conn, self.scripts[min(index, len(self.scripts) - 1)])

    def _play(self, conn, script):
        with conn:
            for action in script:
                kind = action[0]
                if kind == "drop_before":
                    return
                if kind == "reset":  # an RST instead of a FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    read_request(conn)
                    return
                if kind == "close":
                    conn.shutdown(socket.SHUT_RDWR)
                    self.idle_closed.set()
                    return
                request = read_request(conn)
                if request is None:
                    return
                self.requests.append(request)
                if kind in ("reply", "truncate"):
                    conn.sendall(action[1])
                    if kind == "truncate":
                        return
                elif kind == "drop_after":
                    return
                elif kind == "stall":
                    self.stopping.wait(30)
                    return
                elif kind == "trickle":
                    for byte in action[1]:
                        if self.stopping.wait(0.05):
                            return
                        try:
                            conn.sendall(bytes([byte]))
                        except OSError:
                            return
            self.stopping.wait(30)  # keep the connection open until the test ends

    def bodies(self) -> list:
        return [json.loads(r.partition(b"\r\n\r\n")[2] or b"null") for r in self.requests]

    def close(self):
        self.stopping.set()
        super().close()


class FaultTestCase(unittest.TestCase):
    def serve(self, *scripts) -> FaultServer:
        server = FaultServer(*scripts)
        self.addCleanup(server.close)
        return server

    def client(self, url, **overrides):
        client, sleeps = make_client(url, **overrides)
        self.addCleanup(client.close)
        return client, sleeps


class ApiTestCase(unittest.TestCase):
    """A fresh LocalApiServer and client per test."""

    def setUp(self):
        self.api = LocalApiServer(token=TOKEN).start()
        self.addCleanup(self.api.stop)
        self.client, self.sleeps = make_client(self.api.url)
        self.addCleanup(self.client.close)

    def register(self, **kwargs):
        kwargs.setdefault("agent_id", "agent-1")
        kwargs.setdefault("agent_version", {"name": "v", "external_identifier": "v1"})
        return self.client.agent_instances.register(**kwargs)

    def active_instance(self):
        inst = self.register()
        self.client.agent_instances.start(inst.id)
        return inst

    def last(self) -> dict:
        return self.api.requests[-1]


# ---------------------------------------------------------------------------- #
# Configuration
# ---------------------------------------------------------------------------- #


class ConfigTests(unittest.TestCase):
    def test_defaults_match_upstream(self):
        c = HttpClientConfig(api_url="https://app.prefactorai.com", api_token="t")
        self.assertEqual(
            (
                c.request_timeout,
                c.connect_timeout,
                c.max_retries,
                c.initial_retry_delay,
                c.max_retry_delay,
                c.retry_multiplier,
                c.retry_on_status_codes,
                c.default_idempotency_key,
            ),
            (30.0, 10.0, 3, 1.0, 60.0, 2.0, (429, 500, 502, 503, 504), None),
        )
        self.assertEqual((c.total_timeout, c.ca_file, c.trust_env), (None, None, True))

    def test_bad_values_are_value_errors_naming_the_field(self):
        cases = {
            "api_url": {"api_url": ""},
            "http:// or https://": {"api_url": "ftp://x"},
            "api_token": {"api_token": ""},
            "spaces": {"api_token": "a b"},
            "control": {"api_token": "abc\r\nX-Evil:1"},
            "request_timeout": {"request_timeout": 0},
            "connect_timeout": {"connect_timeout": -1},
            "total_timeout": {"total_timeout": 0},
            "max_retries": {"max_retries": -1},
            "initial_retry_delay must be <=": {"initial_retry_delay": 5, "max_retry_delay": 1},
            "retry_multiplier": {"retry_multiplier": 0.5},
            "retry_on_status_codes": {"retry_on_status_codes": (503, 99)},
            "default_idempotency_key": {"default_idempotency_key": "x" * 29},
            "ca_file": {"ca_file": "/no/such/file.pem"},
        }
        for text, override in cases.items():
            values = {"api_url": "https://h", "api_token": "t", **override}
            with self.subTest(text), self.assertRaisesRegex(ValueError, text):
                HttpClientConfig(**values)

    def test_repr_hides_the_token(self):
        c = HttpClientConfig(api_url="https://h", api_token="sekrit-token-value")
        self.assertNotIn("sekrit-token-value", repr(c))
        self.assertNotIn("sekrit-token-value", repr(PrefactorHttpClient(c)))

    def test_from_env_reads_variables_and_overrides_win(self):
        os.environ.update(PREFACTOR_API_URL="https://env.example", PREFACTOR_API_TOKEN="env-token")
        self.addCleanup(clean_env)
        c = HttpClientConfig.from_env(max_retries=1)
        self.assertEqual((c.api_url, c.api_token, c.max_retries), ("https://env.example", "env-token", 1))
        self.assertEqual(HttpClientConfig.from_env(api_url="https://o").api_url, "https://o")
        clean_env()
        with self.assertRaisesRegex(ValueError, "PREFACTOR_API_URL"):
            HttpClientConfig.from_env()


# ---------------------------------------------------------------------------- #
# Wire format
# ---------------------------------------------------------------------------- #


class WireTests(ApiTestCase):
    def test_register_body_is_flat_with_a_generated_key(self):
        inst = self.register(
            environment_id="env-1",
            purpose="eval",
            external_identifier="ext-1",
            agent_schema_version=ph.AgentSchemaVersionForRegister(external_identifier="s1"),
        )
        req = self.last()
        self.assertEqual((req["method"], req["path"]), ("POST", "/api/v1/agent_instance/register"))
        body = req["body"]
        self.assertEqual(
            set(body),
            {
                "agent_version",
                "agent_schema_version",
                "update_current_version",
                "agent_id",
                "environment_id",
                "purpose",
                "external_identifier",
                "idempotency_key",
            },
        )
        self.assertEqual(body["agent_schema_version"], {"external_identifier": "s1"})
        self.assertIs(body["update_current_version"], True)
        self.assertRegex(
            body["idempotency_key"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
        )
        self.assertEqual((inst.status, inst.agent_id), ("pending", "agent-1"))

    def test_start_sends_timestamp_null_and_finish_drops_nones(self):
        inst = self.register()
        self.client.agent_instances.start(inst.id)
        self.assertEqual(set(self.last()["body"]), {"timestamp", "idempotency_key"})
        self.assertIsNone(self.last()["body"]["timestamp"])
        when = datetime(2026, 2, 9, 10, 0, 0, 123000, tzinfo=timezone(timedelta(hours=2)))
        done = self.client.agent_instances.finish(inst.id, status="failed", timestamp=when, idempotency_key="fin-key-1")
        self.assertEqual(
            self.last()["body"],
            {"status": "failed", "timestamp": "2026-02-09T08:00:00.123000Z", "idempotency_key": "fin-key-1"},
        )
        self.assertEqual(done.status, "failed")

    def test_span_create_is_wrapped_with_the_key_inside_and_on_top(self):
        inst = self.active_instance()
        span = self.client.agent_spans.create(
            agent_instance_id=inst.id,
            schema_name="agent:llm",
            status="active",
            payload={"model": "m"},
            parent_span_id=None,
            started_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        body = self.last()["body"]
        self.assertEqual(set(body), {"details", "idempotency_key"})
        self.assertEqual(body["details"]["idempotency_key"], body["idempotency_key"])
        self.assertEqual(body["details"]["started_at"], "2026-01-01T00:00:00.000000Z")
        self.assertEqual(body["details"]["payload"], {"model": "m"})
        self.assertNotIn("parent_span_id", body["details"])
        self.assertEqual((span.schema_name, span.payload), ("agent:llm", {"model": "m"}))

    def test_span_create_sends_an_empty_payload_by_default_and_finish_is_flat(self):
        inst = self.active_instance()
        span = self.client.agent_spans.create(inst.id, "agent:llm", "active")
        self.assertEqual(self.last()["body"]["details"]["payload"], {})
        done = self.client.agent_spans.finish(span.id, status="complete", result_payload={"r": 1})
        self.assertEqual(set(self.last()["body"]), {"status", "result_payload", "idempotency_key"})
        self.assertEqual((done.status, done.result_payload), ("complete", {"r": 1}))

    def test_record_quality_always_sends_payload(self):
        inst = self.register()
        self.client.agent_instances.record_quality(inst.id, "accuracy", {"score": 1})
        got = self.client.agent_instances.record_quality(inst.id, "accuracy", None)
        self.assertEqual(self.last()["path"], f"/api/v1/agent_instance/{inst.id}/record_quality")
        self.assertIn("payload", self.last()["body"])
        self.assertIsNone(self.last()["body"]["payload"])
        self.assertEqual(got.quality_payloads, {})

    def test_get_and_ping(self):
        inst = self.register()
        self.assertEqual(self.client.agent_instances.get(inst.id).id, inst.id)
        self.assertEqual(self.client.validate_token(), {"status": "success"})
        self.assertEqual((self.last()["method"], self.last()["path"]), ("GET", "/api/v1/ping"))

    def test_headers(self):
        client, _ = make_client(self.api.url)
        self.addCleanup(client.close)
        client.validate_token()
        get = {k.lower(): v for k, v in self.last()["headers"].items()}
        self.assertEqual(get["authorization"], "Bearer " + TOKEN)
        self.assertEqual(get["accept"], "application/json")
        self.assertEqual(get["user-agent"], f"prefactor-http/{ph.__version__} python/%d.%d" % sys.version_info[:2])
        self.assertEqual(get["x-prefactor-sdk"], f"prefactor-http@{ph.__version__}")
        self.assertNotIn("content-type", get)
        upstream = PrefactorHttpClient(self.api.config(), sdk_header="prefactor-core@0.5.3")
        self.addCleanup(upstream.close)
        upstream.agent_instances.register({"name": "v"}, agent_id="a")
        post = {k.lower(): v for k, v in self.last()["headers"].items()}
        self.assertEqual(post["content-type"], "application/json")
        self.assertEqual(post["x-prefactor-sdk"], f"prefactor-core@0.5.3 prefactor-http@{ph.__version__}")

    def test_api_url_path_prefix_is_kept(self):
        client, _ = make_client(self.api.url + "/prefix/")
        self.addCleanup(client.close)
        with self.assertRaises(ph.PrefactorNotFoundError):
            client.validate_token()
        self.assertEqual(self.last()["path"], "/prefix/api/v1/ping")

    def test_request_escape_hatch(self):
        got = self.client.request("GET", "/api/v1/ping", params={"x": True}, idempotency_key="hdr-key-1")
        self.assertEqual(got, {"status": "success"})
        self.assertEqual(self.last()["query"], {"x": "true"})
        self.assertEqual(self.last()["headers"].get("Idempotency-Key"), "hdr-key-1")

    def test_closing_during_a_retry_wait_stops_the_call(self):
        self.api.fail_next(503)
        self.client._sleep = lambda delay: self.client.close()  # another thread closes it meanwhile
        with self.assertRaisesRegex(ph.PrefactorClientError, "closed during the call"):
            self.client.validate_token()
        self.assertEqual(len(self.api.requests), 1)
        self.assertEqual(self.client._transport._open, set())

    def test_closed_client_is_a_client_error(self):
        self.client.close()
        with self.assertRaises(ph.PrefactorClientError):
            self.client.validate_token()


# ---------------------------------------------------------------------------- #
# Errors
# ---------------------------------------------------------------------------- #


class StatusMappingTests(FaultTestCase):
    def raised(self, status, body, headers=None, **overrides):
        server = self.serve([("reply", http_response(status, body, headers))])
        client, _ = self.client(server.url, max_retries=0, **overrides)
        with self.assertRaises(ph.PrefactorHttpError) as caught:
            client.agent_instances.get("inst-1")
        return caught.exception

    def test_status_codes_map_through_one_table(self):
        envelope = {"status": "error", "code": "c", "message": "m", "errors": {"f": ["bad"]}}
        for status, cls in [
            (400, ph.PrefactorValidationError),
            (401, ph.PrefactorAuthError),
            (403, ph.PrefactorAuthError),
            (404, ph.PrefactorNotFoundError),
            (409, ph.PrefactorConflictError),
            (422, ph.PrefactorValidationError),
            (418, ph.PrefactorApiError),
            (500, ph.PrefactorApiError),
        ]:
            with self.subTest(status):
                err = self.raised(status, envelope)
                self.assertIs(type(err), cls)
                self.assertEqual(
                    (err.status_code, err.code, err.message, err.errors), (status, "c", "m", {"f": ["bad"]})
                )

    def test_html_error_page_still_maps_by_status(self):
        err = self.raised(
            401, b"<html><body><h1>401 Authorization Required</h1></body></html>", {"Content-Type": "text/html"}
        )
        self.assertIsInstance(err, ph.PrefactorAuthError)
        self.assertEqual(err.code, "unknown")
        self.assertIn("401 Authorization Required", err.body_snippet)
        self.assertIn("text/html", str(err))

    def test_error_body_without_code_and_with_error_key(self):
        err = self.raised(404, {"error": "gone"})
        self.assertEqual((err.code, err.message), ("unknown", "gone"))

    def test_success_body_that_is_not_json_is_a_contract_error(self):
        for body in (
            b"<html>proxy</html>",
            b"[1, 2]",
            b'{"status": "success"}',
            b'{"details": {"x": 1}}',
            b'{"details": "nope"}',
        ):
            with self.subTest(body):
                err = self.raised(200, body)
                self.assertIsInstance(err, ph.PrefactorResponseContractError)

    def test_redirect_is_not_followed(self):
        server = self.serve([("reply", http_response(302, b"", {"Location": "http://evil.example/steal"}))])
        client, _ = self.client(server.url, max_retries=0)
        with self.assertRaises(ph.PrefactorApiError) as caught:
            client.validate_token()
        self.assertEqual(caught.exception.status_code, 302)
        self.assertIn("not followed", str(caught.exception))
        self.assertEqual((server.connections, len(server.requests)), (1, 1))

    def test_errors_construct_with_upstream_signatures(self):
        err = ph.PrefactorValidationError("bad", "validation_error", 422, {"name": ["required"]})
        self.assertEqual((err.errors, err.status_code, err.message), ({"name": ["required"]}, 422, "bad"))
        self.assertIs(ph.PrefactorRetryExhaustedError("x", err).last_error, err)
        self.assertEqual(ph.PrefactorResponseContractError("x", status_code=200, body_snippet="s").body_snippet, "s")

    def test_transient_and_permanent_classification(self):
        api = ph.PrefactorApiError
        cases = [
            (api("m", "c", 429), True, False),
            (api("m", "c", 503), True, False),
            (ph.PrefactorNotFoundError("m", "c", 404), False, True),
            (api("m", "c", 409), False, True),
            (ph.PrefactorConnectionError("x"), True, False),
            (ph.PrefactorTimeoutError("x"), True, False),
            (ph.PrefactorConnectionError("tls", transient=False), False, True),
            (ph.PrefactorResponseContractError("x", status_code=200), False, True),
            (ph.PrefactorResponseContractError("x", status_code=502), True, False),
            (ph.PrefactorRetryExhaustedError("x", api("m", "c", 503)), True, False),
            (ph.PrefactorClientError("closed"), False, True),
            (ValueError("x"), False, False),
        ]
        for error, transient, permanent in cases:
            with self.subTest(repr(error)):
                self.assertEqual(ph.is_transient_http_error(error), transient)
                self.assertEqual(ph.is_permanent_http_error(error), permanent)


# ---------------------------------------------------------------------------- #
# Models
# ---------------------------------------------------------------------------- #


class ModelTests(unittest.TestCase):
    def test_unknown_keys_go_to_extra_and_missing_keys_default(self):
        inst = ph._build(
            ph.AgentInstance,
            {"id": "i", "status": "active", "brand_new": [1], "span_counts": {"total": 2, "pending": 1}},
            "x",
        )
        self.assertEqual(inst.extra, {"brand_new": [1]})
        self.assertEqual(
            (inst.span_counts.total, inst.span_counts.active, inst.span_counts.extra), (2, 0, {"pending": 1})
        )
        self.assertIsNone(inst.started_at)

    def test_missing_id_or_bad_details_is_a_contract_error(self):
        for data in ({"status": "active"}, {"id": 5}, [], "x"):
            with self.subTest(data), self.assertRaises(ph.PrefactorResponseContractError):
                ph._build(ph.AgentSpan, data, "x")

    def test_timestamps_in_every_form_become_aware(self):
        expect = datetime(2026, 2, 9, 1, 2, 3, tzinfo=UTC)
        forms = {
            "2026-02-09T01:02:03Z": expect,
            "2026-02-09T01:02:03+00:00": expect,
            "2026-02-09T01:02:03.5Z": expect.replace(microsecond=500000),
            "2026-02-09T01:02:03.12Z": expect.replace(microsecond=120000),
            "2026-02-09T01:02:03.123Z": expect.replace(microsecond=123000),
            "2026-02-09T01:02:03.1234Z": expect.replace(microsecond=123400),
            "2026-02-09T01:02:03.123456789Z": expect.replace(microsecond=123456),
            "2026-02-09T03:02:03.123456789+02:00": expect.replace(microsecond=123456),
            "2026-02-09T01:02:03": expect,
        }
        for text, wanted in forms.items():
            with self.subTest(text):
                got = ph._parse_datetime(text, "t")
                self.assertEqual(got, wanted)
                self.assertIsNotNone(got.tzinfo)
        for bad in ("yesterday", "", 12):
            with self.subTest(bad), self.assertRaises(ph.PrefactorResponseContractError):
                ph._parse_datetime(bad, "t")

    def test_bulk_validation_lists_every_problem_with_its_index(self):
        with self.assertRaises(ValueError) as caught:
            BulkRequest(
                [
                    {"_type": "a", "idempotency_key": "short"},
                    {"idempotency_key": "long-enough-1"},
                    {"_type": "a", "idempotency_key": "dup-key-01"},
                    {"_type": "a", "idempotency_key": "dup-key-01"},
                    {"_type": "a", "idempotency_key": "k" * 65},
                    7,
                ]
            )
        text = str(caught.exception)
        for wanted in (
            "item 0: idempotency_key must be 8-64",
            "item 1: _type is required",
            "item 3: idempotency_key 'dup-key-01' repeats item 2",
            "item 4: idempotency_key must be 8-64",
            "item 5: expected a BulkItem or dict",
        ):
            self.assertIn(wanted, text)
        with self.assertRaisesRegex(ValueError, "at least one item"):
            BulkRequest([])
        with self.assertRaisesRegex(ValueError, "8-64"):
            BulkItem(_type="agents/list", idempotency_key="short")

    def test_bulk_item_keeps_params_flat(self):
        item = BulkItem(_type="agent_spans/create", idempotency_key="span-key-1", schema_name="s")
        self.assertEqual(
            item.to_dict(), {"_type": "agent_spans/create", "idempotency_key": "span-key-1", "schema_name": "s"}
        )
        self.assertEqual((item.type, item.schema_name), ("agent_spans/create", "s"))


# ---------------------------------------------------------------------------- #
# Bad input: a clear ValueError before any byte is sent
# ---------------------------------------------------------------------------- #


class BadInputTests(ApiTestCase):
    def test_bad_arguments_send_nothing(self):
        inst_id = "inst-1"
        cyclic: dict = {}
        cyclic["self"] = cyclic
        spans, instances = self.client.agent_spans, self.client.agent_instances
        cases = [
            ("status", lambda: spans.create(inst_id, "s", "running")),
            ("status", lambda: instances.finish(inst_id, status="done")),
            ("timezone-aware", lambda: instances.start(inst_id, timestamp=datetime(2026, 1, 1))),
            ("at most 64", lambda: instances.start(inst_id, idempotency_key="k" * 65)),
            ("'payload' is not valid JSON", lambda: spans.create(inst_id, "s", "active", payload={"x": math.nan})),
            ("'payload' is not valid JSON", lambda: spans.create(inst_id, "s", "active", payload={"x": {1, 2}})),
            ("'payload' is not valid JSON", lambda: spans.create(inst_id, "s", "active", payload=cyclic)),
            ("control", lambda: instances.start(inst_id, idempotency_key="abc\r\nX: y")),
            ("non-empty id", lambda: instances.get("")),
            ("non-empty id", lambda: instances.get(".")),
            ("non-empty id", lambda: instances.get("..")),
            ("purpose", lambda: self.register(purpose="prod")),
            ("must be a dict", lambda: spans.create(inst_id, "s", "active", payload=[1])),
            ("exactly one", lambda: self.client.agents.show()),
            ("8-64", lambda: self.client.bulk.execute([{"_type": "x", "idempotency_key": "k"}])),
        ]
        for text, call in cases:
            with self.subTest(text), self.assertRaisesRegex((ValueError, TypeError), text):
                call()
        self.assertEqual(self.api.requests, [])

    def test_ids_are_one_percent_encoded_path_segment(self):
        with self.assertRaises(ph.PrefactorNotFoundError):
            self.client.agent_instances.get("../x?y")
        self.assertEqual(self.api.requests[-1]["path"], "/api/v1/agent_instance/..%2Fx%3Fy")


# ---------------------------------------------------------------------------- #
# Mutation-guided tests (issue 12): the less-used doors of each section
# ---------------------------------------------------------------------------- #


class PublicSurfaceTests(unittest.TestCase):
    def test_all_names_exactly_the_public_api_and_each_resolves(self):
        expected = {
            *("HttpClientConfig", "PrefactorHttpClient", "AsyncPrefactorHttpClient", "LocalApiServer"),
            *("AgentInstance", "AgentInstanceSpanCounts", "AgentSpan", "Agent", "AgentSummary", "ListResponse"),
            *("Pagination", "BulkItem", "BulkRequest", "BulkOutput", "BulkResponse"),
            *("AgentVersionForRegister", "AgentSchemaVersionForRegister", "SpanTypeSchemaForCreate"),
            *("AgentStatus", "FinishStatus", "InstancePurpose"),
            *("PrefactorHttpError", "PrefactorApiError", "PrefactorAuthError", "PrefactorNotFoundError"),
            *("PrefactorConflictError", "PrefactorValidationError", "PrefactorConnectionError"),
            *("PrefactorTimeoutError", "PrefactorResponseContractError", "PrefactorRetryExhaustedError"),
            *("PrefactorClientError", "is_transient_http_error", "is_permanent_http_error"),
        }
        self.assertEqual(set(ph.__all__), expected)
        self.assertEqual(len(ph.__all__), len(expected))
        for name in ph.__all__:
            self.assertIsNotNone(getattr(ph, name), name)
        self.assertRegex(ph.__version__, r"^\d+\.\d+\.\d+$")

    def test_literal_aliases_list_every_value(self):
        import typing

        self.assertEqual(
            typing.get_args(ph.AgentStatus), ("pending", "active", "complete", "failed", "cancelled", "terminated")
        )
        self.assertEqual(typing.get_args(ph.FinishStatus), ("complete", "failed", "cancelled"))
        self.assertEqual(typing.get_args(ph.InstancePurpose), ("live", "smoke_test", "eval"))
        with self.assertRaises(AttributeError):
            ph.NoSuchName  # noqa: B018

    def test_import_loads_neither_ssl_nor_logging(self):
        code = "import sys, prefactor_http; print([m for m in ('ssl', 'logging') if m in sys.modules])"
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
        self.assertEqual((out.stdout.strip(), out.stderr), ("[]", ""))


class ErrorClassificationTests(unittest.TestCase):
    def test_classification_table(self):
        api = ph.PrefactorApiError
        exhausted = ph.PrefactorRetryExhaustedError
        cases = [
            (api("m", "c", 500), True, False),
            (api("m", "c", 501), True, False),
            (api("m", "c", 599), True, False),
            (api("m", "c", 400), False, True),
            (api("m", "c", 428), False, True),
            (api("m", "c", 430), False, True),
            (api("m", "c", 499), False, True),
            (exhausted("x", ph.PrefactorNotFoundError("m", "c", 404)), False, True),
            (exhausted("x", ph.PrefactorConnectionError("tls", transient=False)), False, True),
            (exhausted("x", ph.PrefactorTimeoutError("slow")), True, False),
            (exhausted("x"), False, False),
            (ph.PrefactorResponseContractError("x"), False, True),
            (ph.PrefactorResponseContractError("x", status_code=500), True, False),
            (ph.PrefactorHttpError("x"), False, False),
            (ConnectionResetError("reset"), True, False),
            (ph.PrefactorClientError("closed"), False, True),
        ]
        for error, transient, permanent in cases:
            with self.subTest(repr(error)):
                self.assertIs(ph.is_transient_http_error(error), transient)
                self.assertIs(ph.is_permanent_http_error(error), permanent)

    def test_attributes_and_text(self):
        err = ph.PrefactorApiError("m", "c", 418)
        self.assertEqual(str(err), "m (HTTP 418, code 'c')")
        self.assertEqual((err.errors, err.retry_after, err.body_snippet), ({}, None, None))
        err = ph.PrefactorValidationError("bad", "v", 422, errors=[], retry_after=2.0, body_snippet="s")
        self.assertEqual((err.errors, err.retry_after, err.body_snippet), ([], 2.0, "s"))
        self.assertIs(ph.PrefactorConnectionError("x").transient, True)
        self.assertIs(ph.PrefactorRetryExhaustedError("x").last_error, None)
        cause = ValueError("c")
        contract = ph.PrefactorResponseContractError("x", cause=cause)
        self.assertEqual((contract.cause, contract.status_code, contract.body_snippet), (cause, None, None))


def reply_with(test: FaultTestCase, body, call, status=200, headers=None):
    """What ``call(client)`` returns (or raises) when the server answers ``body``."""
    server = test.serve([("reply", http_response(status, body, headers))])
    client, _ = test.client(server.url, max_retries=0)
    return call(client)


class ResponseModelTests(FaultTestCase):
    def test_a_minimal_answer_gets_every_default(self):
        inst = reply_with(self, {"details": {"id": "i1"}}, lambda c: c.agent_instances.get("i1"))
        self.assertEqual(
            (inst.type, inst.status, inst.span_counts, inst.purpose, inst.extra),
            ("agent_instance", None, None, None, {}),
        )
        span = reply_with(self, {"details": {"id": "s1"}}, lambda c: c.agent_spans.finish("s1"))
        self.assertEqual((span.type, span.payload, span.result_payload, span.extra), ("agent_span", {}, None, {}))
        agent = reply_with(self, {"details": {"id": "a1", "risk_profile_id": "r"}}, lambda c: c.agents.get("a1"))
        self.assertEqual(
            (type(agent), agent.type, agent.name, agent.risk_profile_id, agent.instance_counts),
            (ph.Agent, "agent", None, "r", None),
        )
        self.assertEqual(reply_with(self, {}, lambda c: c.agents.list_agents()), [])
        bulk = reply_with(self, {}, lambda c: c.bulk.execute([{"_type": "agents/list", "idempotency_key": "list-key"}]))
        self.assertEqual((bulk.status, bulk.outputs, bulk.extra), ("success", {}, {}))
        bulk = reply_with(
            self, {"outputs": {"list-key": {}}}, lambda c: c.bulk.execute([BulkItem("agents/list", "list-key")])
        )
        out = bulk.outputs["list-key"]
        self.assertEqual(
            (out.status, out.details, out.summaries, out.code, out.extra), ("success", None, None, None, {})
        )

    def test_unknown_keys_stay_out_of_reprs(self):
        ids = {"id": "x1"}
        for cls, required in [
            (ph.AgentInstance, ids),
            (ph.AgentInstanceSpanCounts, {}),
            (ph.AgentSpan, ids),
            (ph.AgentSummary, ids),
            (ph.Agent, ids),
            (ph.Pagination, {}),
            (ph.ListResponse, {}),
            (ph.BulkOutput, {}),
            (ph.BulkResponse, {}),
        ]:
            with self.subTest(cls.__name__):
                self.assertNotIn("zz_unknown", repr(cls(**required, extra={"zz_unknown": 1})))
        self.assertEqual(ph.AgentInstanceSpanCounts(), ph.AgentInstanceSpanCounts(0, 0, 0, 0, 0, 0))
        self.assertEqual((ph.ListResponse().status, ph.ListResponse().summaries), ("success", []))

    def test_a_malformed_answer_names_the_operation(self):
        inst, spans, agents = "i1", "s1", "a1"
        calls = {
            "agent_instances.register": lambda c: c.agent_instances.register({"name": "v"}),
            "agent_instances.start": lambda c: c.agent_instances.start(inst),
            "agent_instances.finish": lambda c: c.agent_instances.finish(inst),
            "agent_instances.get": lambda c: c.agent_instances.get(inst),
            "agent_instances.record_quality": lambda c: c.agent_instances.record_quality(inst, "q", {}),
            "agent_spans.create": lambda c: c.agent_spans.create(inst, "s", "active"),
            "agent_spans.finish": lambda c: c.agent_spans.finish(spans),
            "agents.create": lambda c: c.agents.create({"name": "n"}),
            "agents.get": lambda c: c.agents.get(agents),
            "agents.update": lambda c: c.agents.update(agents, {"name": "m"}),
            "agents.show": lambda c: c.agents.show(agent_id=agents),
            "agents.retire": lambda c: c.agents.retire(agents),
            "agents.reinstate": lambda c: c.agents.reinstate(agents),
            "agents.delete": lambda c: c.agents.delete(agents),
        }
        for operation, call in calls.items():
            with self.subTest(operation), self.assertRaises(ph.PrefactorResponseContractError) as caught:
                reply_with(self, {"status": "success"}, call)
            self.assertTrue(str(caught.exception).startswith(operation + ": "), str(caught.exception))
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, r"^agents\.list_agents response\.pagination "):
            reply_with(self, {"summaries": [], "pagination": 5}, lambda c: c.agents.list_agents())

    def test_known_keys_are_converted_and_unknown_kept(self):
        details = {
            "id": "i1",
            "span_counts": {"total": 3, "complete": 2, "queued": 1},
            "inserted_at": "2026-02-09T01:02:03z",
            "updated_at": "2026-02-09T06:32:03.25+05:30",
            "started_at": None,
            "later_field": {"x": 1},
        }
        inst = reply_with(self, {"details": details}, lambda c: c.agent_instances.get("i1"))
        counts = inst.span_counts
        self.assertEqual((counts.total, counts.complete, counts.active, counts.finished), (3, 2, 0, 0))
        self.assertEqual(counts.extra, {"queued": 1})
        self.assertEqual(inst.inserted_at, datetime(2026, 2, 9, 1, 2, 3, tzinfo=UTC))
        self.assertEqual(inst.updated_at, datetime(2026, 2, 9, 1, 2, 3, 250000, tzinfo=UTC))
        self.assertIsNone(inst.started_at)
        self.assertEqual(inst.extra, {"later_field": {"x": 1}})
        page = {
            "summaries": [{"id": "a1", "name": "n", "inserted_at": "2026-02-09T01:02:03Z", "new": 1}],
            "pagination": {"item_count": 1, "next_page_offset": None, "cursor": "c"},
        }
        rows = reply_with(self, page, lambda c: list(c.agents.iter_agents()))
        self.assertEqual([(r.id, r.name, r.inserted_at.year, r.extra) for r in rows], [("a1", "n", 2026, {"new": 1})])
        outputs = {"key-0001": {"status": "error", "code": "c", "message": "m", "hint": "h"}}
        bulk = reply_with(
            self, {"outputs": outputs}, lambda c: c.bulk.execute([{"_type": "t", "idempotency_key": "key-0001"}])
        )
        out = bulk.outputs["key-0001"]
        self.assertEqual(
            (type(out), out.status, out.code, out.message, out.details, out.extra),
            (ph.BulkOutput, "error", "c", "m", None, {"hint": "h"}),
        )

    def test_answers_of_the_wrong_shape_are_contract_errors(self):
        cases = [
            (b"5", lambda c: c.agent_instances.get("i1")),
            (b'"text"', lambda c: c.validate_token()),
            (b"null", lambda c: c.agents.get("a1")),
            (b"[{}]", lambda c: c.agents.list_agents()),
            (b'{"details": {"id": "i1", "inserted_at": "noon"}}', lambda c: c.agent_instances.get("i1")),
            (b'{"details": {"id": "i1", "span_counts": [1]}}', lambda c: c.agent_instances.get("i1")),
            (b'{"summaries": {"id": "a1"}}', lambda c: c.agents.list_agents()),
            (b'{"summaries": [{"name": "no id"}]}', lambda c: c.agents.list_agents()),
            (
                b'{"summaries": [{"id": "a1"}], "pagination": {"next_page_offset": 0}}',
                lambda c: list(c.agents.iter_agents()),
            ),
            (
                b'{"summaries": [{"id": "a1"}], "pagination": {"next_page_offset": "2"}}',
                lambda c: list(c.agents.iter_agents()),
            ),
            (b'{"outputs": [1]}', lambda c: c.bulk.execute([{"_type": "t", "idempotency_key": "key-0001"}])),
            (
                b'{"outputs": {"key-0001": 1}}',
                lambda c: c.bulk.execute([{"_type": "t", "idempotency_key": "key-0001"}]),
            ),
        ]
        for body, call in cases:
            with self.subTest(body), self.assertRaises(ph.PrefactorResponseContractError):
                reply_with(self, body, call)
        with self.assertRaisesRegex(
            ph.PrefactorResponseContractError, "^agents.list_agents: 'summaries' is not a list"
        ):
            reply_with(self, {"summaries": "a1"}, lambda c: c.agents.list_agents())
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, "^bulk.execute: 'outputs' is not an object"):
            reply_with(self, {"outputs": []}, lambda c: c.bulk.execute([BulkItem("agents/list", "list-key")]))

    def test_an_error_body_that_is_not_json_is_quoted_up_to_200_characters(self):
        def call(client):
            with self.assertRaises(ph.PrefactorApiError) as caught:
                client.validate_token()
            return caught.exception

        err = reply_with(self, b"x" * 300, call, status=418, headers={"Content-Type": "text/plain"})
        self.assertEqual(err.body_snippet, "x" * 200 + "...")
        err = reply_with(self, b"y" * 200, call, status=418, headers={"Content-Type": "text/plain"})
        self.assertEqual(err.body_snippet, "y" * 200)

    def test_timestamps_with_lowercase_z_offsets_and_no_fraction(self):
        for text, wanted in {
            "2026-02-09T01:02:03z": datetime(2026, 2, 9, 1, 2, 3, tzinfo=UTC),
            "2026-02-09T01:02:03.000001Z": datetime(2026, 2, 9, 1, 2, 3, 1, tzinfo=UTC),
            "2026-02-09T01:02:03.1-01:00": datetime(2026, 2, 9, 2, 2, 3, 100000, tzinfo=UTC),
            "2026-02-09T01:02:03.987654321": datetime(2026, 2, 9, 1, 2, 3, 987654, tzinfo=UTC),
        }.items():
            with self.subTest(text):
                got = ph._parse_datetime(text, "t")
                self.assertEqual(got, wanted)
                self.assertIsNotNone(got.tzinfo)
        for bad in ("2026-13-09T01:02:03Z", "2026-02-09T01:02:03.xZ", None):
            with self.subTest(bad), self.assertRaises(ph.PrefactorResponseContractError):
                ph._parse_datetime(bad, "t")


class ResponseLimitTests(FaultTestCase):
    def test_32_mib_is_read_and_one_byte_more_refused_unread(self):
        limit = 32 * 1024 * 1024
        server = self.serve([("reply", http_response(200, b" " * (limit - 2) + b"{}"))])
        client, _ = self.client(server.url, max_retries=0)
        self.assertEqual(client.validate_token(), {})
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (limit + 1)
        server = self.serve([("reply", head)])
        client, _ = self.client(server.url, max_retries=0)
        with self.assertRaises(ph.PrefactorResponseContractError):
            client.validate_token()


class BulkModelTests(unittest.TestCase):
    def test_key_length_edges_and_missing_parts(self):
        for key in ("k" * 8, "k" * 64):
            self.assertEqual(BulkItem(_type="agents/list", idempotency_key=key).idempotency_key, key)
            self.assertEqual(len(BulkRequest([{"_type": "agents/list", "idempotency_key": key}]).items), 1)
        for kwargs, text in [
            ({"_type": "agents/list", "idempotency_key": "k" * 7}, "8-64 characters, got 7"),
            ({"_type": "agents/list", "idempotency_key": "k" * 65}, "8-64 characters, got 65"),
            ({"_type": "agents/list"}, "idempotency_key is required"),
            ({"_type": "agents/list", "idempotency_key": 12345678}, "idempotency_key is required"),
            ({"_type": "", "idempotency_key": "k" * 8}, "_type is required"),
            ({"idempotency_key": "k" * 8}, "_type is required"),
        ]:
            with self.subTest(kwargs), self.assertRaisesRegex(ValueError, text):
                BulkItem(**kwargs)
        with self.assertRaisesRegex(ValueError, "^invalid BulkItem: ") as caught:
            BulkItem(idempotency_key="short")
        self.assertIn(
            "_type is required (e.g. 'agent_spans/create'); idempotency_key must be 8-64", str(caught.exception)
        )

    def test_item_attributes_equality_and_repr(self):
        item = BulkItem(type="agent_spans/create", idempotency_key="span-key-1", status="active")
        self.assertEqual((item.type, item.status, item.params), ("agent_spans/create", "active", {"status": "active"}))
        self.assertFalse(hasattr(item, "payload"))
        with self.assertRaises(AttributeError):
            item.payload  # noqa: B018
        same = BulkItem("agent_spans/create", "span-key-1", status="active")
        self.assertEqual(item, same)
        self.assertNotEqual(item, BulkItem("agent_spans/create", "span-key-1", status="failed"))
        self.assertNotEqual(item, BulkItem("agent_spans/create", "span-key-2", status="active"))
        self.assertNotEqual(item, item.to_dict())
        self.assertEqual(repr(item), "BulkItem(_type='agent_spans/create', idempotency_key='span-key-1', ...)")

    def test_request_takes_any_iterable_but_not_a_string(self):
        for bad in ("agents/list", b"x", 5, None):
            with self.subTest(bad), self.assertRaises(TypeError):
                BulkRequest(bad)
        request = BulkRequest(
            item
            for item in [{"type": "agents/list", "idempotency_key": "list-key-1", "x": 1}, BulkItem("t", "other-key")]
        )
        self.assertEqual(
            request.to_dict(),
            {
                "items": [
                    {"_type": "agents/list", "idempotency_key": "list-key-1", "x": 1},
                    {"_type": "t", "idempotency_key": "other-key"},
                ]
            },
        )
        self.assertEqual(repr(request), "BulkRequest(items=[2 items])")
        with self.assertRaises(ValueError) as caught:
            BulkRequest(
                [
                    BulkItem("t", "same-key-1"),
                    BulkItem("t", "same-key-1"),
                    {"_type": "t", "idempotency_key": "same-key-1"},
                ]
            )
        self.assertIn("item 1: idempotency_key 'same-key-1' repeats item 0", str(caught.exception))
        self.assertIn("item 2: idempotency_key 'same-key-1' repeats item 0", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            BulkRequest([7])
        self.assertNotIn("at least one", str(caught.exception))

    def test_request_models_send_only_the_fields_given(self):
        self.assertEqual(ph.AgentVersionForRegister(name="n").to_dict(), {"name": "n"})
        self.assertEqual(ph.SpanTypeSchemaForCreate("s", {}).to_dict(), {"name": "s", "params_schema": {}})


class RequestArgumentTests(ApiTestCase):
    def test_bad_arguments_are_refused_before_sending(self):
        from datetime import tzinfo

        class NoOffset(tzinfo):  # aware in form, but it does not know its offset
            def utcoffset(self, dt):
                return None

        instances, spans, agents = self.client.agent_instances, self.client.agent_spans, self.client.agents
        cases = [
            (ValueError, "agent_version is required", lambda: instances.register(None)),
            (TypeError, "agent_version must be a dict", lambda: instances.register([1])),
            (TypeError, "agent_schema_version must be a dict", lambda: instances.register({}, "schema")),
            (ValueError, "name must be a non-empty", lambda: instances.record_quality("i1", "", {})),
            (TypeError, "payload must be a dict", lambda: instances.record_quality("i1", "q", [1])),
            (ValueError, "schema_name", lambda: spans.create("i1", "", "active")),
            (ValueError, "status must be one of", lambda: spans.finish("s1", status="running")),
            (TypeError, "result_payload must be a dict", lambda: spans.finish("s1", result_payload=[1])),
            (TypeError, "result_payload must be a dict", lambda: spans.create("i1", "s", "active", result_payload=5)),
            (ValueError, r"details\['name'\]", lambda: agents.create({"description": "no name"})),
            (TypeError, "details must be a dict", lambda: agents.create("name")),
            (TypeError, "details must be a dict", lambda: agents.update("a1", 5)),
            (ValueError, "exactly one", lambda: agents.show(agent_id="a1", external_identifier="e")),
            (TypeError, "agent_instance_id must be a string", lambda: instances.get(5)),
            (TypeError, "agent_instance_id must be a string", lambda: spans.create(5, "s", "active")),
            (
                ValueError,
                "^timestamp must be timezone-aware",
                lambda: spans.finish("s1", timestamp=datetime(2026, 1, 1)),
            ),
            (
                ValueError,
                "^finished_at must be",
                lambda: spans.create("i1", "s", "active", finished_at=datetime(2026, 1, 1)),
            ),
            (TypeError, "agent_id must be a string", lambda: agents.get(None)),
            (ValueError, "non-empty id", lambda: agents.get("  ")),
            (TypeError, "timestamp must be a datetime", lambda: instances.start("i1", timestamp="2026-01-01")),
            (
                ValueError,
                "timezone-aware",
                lambda: instances.finish("i1", timestamp=datetime(2026, 1, 1, tzinfo=NoOffset())),
            ),
            (
                ValueError,
                "started_at must be timezone-aware",
                lambda: spans.create("i1", "s", "active", started_at=datetime(2026, 1, 1)),
            ),
            (ValueError, "idempotency_key must be a non-empty", lambda: instances.start("i1", idempotency_key="")),
            (ValueError, "idempotency_key must be a non-empty", lambda: agents.retire("a1", idempotency_key=5)),
            (ValueError, "'agent_version' is not valid JSON", lambda: instances.register({"x": math.inf})),
            (
                ValueError,
                "^bulk.execute: 'items' is not valid JSON",
                lambda: self.client.bulk.execute([BulkItem("t", "key-0001", x=math.nan)]),
            ),
            (ValueError, "page_size", lambda: agents.list_agents(page_size=0)),
            (ValueError, "page_size", lambda: agents.list_agents(page_size=101)),
            (ValueError, "page_size", lambda: agents.list_agents(page_size="5")),
            (ValueError, "offset", lambda: agents.list_agents(offset=-1)),
            (ValueError, "offset", lambda: agents.list_agents(offset="1")),
            (ValueError, "page_size", lambda: next(agents.iter_agents(page_size=101))),
            (TypeError, "items must be a list", lambda: self.client.bulk.execute("agents/list")),
            (
                ValueError,
                "the request body is not valid JSON",
                lambda: self.client.request("POST", "/x", json_data={(1,): 2}),
            ),
        ]
        for cls, text, call in cases:
            with self.subTest(text), self.assertRaisesRegex(cls, text):
                call()
        self.assertEqual(self.api.requests, [])

    def test_edge_values_that_are_accepted_go_out_as_given(self):
        agents = self.client.agents
        for size in (1, 100):
            agents.list_agents(page_size=size, offset=0)
            self.assertEqual(self.last()["query"], {"pagination[offset]": "0", "pagination[page_size]": str(size)})
        key = "k" * 64
        self.register(idempotency_key=key, update_current_version=0)
        self.assertEqual(
            (self.last()["body"]["idempotency_key"], self.last()["body"]["update_current_version"]), (key, False)
        )
        for raw, sent in (("café", "caf%C3%A9"), ("a b", "a%20b"), ("inst_1-A", "inst_1-A")):
            with self.assertRaises(ph.PrefactorNotFoundError):
                self.client.agent_instances.get(raw)
            self.assertEqual(self.last()["path"], "/api/v1/agent_instance/" + sent)
        inst = self.register()
        plus_two = timezone(timedelta(hours=2))
        self.client.agent_instances.start(inst.id, timestamp=datetime(2026, 1, 1, 2, 0, 0, 5, tzinfo=plus_two))
        self.assertEqual(self.last()["body"]["timestamp"], "2026-01-01T00:00:00.000005Z")
        self.client.request("GET", "/api/v1/ping", params={"f": False, "t": True, "n": 0, "s": "x"})
        self.assertEqual(self.last()["query"], {"f": "false", "t": "true", "n": "0", "s": "x"})

    def test_iteration_sends_every_filter_and_walks_one_item_pages(self):
        for name in ("a0", "a1", "a2"):
            self.client.agents.create({"name": name, "owner_person_id": "p1", "risk_profile_id": "r1"})
        self.client.agents.create({"name": "other", "owner_person_id": "p2", "risk_profile_id": "r1"})
        rows = self.client.agents.iter_agents(owner_person_id="p1", risk_profile_id="r1", team_id=None, page_size=1)
        self.assertEqual([row.name for row in rows], ["a0", "a1", "a2"])
        self.assertEqual(
            [r["query"].get("pagination[offset]") for r in self.api.requests if r["method"] == "GET"], [None, "1", "2"]
        )
        self.assertEqual(
            self.last()["query"],
            {"owner_person_id": "p1", "risk_profile_id": "r1", "pagination[offset]": "2", "pagination[page_size]": "1"},
        )
        list(self.client.agents.iter_agents(team_id="t9", sorting="name"))
        self.assertEqual(self.last()["query"], {"team_id": "t9", "sorting": "name"})
        self.api.fail_next(503, times=4)
        with self.assertRaisesRegex(ph.PrefactorRetryExhaustedError, "agents.list_agents"):
            self.client.agents.list_agents()

    def test_every_status_and_purpose_reaches_the_server(self):
        for purpose in ("live", "smoke_test", "eval"):
            inst = self.register(purpose=purpose)
            self.assertEqual((self.last()["body"]["purpose"], inst.purpose), (purpose, purpose))
        for status in ("pending", "active", "complete", "failed", "cancelled", "terminated"):
            span = self.client.agent_spans.create(inst.id, "s", status)
            self.assertEqual((self.last()["body"]["details"]["status"], span.status), (status, status))
        for status in ("complete", "failed", "cancelled"):
            inst = self.active_instance()
            span = self.client.agent_spans.create(inst.id, "s", "active")
            self.assertEqual(self.client.agent_spans.finish(span.id, status).status, status)
            self.assertEqual(self.client.agent_instances.finish(inst.id, status).status, status)
            self.assertEqual((self.last()["body"]["status"], self.api.instances[inst.id]["status"]), (status, status))

    def test_request_models_and_nested_models_are_sent_as_their_fields(self):
        agent = self.client.agents.create(ph.AgentVersionForRegister(name="from-model", description="d"))
        self.assertEqual(self.last()["body"]["details"], {"name": "from-model", "description": "d"})
        self.assertEqual((agent.name, agent.description), ("from-model", "d"))
        self.client.agents.update(agent.id, ph.AgentVersionForRegister(description="e"))
        self.assertEqual(self.api.agents[agent.id]["description"], "e")
        schema = ph.AgentSchemaVersionForRegister(
            external_identifier="s1", span_type_schemas=[ph.SpanTypeSchemaForCreate("agent:llm", {"type": "object"})]
        )
        self.register(agent_version=ph.AgentVersionForRegister(name="v"), agent_schema_version=schema)
        body = self.last()["body"]
        self.assertEqual(body["agent_version"], {"name": "v"})
        self.assertEqual(
            body["agent_schema_version"],
            {
                "external_identifier": "s1",
                "span_type_schemas": [{"name": "agent:llm", "params_schema": {"type": "object"}}],
            },
        )

    def test_quality_show_and_generated_keys(self):
        inst = self.register()
        self.client.agent_instances.record_quality(inst.id, "q", {"score": 1})
        self.assertEqual(self.api.instances[inst.id]["quality_payloads"], {"q": {"score": 1}})
        cleared = self.client.agent_instances.record_quality(inst.id, "q", None)
        self.assertEqual((self.last()["body"]["payload"], cleared.quality_payloads), (None, {}))
        agent = self.client.agents.create({"name": "n"})
        self.client.agents.show(agent_id=agent.id, environment_id="e1", include_risk_rollup=True)
        self.assertEqual(
            self.last()["query"], {"agent_id": agent.id, "environment_id": "e1", "include_risk_rollup": "true"}
        )
        import uuid

        keys = [r["body"]["idempotency_key"] for r in self.api.requests if r["method"] == "POST"]
        for key in keys:
            self.assertEqual(
                (uuid.UUID(key).version, uuid.UUID(key).variant, str(uuid.UUID(key))), (4, uuid.RFC_4122, key)
            )
        client, _ = make_client(self.api.url, default_idempotency_key="p" * 28)
        self.addCleanup(client.close)
        client.agent_instances.register({"name": "v"})
        self.assertEqual(len(self.last()["body"]["idempotency_key"]), 64)


class RetryPolicyTests(ApiTestCase):
    def test_the_real_jitter_stays_within_a_quarter_and_spreads(self):
        draws = [ph._random() for _ in range(2000)]
        self.assertTrue(all(0 <= d < 1 for d in draws))
        self.assertLess(min(draws), 0.05)
        self.assertGreater(max(draws), 0.95)
        config = self.api.config(initial_retry_delay=1, max_retry_delay=60)
        delays = [ph._backoff(config, 2, ph._random) for _ in range(200)]
        self.assertTrue(all(3.0 <= d <= 5.0 for d in delays), (min(delays), max(delays)))
        self.assertLess(min(delays), 3.5)
        self.assertGreater(max(delays), 4.5)
        client = PrefactorHttpClient(self.api.config(initial_retry_delay=1, max_retry_delay=60))
        self.addCleanup(client.close)
        sleeps: list = []
        client._sleep = sleeps.append  # only the sleep is pinned: the jitter is the real one
        self.api.fail_next(503, times=2)
        client.validate_token()
        self.assertEqual(len(sleeps), 2)
        self.assertTrue(0.75 <= sleeps[0] <= 1.25 and 1.5 <= sleeps[1] <= 2.5, sleeps)

    def test_500_and_504_are_retried_by_default(self):
        self.api.fail_next(500)
        self.api.fail_next(504)
        self.assertEqual(self.client.validate_token(), {"status": "success"})
        self.assertEqual((len(self.api.requests), self.sleeps), (3, [1.0, 2.0]))

    def test_parse_retry_after_edges(self):
        future = format_datetime(datetime.now(UTC) + timedelta(seconds=100), usegmt=True)
        cases = {
            None: None,
            "inf": None,
            "1e999": None,
            "-inf": 0.0,
            "0": 0.0,
            "Mon, 12 Jan 1970 13:47:40 -0000": 60.0,
            "Mon, 12 Jan 1970 13:47:40": 60.0,
            "Mon, 12 Jan 1970 14:47:40 +0100": 60.0,
            "Mon, 32 Foo 1970 13:47:40 GMT": None,
            "Mon, 12": None,
        }
        for text, wanted in cases.items():
            with self.subTest(text):
                self.assertEqual(ph._parse_retry_after(text, 1_000_000.0), wanted)
        self.assertEqual(ph._parse_retry_after("Mon, 12 Jan 1970 13:47:40 GMT"), 0.0)
        self.assertTrue(95 <= ph._parse_retry_after(future) <= 100)


class LocalApiServerTests(ApiTestCase):
    def exchange(self, request: bytes) -> bytes:
        """Send raw bytes on a new connection; everything the server sends until it closes."""
        port = int(self.api.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(request)
            data = b""
            for _ in range(1000):
                piece = sock.recv(65536)
                if not piece:
                    return data
                data += piece
        raise AssertionError("the server kept sending")

    def post(self, path: str, body) -> bytes:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n"
        return self.exchange(head.encode() + b"Connection: close\r\n\r\n" + data)

    def test_drop_before_closes_unanswered_and_unprocessed(self):
        self.api.drop_next(when="before")
        self.assertEqual(self.post("/api/v1/agent_instance/register", {"agent_version": {}}), b"")
        self.assertEqual((len(self.api.requests), self.api.instances), (1, {}))
        self.api.drop_next(when="before")
        self.register()
        self.assertEqual((len(self.api.requests), len(self.api.instances), self.sleeps), (3, 1, [1.0]))
        with self.assertRaisesRegex(ValueError, "when must be"):
            self.api.drop_next(when="later")

    def test_drop_idle_answers_then_closes_the_kept_alive_connection(self):
        self.api.drop_next(when="idle")
        ping = f"GET /api/v1/ping HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
        answer = self.exchange(ping)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)
        self.assertTrue(answer.endswith(b'{"status": "success"}'), answer)
        self.api.drop_next(when="idle")
        self.assertEqual(self.client.validate_token(), {"status": "success"})
        self.assertEqual(self.client.validate_token(), {"status": "success"})
        self.assertEqual(len(self.api.requests), 3)

    def test_faults_apply_to_their_path_and_count_down(self):
        self.api.fail_next(503, times=2, path="/api/v1/agent_instance/register")
        self.assertEqual(self.client.validate_token(), {"status": "success"})
        self.register()
        self.assertEqual(
            [r["path"].rsplit("/", 1)[1] for r in self.api.requests], ["ping", "register", "register", "register"]
        )
        self.register()
        self.assertEqual((len(self.api.requests), self.sleeps), (5, [1.0, 2.0]))

    def test_a_key_nested_in_details_is_replayed(self):
        inst = self.register()
        body = {
            "details": {
                "agent_instance_id": inst.id,
                "schema_name": "s",
                "status": "active",
                "idempotency_key": "nested-key-1",
            }
        }
        first, second = self.post("/api/v1/agent_spans", body), self.post("/api/v1/agent_spans", body)
        self.assertEqual(first.partition(b"\r\n\r\n")[2], second.partition(b"\r\n\r\n")[2])
        self.assertEqual(len(self.api.spans), 1)
        self.assertEqual(self.api.instances[inst.id]["span_counts"]["total"], 1)

    def test_what_it_stores_by_default(self):
        inst = self.register()
        stored = self.api.instances[inst.id]
        self.assertEqual(
            (stored["purpose"], stored["status"], stored["started_at"], stored["quality_payloads"]),
            ("live", "pending", None, {}),
        )
        self.assertEqual(
            stored["span_counts"], {"total": 0, "active": 0, "complete": 0, "failed": 0, "cancelled": 0, "finished": 0}
        )
        self.assertEqual(stored["inserted_at"], stored["updated_at"])
        self.assertEqual(
            (stored["finished_at"], stored["external_identifier"], stored["quality_summaries"]), (None, None, {})
        )
        self.assertIsNotNone(inst.agent_version_id)
        answer = self.client.request(
            "POST", "/api/v1/agent_instance/register", json_data={"agent_version": {}, "external_identifier": "x1"}
        )
        self.assertEqual((answer["status"], answer["details"]["external_identifier"]), ("success", "x1"))
        self.client.agent_instances.start(inst.id)
        span = self.client.agent_spans.create(inst.id, "s", "active")
        self.assertEqual((self.api.spans[span.id]["payload"], span.payload, span.result_payload), ({}, {}, None))
        self.assertIsNotNone(span.started_at)
        done = self.client.agent_spans.finish(span.id)
        self.assertEqual((done.status, self.api.instances[inst.id]["span_counts"]["finished"]), ("complete", 1))
        agent = self.client.agents.create({"name": "n"})
        self.assertEqual(
            (agent.status, agent.description, agent.team_id, agent.risk_profile_id), ("active", None, None, None)
        )
        with LocalApiServer() as api:
            config = api.config()
            self.assertEqual((config.api_token, config.trust_env), ("local-token", False))
            self.assertEqual((config.initial_retry_delay, config.max_retry_delay), (0.01, 0.5))
            with PrefactorHttpClient(config) as client:
                self.assertEqual(client.validate_token(), {"status": "success"})
        with self.assertRaises(ph.PrefactorClientError):
            api.url  # noqa: B018

    def test_error_answers_carry_their_codes(self):
        raw = b"POST /api/v1/bulk HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{x}"
        answer = self.exchange(raw.replace(b"Host: x", f"Host: x\r\nAuthorization: Bearer {TOKEN}".encode()))
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        self.assertEqual(json.loads(answer.partition(b"\r\n\r\n")[2])["code"], "invalid_json")
        client = PrefactorHttpClient(self.api.config(api_token="wrong-token"))
        self.addCleanup(client.close)
        with self.assertRaises(ph.PrefactorAuthError) as caught:
            client.validate_token()
        self.assertEqual(
            (caught.exception.code, caught.exception.message), ("unauthorized", "missing or invalid API token")
        )
        self.api.fail_next(418)
        with self.assertRaises(ph.PrefactorApiError) as caught:
            self.client.validate_token()
        self.assertEqual((caught.exception.status_code, caught.exception.code), (418, "injected"))

    def test_bulk_runs_every_item_type(self):
        inst = self.register()
        items = [
            {"_type": "agent_instances/start", "idempotency_key": "bulk-start-1", "agent_instance_id": inst.id},
            {
                "_type": "agent_spans/create",
                "idempotency_key": "bulk-span-01",
                "agent_instance_id": inst.id,
                "schema_name": "s",
                "status": "active",
                "id": "span-b1",
            },
            {
                "_type": "agent_spans/finish",
                "idempotency_key": "bulk-sfin-01",
                "agent_span_id": "span-b1",
                "status": "failed",
            },
            {
                "_type": "agent_instances/finish",
                "idempotency_key": "bulk-ifin-01",
                "agent_instance_id": inst.id,
                "status": "cancelled",
            },
            {"_type": "agents/create", "idempotency_key": "bulk-agent-1", "details": {"name": "bulk agent"}},
            {"_type": "agents/list", "idempotency_key": "bulk-list-01"},
            {
                "_type": "agent_instances/register",
                "idempotency_key": "bulk-reg-001",
                "agent_version": {"name": "v"},
                "id": "inst-b2",
            },
            {"_type": "no/such", "idempotency_key": "bulk-bad-001"},
            {"_type": "agents/list", "idempotency_key": "bulk-list-02"},
        ]
        outputs = self.client.bulk.execute(items).outputs
        self.assertEqual([outputs[i["idempotency_key"]].status for i in items[:7]], ["success"] * 7)
        self.assertEqual((outputs["bulk-bad-001"].status, outputs["bulk-bad-001"].code), ("error", "invalid_type"))
        self.assertNotIn("bulk-list-02", outputs)
        self.assertEqual(
            (self.api.instances[inst.id]["status"], self.api.spans["span-b1"]["status"]), ("cancelled", "failed")
        )
        self.assertEqual([a["name"] for a in self.api.agents.values()], ["bulk agent"])
        self.assertEqual([row["name"] for row in outputs["bulk-list-01"].summaries], ["bulk agent"])
        self.assertIn("inst-b2", self.api.instances)


# ---------------------------------------------------------------------------- #
# Retries
# ---------------------------------------------------------------------------- #


class RetryTests(ApiTestCase):
    def test_backoff_is_exponential_with_jitter_and_capped(self):
        config = HttpClientConfig(
            api_url="http://h", api_token="t", initial_retry_delay=1, retry_multiplier=2, max_retry_delay=5
        )
        self.assertEqual([ph._backoff(config, n, lambda: 0.5) for n in range(4)], [1, 2, 4, 5])
        self.assertEqual(ph._backoff(config, 1, lambda: 0.0), 1.5)
        self.assertEqual(ph._backoff(config, 1, lambda: 1.0), 2.5)

    def test_retried_statuses_resend_the_same_key_and_follow_backoff(self):
        self.api.fail_next(503, times=2)
        inst = self.register()
        posts = [r for r in self.api.requests if r["method"] == "POST"]
        self.assertEqual(len(posts), 3)
        self.assertEqual(len({r["body"]["idempotency_key"] for r in posts}), 1)
        self.assertEqual(self.sleeps, [1.0, 2.0])
        self.assertEqual(list(self.api.instances), [inst.id])

    def test_exhaustion_wraps_the_last_error(self):
        self.api.fail_next(502, times=10)
        with self.assertRaises(ph.PrefactorRetryExhaustedError) as caught:
            self.client.validate_token()
        self.assertEqual(caught.exception.last_error.status_code, 502)
        self.assertIsInstance(caught.exception.__cause__, ph.PrefactorApiError)
        self.assertEqual(len(self.api.requests), 4)
        self.assertEqual(self.sleeps, [1.0, 2.0, 4.0])

    def test_max_retries_zero_raises_the_original_error(self):
        client, sleeps = make_client(self.api.url, max_retries=0)
        self.addCleanup(client.close)
        self.api.fail_next(503)
        with self.assertRaises(ph.PrefactorApiError) as caught:
            client.validate_token()
        self.assertNotIsInstance(caught.exception, ph.PrefactorRetryExhaustedError)
        self.assertEqual(sleeps, [])

    def test_retry_on_status_codes_is_honoured(self):
        client, _ = make_client(self.api.url, retry_on_status_codes=(418,))
        self.addCleanup(client.close)
        self.api.fail_next(418)
        self.assertEqual(client.validate_token(), {"status": "success"})
        self.api.fail_next(503)
        with self.assertRaises(ph.PrefactorApiError):
            client.validate_token()
        self.assertEqual(len(self.api.requests), 3)

    def test_permanent_errors_are_not_retried(self):
        self.api.fail_next(422)
        with self.assertRaises(ph.PrefactorValidationError):
            self.client.validate_token()
        self.assertEqual((len(self.api.requests), self.sleeps), (1, []))

    def test_retry_after_seconds_replaces_the_backoff(self):
        self.api.fail_next(429, retry_after=3)
        self.client.validate_token()
        self.assertEqual(self.sleeps, [3.0])

    def test_retry_after_http_date(self):
        when = datetime.now(UTC) + timedelta(seconds=30)
        self.api.fail_next(503, retry_after=format_datetime(when, usegmt=True))
        self.client.validate_token()
        self.assertEqual(len(self.sleeps), 1)
        self.assertTrue(27 <= self.sleeps[0] <= 30, self.sleeps)

    def test_retry_after_beyond_max_retry_delay_fails_now_with_that_error(self):
        self.api.fail_next(429, retry_after=120)
        with self.assertRaises(ph.PrefactorApiError) as caught:
            self.client.validate_token()
        self.assertEqual((caught.exception.status_code, caught.exception.retry_after), (429, 120.0))
        self.assertNotIsInstance(caught.exception, ph.PrefactorRetryExhaustedError)
        self.assertEqual((len(self.api.requests), self.sleeps), (1, []))

    def test_a_wait_past_total_timeout_fails_now(self):
        client, sleeps = make_client(self.api.url, total_timeout=5)
        self.addCleanup(client.close)
        self.api.fail_next(503, retry_after=10)
        with self.assertRaises(ph.PrefactorApiError) as caught:
            client.validate_token()
        self.assertEqual((caught.exception.retry_after, sleeps), (10.0, []))

    def test_parse_retry_after(self):
        now = 1_000_000.0
        cases = {
            "5": 5.0,
            " 2.5 ": 2.5,
            "-3": 0.0,
            "": None,
            "soon": None,
            "nan": None,
            "Mon, 12 Jan 1970 13:46:40 GMT": 0.0,
            "Mon, 12 Jan 1970 13:47:40 GMT": 60.0,
        }
        for text, wanted in cases.items():
            with self.subTest(text):
                self.assertEqual(ph._parse_retry_after(text, now), wanted)


# ---------------------------------------------------------------------------- #
# Resilience: faults on the wire
# ---------------------------------------------------------------------------- #


class IdempotencyTests(ApiTestCase):
    def test_every_post_carries_a_key_and_the_prefix_is_used(self):
        client, _ = make_client(self.api.url, default_idempotency_key="myapp-")
        self.addCleanup(client.close)
        inst = client.agent_instances.register({"name": "v"}, agent_id="a")
        client.agent_instances.start(inst.id)
        span = client.agent_spans.create(inst.id, "s", "active")
        client.agent_spans.finish(span.id)
        client.agent_instances.record_quality(inst.id, "q", {"x": 1})
        client.agent_instances.finish(inst.id)
        agent = client.agents.create({"name": "n"})
        client.agents.retire(agent.id)
        posts = [r for r in self.api.requests if r["method"] == "POST"]
        self.assertEqual(len(posts), 8)
        keys = [r["body"]["idempotency_key"] for r in posts]
        self.assertEqual(len(set(keys)), 8)
        for key in keys:
            self.assertRegex(key, r"^myapp-[0-9a-f-]{36}$")

    def test_a_lost_response_retried_yields_exactly_one_record(self):
        inst = self.active_instance()
        self.api.drop_next(when="after", path="/api/v1/agent_spans")
        span = self.client.agent_spans.create(inst.id, "agent:llm", "active")
        self.assertEqual(list(self.api.spans), [span.id])
        creates = [r for r in self.api.requests if r["path"] == "/api/v1/agent_spans"]
        self.assertEqual(len(creates), 2)
        self.assertEqual(creates[0]["body"], creates[1]["body"])
        self.assertEqual(len(self.sleeps), 1)

    def test_a_dropped_request_is_retried(self):
        self.api.drop_next(when="before")
        inst = self.register()
        self.assertEqual(list(self.api.instances), [inst.id])

    def test_the_callers_key_is_sent_as_given(self):
        inst = self.register(idempotency_key="caller-key-1")
        again = self.register(idempotency_key="caller-key-1")
        self.assertEqual(inst.id, again.id)
        self.assertEqual(len(self.api.instances), 1)


class FaultTests(FaultTestCase):
    def test_idle_connection_closed_by_the_server_is_replaced_for_free(self):
        server = self.serve(
            [("reply", http_response(200, ok_body())), ("close",)], [("reply", http_response(200, ok_body()))]
        )
        client, sleeps = self.client(server.url, max_retries=0)
        client.agent_instances.get("inst-1")
        self.assertTrue(server.idle_closed.wait(5))
        (conn,) = client._transport._open
        select.select([conn.sock], [], [], 5)  # until the server's FIN has reached the client
        client.agent_instances.get("inst-1")
        self.assertEqual((server.connections, len(server.requests), sleeps), (2, 2, []))

    @unittest.skipUnless(hasattr(os, "fork"), "needs fork")
    def test_a_forked_child_opens_its_own_connection(self):
        server = self.serve([("reply", http_response(200, ok_body()))] * 2)
        client, _ = self.client(server.url, max_retries=0)
        client.agent_instances.get("inst-1")
        with warnings.catch_warnings():  # 3.12+: fork with threads running warns; the child only makes a call
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: one call, then leave without running cleanups
            try:
                client.agent_instances.get("inst-1")
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        client.agent_instances.get("inst-1")  # the parent's connection still works
        self.assertEqual((server.connections, len(server.requests)), (2, 3))

    def test_connections_are_reused(self):
        server = self.serve([("reply", http_response(200, ok_body()))] * 3)
        client, _ = self.client(server.url)
        for _ in range(3):
            client.agent_instances.get("inst-1")
        self.assertEqual(server.connections, 1)

    def assert_connection_error(self, script, cls=ph.PrefactorConnectionError, text="", **overrides):
        server = self.serve(script)
        client, _ = self.client(server.url, max_retries=0, **overrides)
        started = time.monotonic()
        with self.assertRaises(cls) as caught:
            client.agent_instances.get("inst-1")
        self.assertIn(text, str(caught.exception))
        self.assertIsNotNone(caught.exception.__cause__)
        self.assertNotIsInstance(caught.exception.__cause__, ph.PrefactorHttpError)
        return caught.exception, time.monotonic() - started

    def test_drop_before_and_after_reading_the_request(self):
        self.assert_connection_error([("drop_before",)])
        self.assert_connection_error([("drop_after",)], text="closed the connection without answering")

    def test_reset_by_peer(self):
        self.assert_connection_error([("reset",)])

    def test_truncated_body(self):
        self.assert_connection_error([("truncate", http_response(200, ok_body())[:-5])], text="cut short")

    def test_garbage_status_line(self):
        self.assert_connection_error([("reply", b"HELLO THERE\r\n\r\n")], text="malformed")

    def test_refused(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        client, _ = self.client(f"http://127.0.0.1:{port}", max_retries=0)
        with self.assertRaisesRegex(ph.PrefactorConnectionError, "refused") as caught:
            client.validate_token()
        self.assertIsInstance(caught.exception.__cause__, ConnectionRefusedError)

    def test_stall_times_out_within_request_timeout(self):
        _err, elapsed = self.assert_connection_error(
            [("stall",)], ph.PrefactorTimeoutError, "request_timeout", request_timeout=0.3
        )
        self.assertLess(elapsed, 2.0)

    def test_trickle_cannot_stretch_an_attempt(self):
        slow = http_response(200, ok_body())
        _err, elapsed = self.assert_connection_error(
            [("trickle", slow)], ph.PrefactorTimeoutError, "request_timeout", request_timeout=0.4
        )
        self.assertLess(elapsed, 2.0)

    def test_total_timeout_bounds_the_whole_call(self):
        server = self.serve([("stall",)])
        client, _ = self.client(server.url, request_timeout=10, total_timeout=0.4, max_retries=5)
        started = time.monotonic()
        with self.assertRaisesRegex(ph.PrefactorTimeoutError, "total_timeout"):
            client.validate_token()
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(server.connections, 1)

    def test_total_timeout_set_after_the_client_is_built_applies(self):
        server = self.serve([("stall",)])
        client, _ = self.client(server.url, request_timeout=10)
        client.config.total_timeout = 0.3  # as a Lambda handler does per invocation
        with self.assertRaisesRegex(ph.PrefactorTimeoutError, r"total_timeout=0.3s"):
            client.validate_token()

    def test_timeouts_and_drops_are_retried_with_backoff(self):
        server = self.serve([("drop_after",)], [("stall",)], [("reply", http_response(200, ok_body()))])
        client, sleeps = self.client(server.url, request_timeout=0.3)
        self.assertEqual(client.agent_instances.get("inst-1").id, "inst-1")
        self.assertEqual((server.connections, sleeps), (3, [1.0, 2.0]))

    def test_oversized_response_is_refused_unread(self):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 67108864\r\n\r\n{"
        server = self.serve([("reply", head)])
        client, _ = self.client(server.url, max_retries=0)
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, "67108864 bytes or more refused"):
            client.validate_token()

    def test_oversized_chunked_response_is_cut_off(self):
        chunk = b"x" * 65536
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(520))
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        server = self.serve([("reply", head + body)])
        client, _ = self.client(server.url, max_retries=0)
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, "refused"):
            client.validate_token()


class TokenSecrecyTests(FaultTestCase):
    def test_an_echoed_token_is_redacted_everywhere(self):
        echo = {
            "status": "error",
            "code": "bad_authtoken",
            "message": f"token {TOKEN} expired",
            "errors": {"token": [TOKEN]},
        }
        server = self.serve(
            [("reply", http_response(401, echo))],
            [("reply", http_response(502, f"<p>{TOKEN}</p>".encode(), {"Content-Type": "text/html"}))],
        )
        client, _ = self.client(server.url, max_retries=0)
        with self.assertLogs("prefactor_http", "DEBUG") as logs:
            with self.assertRaises(ph.PrefactorAuthError) as first:
                client.validate_token()
            client.close()
            client2, _ = self.client(server.url, max_retries=0)
            with self.assertRaises(ph.PrefactorApiError) as second:
                client2.validate_token()
        for err in (first.exception, second.exception):
            seen = " ".join([str(err), repr(err), str(err.errors), str(err.body_snippet), str(err.args)])
            self.assertNotIn(TOKEN, seen)
            self.assertIn("[REDACTED]", seen)
        self.assertNotIn(TOKEN, "\n".join(logs.output))

    def test_garbage_echoing_the_token_is_redacted_in_the_cause_too(self):
        server = self.serve([("reply", f"HTTP/1.1 {TOKEN}\r\n\r\n".encode())])
        client, _ = self.client(server.url, max_retries=0)
        with self.assertRaises(ph.PrefactorConnectionError) as caught:
            client.validate_token()
        self.assertNotIn(TOKEN, str(caught.exception) + str(caught.exception.__cause__))


class LoggingTests(ApiTestCase):
    def test_one_debug_line_per_attempt(self):
        self.api.fail_next(503)
        with self.assertLogs("prefactor_http", "DEBUG") as logs:
            self.client.validate_token()
        self.assertEqual(len(logs.records), 2)
        self.assertRegex(logs.output[0], r"GET /api/v1/ping -> PrefactorApiError: .*503.* in [\d.]+ ms \(attempt 1\)")
        self.assertRegex(logs.output[1], r"GET /api/v1/ping -> 200 in [\d.]+ ms \(attempt 2\)")


class ThreadTests(ApiTestCase):
    def test_one_client_shared_by_threads_completes_every_call_once(self):
        inst = self.active_instance()
        results: list = []
        errors: list = []

        def work():
            try:
                for _ in range(25):
                    results.append(self.client.agent_spans.create(inst.id, "s", "active").id)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 200)
        self.assertEqual(set(results), set(self.api.spans))


# ---------------------------------------------------------------------------- #
# Lifecycle through the stand-in, control signals, bulk
# ---------------------------------------------------------------------------- #


class LifecycleTests(ApiTestCase):
    def test_finishing_twice_is_a_conflict_and_before_start_a_validation_error(self):
        inst = self.register()
        with self.assertRaises(ph.PrefactorValidationError):
            self.client.agent_instances.finish(inst.id)
        self.client.agent_instances.start(inst.id)
        self.client.agent_instances.finish(inst.id, "complete")
        with self.assertRaises(ph.PrefactorConflictError) as caught:
            self.client.agent_instances.finish(inst.id, "complete")
        self.assertEqual(caught.exception.code, "invalid_action")

    def test_terminate_reaches_the_control_signal_callback(self):
        inst = self.active_instance()
        span = self.client.agent_spans.create(inst.id, "s", "active")
        self.api.terminate(inst.id, "operator stop")
        reasons: list = []
        self.client.agent_spans.finish(span.id, control_signal_callback=reasons.append)
        self.client.agent_spans.create(inst.id, "s", "active", control_signal_callback=reasons.append)
        self.assertEqual(reasons, ["operator stop", "operator stop"])
        self.assertEqual(self.client.agent_instances.get(inst.id).termination_reason, "operator stop")

    def test_bulk_runs_in_order_and_stops_at_the_first_error(self):
        inst = self.active_instance()
        items = [
            BulkItem(
                _type="agent_spans/create",
                idempotency_key="bulk-span-1",
                agent_instance_id=inst.id,
                schema_name="s",
                status="active",
            ),
            {
                "_type": "agent_spans/create",
                "idempotency_key": "bulk-span-2",
                "agent_instance_id": "nope",
                "schema_name": "s",
                "status": "active",
            },
            {
                "_type": "agent_spans/create",
                "idempotency_key": "bulk-span-3",
                "agent_instance_id": inst.id,
                "schema_name": "s",
                "status": "active",
            },
        ]
        response = self.client.bulk.execute(BulkRequest(items=items))
        self.assertEqual(self.last()["body"]["items"][0]["_type"], "agent_spans/create")
        self.assertEqual(response.outputs["bulk-span-1"].status, "success")
        self.assertEqual(response.outputs["bulk-span-2"].code, "not_found")
        self.assertNotIn("bulk-span-3", response.outputs)
        self.assertEqual(len(self.api.spans), 1)
        again = self.client.bulk.execute(items[:1])
        self.assertEqual(again.outputs["bulk-span-1"].details["id"], response.outputs["bulk-span-1"].details["id"])
        self.assertEqual(len(self.api.spans), 1)


# ---------------------------------------------------------------------------- #
# Agents, async facade
# ---------------------------------------------------------------------------- #


class AgentTests(ApiTestCase):
    def test_agent_bodies_and_queries(self):
        agents = self.client.agents
        agent = agents.create({"name": "a1", "external_identifier": "ext-1", "team_id": None})
        self.assertEqual(self.last()["body"]["details"], {"name": "a1", "external_identifier": "ext-1"})
        self.assertEqual(agents.get(agent.id).name, "a1")
        updated = agents.update(agent.id, {"description": "d"})
        self.assertEqual((self.last()["method"], self.last()["body"]), ("PUT", {"details": {"description": "d"}}))
        self.assertEqual(updated.description, "d")
        shown = agents.show(external_identifier="ext-1", include_counts=True)
        self.assertEqual(self.last()["query"], {"external_identifier": "ext-1", "include_counts": "true"})
        self.assertEqual(shown.id, agent.id)
        self.assertEqual(agents.retire(agent.id).status, "retired")
        self.assertEqual(set(self.last()["body"]), {"idempotency_key"})
        self.assertEqual(agents.reinstate(agent.id, idempotency_key="reinstate-1").status, "active")
        agents.delete(agent.id)
        self.assertEqual((self.last()["method"], self.last()["body"]), ("DELETE", None))
        self.assertEqual(self.api.agents, {})

    def test_list_and_lazy_iteration(self):
        for i in range(5):
            self.client.agents.create({"name": f"a{i}", "team_id": "t1"})
        page = self.client.agents.list_agents(team_id="t1", offset=2, page_size=2, sorting="-id")
        self.assertEqual([a.name for a in page], ["a2", "a3"])
        self.assertEqual(
            self.last()["query"],
            {"team_id": "t1", "sorting": "-id", "pagination[offset]": "2", "pagination[page_size]": "2"},
        )
        before = len(self.api.requests)
        rows = self.client.agents.iter_agents(page_size=2)
        self.assertEqual(len(self.api.requests), before)
        self.assertEqual(next(rows).name, "a0")
        self.assertEqual(len(self.api.requests), before + 1)
        self.assertEqual([a.name for a in rows], ["a1", "a2", "a3", "a4"])
        self.assertEqual(len(self.api.requests), before + 3)


class AsyncTests(ApiTestCase):
    def test_fifty_concurrent_calls_and_cancellation(self):
        for name in ("a1", "a2", "a3"):
            self.client.agents.create({"name": name})

        async def main():
            async with ph.AsyncPrefactorHttpClient(self.api.config()) as client:
                inst = await client.agent_instances.register({"name": "v"}, agent_id="a")
                await client.agent_instances.start(inst.id)
                spans = await asyncio.gather(*[client.agent_spans.create(inst.id, "s", "active") for _ in range(50)])
                self.api.fail_next(503, times=1)
                slow = asyncio.ensure_future(client.validate_token())
                await asyncio.sleep(0)
                slow.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await slow
                again = await client.agent_instances.get(inst.id)
                names = [a.name async for a in client.agents.iter_agents(page_size=2)]
                return spans, again, names

        spans, again, names = asyncio.run(main())
        self.assertEqual(len({s.id for s in spans}), 50)
        self.assertEqual(set(self.api.spans), {s.id for s in spans})
        self.assertEqual(again.span_counts.total, 50)
        self.assertEqual(names, ["a1", "a2", "a3"])

    def test_importing_loads_neither_asyncio_nor_http_server(self):
        code = "import sys, prefactor_http; print([m for m in ('asyncio', 'http.server') if m in sys.modules])"
        out = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=HERE, capture_output=True, text=True)
        self.assertEqual((out.stdout.strip(), out.stderr), ("[]", ""))


class VendoringTests(unittest.TestCase):
    def test_the_file_works_alone_without_site_packages(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        shutil.copy(os.path.join(HERE, "prefactor_http.py"), folder)
        code = (
            "import sys, prefactor_http as p\n"
            "heavy = ('asyncio', 'http.server', 'http.client', 'typing', 'logging', 'ssl', 'uuid')\n"
            "print([m for m in heavy if m in sys.modules])\n"  # the lean import the README promises
            "with p.LocalApiServer() as api, p.PrefactorHttpClient(api.config()) as c:\n"
            "    print(c.validate_token()['status'])"
        )
        out = subprocess.run(
            [sys.executable, "-E", "-S", "-W", "error", "-c", code],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((out.returncode, out.stdout.split(), out.stderr), (0, ["[]", "success"], ""))


# ---------------------------------------------------------------------------- #
# TLS and proxies
# ---------------------------------------------------------------------------- #


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""

    def copy(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    threading.Thread(target=copy, args=(a, b), daemon=True).start()
    threading.Thread(target=copy, args=(b, a), daemon=True).start()


class TlsFront(Listener):
    """Terminates TLS with the test certificate and forwards to a plain port."""

    def __init__(self, upstream_port: int, cert_file: str):
        import ssl

        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file)
        super().__init__()

    def handle(self, conn, index):
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        pipe(tls, socket.create_connection(("127.0.0.1", self.upstream_port)))


class ConnectProxy(Listener):
    """An HTTP proxy: CONNECT tunnels and absolute-form requests; records heads."""

    def __init__(self, credentials: str | None = None):
        self.credentials = credentials
        self.heads: list = []
        super().__init__()

    def handle(self, conn, index):
        head = b""
        while b"\r\n\r\n" not in head:
            piece = conn.recv(1)
            if not piece:
                conn.close()
                return
            head += piece
        lines = head.decode().split("\r\n")
        self.heads.append(lines)
        method, target, _ = lines[0].split(" ")
        auth = [line.split(": ", 1)[1] for line in lines if line.lower().startswith("proxy-authorization:")]
        if self.credentials is not None and auth != ["Basic " + self.credentials]:
            conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            conn.close()
            return
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            from urllib.parse import urlsplit

            parts = urlsplit(target)
            upstream = socket.create_connection((parts.hostname, parts.port))
            upstream.sendall(head)
        pipe(conn, upstream)


class TlsProxyTests(ApiTestCase):
    def setUp(self):
        super().setUp()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.cert_file = os.path.join(folder, "cert.pem")
        with open(self.cert_file, "w") as f:
            f.write(CERT_PEM + KEY_PEM)
        self.front = TlsFront(int(self.api.url.rsplit(":", 1)[1]), self.cert_file)
        self.addCleanup(self.front.close)
        self.https_url = f"https://127.0.0.1:{self.front.port}"
        self.addCleanup(clean_env)

    def tls_client(self, **overrides):
        client, sleeps = make_client(self.https_url, **overrides)
        self.addCleanup(client.close)
        return client, sleeps

    def test_ca_file_verifies_the_server_and_the_connection_is_reused(self):
        client, _ = self.tls_client(ca_file=self.cert_file)
        for _ in range(3):
            self.assertEqual(client.validate_token(), {"status": "success"})
        self.assertEqual(self.front.connections, 1)

    def test_a_certificate_that_does_not_verify_fails_once_and_says_so(self):
        client, sleeps = self.tls_client()
        with self.assertRaises(ph.PrefactorConnectionError) as caught:
            client.validate_token()
        self.assertIn("certificate verification failed", str(caught.exception))
        self.assertFalse(ph.is_transient_http_error(caught.exception))
        self.assertEqual((self.front.connections, sleeps, self.api.requests), (1, [], []))

    def test_ssl_cert_file_is_honoured(self):
        os.environ["SSL_CERT_FILE"] = self.cert_file
        client, _ = self.tls_client()
        self.assertEqual(client.validate_token(), {"status": "success"})

    def test_https_proxy_tunnels_with_credentials_and_verifies_end_to_end(self):
        import base64

        proxy = ConnectProxy(base64.b64encode(b"user:p@ss word").decode())
        self.addCleanup(proxy.close)
        os.environ["HTTPS_PROXY"] = f"http://user:p%40ss%20word@127.0.0.1:{proxy.port}"
        client, _ = self.tls_client(ca_file=self.cert_file, trust_env=True)
        client.validate_token()
        client.validate_token()
        self.assertRegex(proxy.heads[0][0], rf"^CONNECT 127.0.0.1:{self.front.port} HTTP/1.[01]$")
        self.assertEqual((proxy.connections, self.front.connections), (1, 1))
        self.assertEqual(len(self.api.requests), 2)
        plain, _ = self.tls_client(trust_env=True)  # through the proxy, TLS still verified
        with self.assertRaisesRegex(ph.PrefactorConnectionError, "certificate verification failed"):
            plain.validate_token()

    def test_proxy_credentials_never_show(self):
        proxy = ConnectProxy("something-else")
        self.addCleanup(proxy.close)
        os.environ["HTTPS_PROXY"] = f"http://user:hunter2secret@127.0.0.1:{proxy.port}"
        client, _ = self.tls_client(ca_file=self.cert_file, trust_env=True, max_retries=0)
        with (
            self.assertLogs("prefactor_http", "DEBUG") as logs,
            self.assertRaises(ph.PrefactorConnectionError) as caught,
        ):
            client.validate_token()
        seen = str(caught.exception) + repr(caught.exception) + "\n".join(logs.output) + repr(client)
        self.assertIn("407", seen)
        self.assertNotIn("hunter2secret", seen)
        self.assertNotIn("dXNlcjpodW50ZXIyc2VjcmV0", seen)  # base64 of user:hunter2secret

    def test_http_proxy_gets_the_absolute_url(self):
        proxy = ConnectProxy()
        self.addCleanup(proxy.close)
        os.environ["HTTP_PROXY"] = f"127.0.0.1:{proxy.port}"
        client, _ = make_client(self.api.url, trust_env=True)
        self.addCleanup(client.close)
        client.validate_token()
        self.assertEqual(proxy.heads[0][0], f"GET {self.api.url}/api/v1/ping HTTP/1.1")

    def test_no_proxy_and_trust_env_false_bypass_the_proxy(self):
        proxy = ConnectProxy()
        self.addCleanup(proxy.close)
        os.environ["HTTP_PROXY"] = f"http://127.0.0.1:{proxy.port}"
        client, _ = make_client(self.api.url, trust_env=False)
        client.validate_token()
        client.close()
        os.environ["NO_PROXY"] = "localhost,127.0.0.1"
        client, _ = make_client(self.api.url, trust_env=True)
        client.validate_token()
        client.close()
        self.assertEqual(proxy.connections, 0)

    def test_no_proxy_matching(self):
        os.environ["HTTPS_PROXY"] = "http://proxy:3128"
        cases = [
            ("", "api.example.com", True),
            ("example.com", "api.example.com", False),
            (".example.com", "api.example.com", False),
            ("ample.com", "api.example.com", True),
            ("api.example.com:443", "api.example.com", False),
            ("*", "anything", False),
            ("other.org, example.com", "example.com", False),
        ]
        for no_proxy, host, proxied in cases:
            with self.subTest(no_proxy=no_proxy, host=host):
                os.environ["NO_PROXY"] = no_proxy
                self.assertEqual(ph._proxy_for("https", host) is not None, proxied)


# ---------------------------------------------------------------------------- #
# Command line
# ---------------------------------------------------------------------------- #


class CliTests(unittest.TestCase):
    def run_cli(self, *args, url=None, token=TOKEN, stdin=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFACTOR_")}
        if url:
            env.update(PREFACTOR_API_URL=url, PREFACTOR_API_TOKEN=token)
        return subprocess.run(
            [sys.executable, "-m", "prefactor_http", *args],
            cwd=HERE,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_demo_runs_with_nothing_configured(self):
        out = self.run_cli("demo")
        self.assertEqual(out.returncode, 0, out.stderr)
        for text in (
            "using a local stand-in",
            "agent instance",
            "└─ agent:run",
            "├─ agent:llm",
            "└─ agent:tool",
            "spans: 3 total, 3 complete",
        ):
            self.assertIn(text, out.stdout)

    def test_help(self):
        for args in (["--help"], ["demo", "--help"], ["ping", "--help"], ["send", "--help"]):
            with self.subTest(args):
                out = self.run_cli(*args)
                self.assertEqual(out.returncode, 0)
                self.assertIn("usage:", out.stdout)

    def test_ping_exit_codes(self):
        with LocalApiServer(token=TOKEN) as api:
            ok = self.run_cli("ping", url=api.url)
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            self.assertRegex(ok.stdout, r"ok: .* in [\d.]+ ms")
            bad = self.run_cli("ping", url=api.url, token="wrong-token")
            self.assertEqual(bad.returncode, 2)
            self.assertIn("auth failed", bad.stdout)
        gone = self.run_cli("ping", url=api_gone_url())
        self.assertEqual(gone.returncode, 3)
        self.assertIn("network failure", gone.stdout)
        self.assertNotIn(TOKEN, ok.stdout + bad.stdout + gone.stdout)

    def test_verbose_logs_each_attempt_without_the_token(self):
        with LocalApiServer(token=TOKEN) as api:
            out = self.run_cli("-v", "ping", url=api.url)
        self.assertEqual(out.returncode, 0)
        self.assertRegex(out.stderr, r"prefactor_http GET /api/v1/ping -> 200 in [\d.]+ ms \(attempt 1\)")
        self.assertNotIn(TOKEN, out.stderr + out.stdout)

    def test_send_writes_every_failed_or_unprocessed_line_unchanged(self):
        with LocalApiServer(token=TOKEN) as api:
            with PrefactorHttpClient(api.config()) as client:
                inst = client.agent_instances.register({"name": "v"}, agent_id="a")
                client.agent_instances.start(inst.id)

            def span(key, instance=inst.id):
                return json.dumps(
                    {
                        "_type": "agent_spans/create",
                        "idempotency_key": key,
                        "agent_instance_id": instance,
                        "schema_name": "s",
                        "status": "active",
                    }
                )

            lines = [
                span("send-key-1"),
                span("send-key-2"),
                "{not json",
                span("short"),
                span("send-key-3", "missing-instance"),
                span("send-key-4"),
            ]
            folder = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, folder)
            rejects = os.path.join(folder, "rejects.jsonl")
            out = self.run_cli(
                "send", "-", "--chunk", "10", "--rejects", rejects, url=api.url, stdin="\n".join(lines) + "\n"
            )
            self.assertEqual(out.returncode, 1, out.stderr)
            self.assertEqual(len(api.spans), 2)
        with open(rejects) as f:
            self.assertEqual(f.read().splitlines(), [lines[2], lines[3], lines[4], lines[5]])
        self.assertIn("2 sent, 4 rejected", out.stdout)
        self.assertIn(rejects, out.stdout)
        self.assertIn("line 3:", out.stderr)
        self.assertIn("line 6: not processed", out.stderr)


def api_gone_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------- #
# The HTTP/1.1 reader
# ---------------------------------------------------------------------------- #


class ReaderTests(FaultTestCase):
    BODY = json.dumps(ok_body()).encode()

    def get(self, *scripts, calls=1, **overrides):
        server = self.serve(*scripts)
        client, _ = self.client(server.url, max_retries=0, **overrides)
        results = [client.agent_instances.get("inst-1") for _ in range(calls)]
        return server, results

    def test_chunked_body_with_extensions_and_trailers(self):
        half = len(self.BODY) // 2
        chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"
                   + b"%x;ext=1\r\n%s\r\n" % (half, self.BODY[:half])
                   + b"%X\r\n%s\r\n" % (len(self.BODY) - half, self.BODY[half:])
                   + b"0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
        server, results = self.get([("reply", chunked), ("reply", chunked)], calls=2)
        self.assertEqual([r.id for r in results], ["inst-1", "inst-1"])
        self.assertEqual(server.connections, 1)

    def test_http_1_0_without_length_is_read_to_the_close(self):
        answer = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + self.BODY
        server, results = self.get([("truncate", answer)], calls=2)
        self.assertEqual((results[1].id, server.connections), ("inst-1", 2))

    def test_interim_1xx_answers_are_skipped(self):
        answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + http_response(
            200, ok_body()
        )
        _, results = self.get([("reply", answer)])
        self.assertEqual(results[0].id, "inst-1")

    def test_connection_close_is_honoured(self):
        answer = http_response(200, ok_body(), {"Connection": "close", "Content-Type": "application/json"})
        server, _ = self.get([("reply", answer)], calls=3)
        self.assertEqual(server.connections, 3)

    def test_malformed_answers(self):
        cases = {
            "bad Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n{}",
            "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            "bad header line": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "bad status line": b"HTTP/2 200\r\n\r\n",
        }
        for text, answer in cases.items():
            with self.subTest(text):
                server = self.serve([("reply", answer)])
                client, _ = self.client(server.url, max_retries=0)
                with self.assertRaisesRegex(ph.PrefactorConnectionError, text):
                    client.validate_token()

    def test_cut_short_chunked_and_headers(self):
        for answer in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{}",
                       b"HTTP/1.1 200 OK\r\nContent-Le"):  # fmt: skip
            with self.subTest(answer):
                server = self.serve([("truncate", answer)])
                client, _ = self.client(server.url, max_retries=0)
                with self.assertRaisesRegex(ph.PrefactorConnectionError, "cut short|closed inside"):
                    client.validate_token()

    def test_header_names_are_case_insensitive(self):
        answer = b"HTTP/1.1 429 Too Many\r\ncontent-length: 2\r\nRETRY-AFTER: 7\r\n\r\n{}"
        server = self.serve([("reply", answer)])
        client, _ = self.client(server.url, max_retries=0)
        with self.assertRaises(ph.PrefactorApiError) as caught:
            client.validate_token()
        self.assertEqual(caught.exception.retry_after, 7.0)
