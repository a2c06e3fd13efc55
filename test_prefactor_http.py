"""Tests for prefactor_http: real servers on 127.0.0.1, real sockets, no mocks.

Two tiers of server: ``LocalApiServer`` (the stateful stand-in shipped in the
module) for behaviour, and ``FaultServer`` below, a raw-socket server that plays a
script of actions per connection to inject faults. ``sleep`` and ``random`` are
injected into clients so backoff is asserted exactly and nothing waits.

Run: ``python3 -m unittest -v`` (nothing to install) or ``pytest``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import http.client
import io
import json
import math
import os
import random
import re
import select
import shutil
import signal
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

    def test_a_host_name_may_end_in_a_dot(self):
        self.assertEqual(
            HttpClientConfig(api_url="https://api.example.com./", api_token=TOKEN).api_url, "https://api.example.com./"
        )
        with self.assertRaisesRegex(ValueError, "api_url"):
            HttpClientConfig(api_url="https://api..example.com/", api_token=TOKEN)

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
        self.assertEqual(get["user-agent"], "prefactor-http-stdlib/0.2.0 python/{}.{}".format(*sys.version_info[:2]))
        self.assertEqual(get["x-prefactor-sdk"], "prefactor-http-stdlib@0.2.0")
        self.assertNotIn("content-type", get)
        upstream = PrefactorHttpClient(self.api.config(), sdk_header="prefactor-core@0.5.3")
        self.addCleanup(upstream.close)
        upstream.agent_instances.register({"name": "v"}, agent_id="a")
        post = {k.lower(): v for k, v in self.last()["headers"].items()}
        self.assertEqual(post["content-type"], "application/json")
        self.assertEqual(post["x-prefactor-sdk"], "prefactor-core@0.5.3 prefactor-http-stdlib@0.2.0")

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

    def test_request_takes_the_five_methods_and_a_path_only(self):
        self.api.fail_next(404, times=1)  # PATCH has no route in the stand-in: it answers, so it was sent
        with self.assertRaises(ph.PrefactorNotFoundError):
            self.client.request("patch", "/api/v1/nothing", json_data={"a": 1})
        self.assertEqual(self.last()["method"], "PATCH")
        sent = len(self.api.requests)
        for method, path in (
            ("TRACE", "/x"),
            ("", "/x"),
            ("GET", "x"),
            ("GET", "/a b"),
            ("GET", "/a#b"),
            ("GET", b"/x"),
        ):
            with self.subTest(method=method, path=path), self.assertRaises(ValueError):
                self.client.request(method, path)
        self.assertEqual(len(self.api.requests), sent)

    def test_closing_during_a_retry_wait_stops_the_call(self):
        self.api.fail_next(503)
        self.client._sleep = lambda delay: self.client.close()  # another thread closes it meanwhile
        with self.assertRaisesRegex(ph.PrefactorClientError, "closed during the call"):
            self.client.validate_token()
        self.assertEqual(len(self.api.requests), 1)
        self.assertEqual(self.client._transport._open, {})

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

    def test_bools_are_not_page_numbers_and_a_body_that_is_not_json_names_json_data(self):
        cases = [
            ("page_size must be an integer", lambda: self.client.agents.list_agents(page_size=True)),
            ("offset must be a non-negative integer", lambda: self.client.agents.list_agents(offset=False)),
            ("page_size must be an integer", lambda: next(self.client.agents.iter_agents(page_size=False))),
            ("POST /api/v1/agent: json_data is not valid JSON", lambda: self.request_body([math.nan])),
            ("POST /api/v1/agent: json_data is not valid JSON", lambda: self.request_body({1, 2})),
        ]
        for text, call in cases:
            with self.subTest(text), self.assertRaisesRegex(ValueError, text):
                call()
        self.assertEqual(self.api.requests, [])

    def request_body(self, body):
        return self.client.request("POST", "/api/v1/agent", json_data=body)

    def test_the_stand_in_answers_a_handler_bug_with_a_500_envelope(self):
        client, _ = make_client(self.api.url, max_retries=0)
        self.addCleanup(client.close)
        with self.assertRaises(ph.PrefactorApiError) as caught:  # the stand-in's list handler: int("x")
            client.request("GET", "/api/v1/agent", params={"pagination[offset]": "x"})
        self.assertEqual((caught.exception.status_code, caught.exception.code), (500, "internal_error"))
        self.assertEqual(len(self.api.requests), 1)

    def test_ids_are_one_percent_encoded_path_segment(self):
        with self.assertRaises(ph.PrefactorNotFoundError):
            self.client.agent_instances.get("../x?y")
        self.assertEqual(self.api.requests[-1]["path"], "/api/v1/agent_instance/..%2Fx%3Fy")


# ---------------------------------------------------------------------------- #
# Mutation-guided tests (issue 12): the less-used doors of each section
# ---------------------------------------------------------------------------- #


class PublicSurfaceTests(unittest.TestCase):
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
            "-inf": None,
            "-3": 0.0,
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
        self.assertEqual(self.sleeps, [])  # the closed connection was replaced for free (promise 1)

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

    def test_backoff_never_overflows_it_is_capped(self):
        client, sleeps = make_client(self.api.url, max_retries=4, retry_multiplier=1e200, max_retry_delay=30)
        self.addCleanup(client.close)
        self.api.fail_next(503, times=4)
        self.assertEqual(client.validate_token(), {"status": "success"})
        self.assertEqual((sleeps, len(self.api.requests)), ([1.0, 30, 30, 30], 5))
        config = HttpClientConfig(api_url="http://h", api_token="t", max_retry_delay=7)
        self.assertEqual(ph._backoff(config, 1100, lambda: 0.5), 7)

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

    def test_retry_after_beyond_max_retry_delay_on_the_last_attempt_is_still_that_error(self):
        client, sleeps = make_client(self.api.url, max_retries=1)
        self.addCleanup(client.close)
        for last, retry_after in ((True, 120), (False, "9" * 400)):  # so many digits that it is infinity
            with self.subTest(retry_after=retry_after):
                if last:  # one attempt fails first, so the 429 comes on the last attempt allowed
                    self.api.fail_next(503)
                self.api.fail_next(429, retry_after=retry_after)
                with self.assertRaises(ph.PrefactorApiError) as caught:
                    client.validate_token()
                self.assertNotIsInstance(caught.exception, ph.PrefactorRetryExhaustedError)
                self.assertEqual(caught.exception.retry_after, float(retry_after))
        self.assertEqual((len(self.api.requests), sleeps), (3, [1.0]))

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
            "1_0": None,
            "1e3": None,
            "inf": None,
            "\u0661": None,  # ARABIC-INDIC DIGIT ONE: a digit, but not an ASCII one
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
        self.assertEqual(self.sleeps, [])  # lost on a reused connection: resent at once (promise 1)

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
        (sock,) = client._transport._open
        select.select([sock], [], [], 5)  # until the server's FIN has reached the client
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

    def test_the_log_line_leaves_the_query_out_and_counts_milliseconds(self):
        clock = iter([100.0, 100.25, 100.25, 100.25, 100.25, 100.25])
        with self.assertLogs("prefactor_http", "DEBUG") as logs:
            real = ph._monotonic
            ph._monotonic = lambda: next(clock, 100.25)
            try:
                self.client.request("GET", "/api/v1/ping", params={"secret_filter": "x"})
            finally:
                ph._monotonic = real
        self.assertNotIn("secret_filter", logs.output[0])
        self.assertRegex(logs.output[0], r"GET /api/v1/ping -> 200 in 250\.0 ms \(attempt 1\)")


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
# The public surface, the limits, LocalApiServer as users' tests see it, the CLI
# ---------------------------------------------------------------------------- #

PFID = r"[0-7][0-9abcdefghjkmnpqrstvwxyz]{31}"


def pfid_value(text: str) -> int:
    return int(text.translate(str.maketrans("abcdefghjkmnpqrstvwxyz", "abcdefghijklmnopqrstuv")), 32)


def call_raw(api, method, path, body=None, *, token=TOKEN, data=None):
    """One request to ``api`` through http.client: (status, headers, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(api.url.rsplit(":", 1)[1]), timeout=10)
    try:
        if data is None and body is not None:
            data = json.dumps(body).encode()
        conn.request(method, path, data, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


class PublicSurfaceOnTheWireTests(ApiTestCase):
    def test_all_names_exactly_the_public_api_and_version_is_the_one_on_the_wire(self):
        expected = {
            "HttpClientConfig", "PrefactorHttpClient", "AsyncPrefactorHttpClient",
            "AgentInstance", "AgentInstanceSpanCounts", "AgentSpan", "Agent", "AgentSummary", "ListResponse",
            "Pagination", "BulkItem", "BulkRequest", "BulkOutput", "BulkResponse",
            "AgentVersionForRegister", "AgentSchemaVersionForRegister", "SpanTypeSchemaForCreate",
            "RuntimeEnvironment", "QualitySchemaForCreate", "QualitySchemaDetails", "FinishInstanceRequest",
            "AgentInstanceRecordQuality", "ApiResponse", "AgentStatus", "FinishStatus", "InstancePurpose",
            "PrefactorHttpError", "PrefactorApiError", "PrefactorAuthError", "PrefactorNotFoundError",
            "PrefactorConflictError", "PrefactorValidationError", "PrefactorConnectionError", "PrefactorTimeoutError",
            "PrefactorResponseContractError", "PrefactorRetryExhaustedError", "PrefactorClientError",
            "is_transient_http_error", "is_permanent_http_error", "LocalApiServer",
        }  # fmt: skip
        self.assertEqual(len(ph.__all__), len(expected))
        self.assertEqual(set(ph.__all__), expected)
        namespace: dict = {}
        exec("from prefactor_http import *", namespace)  # every name resolves
        self.assertEqual(set(namespace) - {"__builtins__"}, expected)
        self.assertEqual(
            ph.AgentStatus.__args__, ("pending", "active", "complete", "failed", "cancelled", "terminated")
        )
        self.assertEqual(ph.FinishStatus.__args__, ("complete", "failed", "cancelled"))
        self.assertEqual(ph.InstancePurpose.__args__, ("live", "smoke_test", "eval"))
        self.assertRegex(ph.__version__, r"^\d+\.\d+\.\d+$")
        self.client.validate_token()
        headers = {k.lower(): v for k, v in self.last()["headers"].items()}
        self.assertEqual(headers["x-prefactor-sdk"], f"prefactor-http-stdlib@{ph.__version__}")
        self.assertTrue(headers["user-agent"].startswith(f"prefactor-http-stdlib/{ph.__version__} python/"))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), self.assertRaises(SystemExit) as caught:
            ph.main(["--version"])
        self.assertEqual((caught.exception.code, stdout.getvalue()), (0, f"prefactor-http {ph.__version__}\n"))

    def test_each_status_and_purpose_is_accepted_where_the_api_takes_it(self):
        for purpose in ("live", "smoke_test", "eval"):
            self.assertEqual(self.register(purpose=purpose).purpose, purpose)
        inst = self.active_instance()
        for status in ("pending", "active", "complete", "failed", "cancelled", "terminated"):
            self.assertEqual(self.client.agent_spans.create(inst.id, "s", status).status, status)
        for status in ("complete", "failed", "cancelled"):
            span = self.client.agent_spans.create(inst.id, "s", "active")
            self.assertEqual(self.client.agent_spans.finish(span.id, status).status, status)
            other = self.active_instance()
            self.assertEqual(self.client.agent_instances.finish(other.id, status).status, status)
            with self.assertRaisesRegex(ph.PrefactorConflictError, f"agent span is already {status}"):
                self.client.agent_spans.finish(span.id)
            with self.assertRaisesRegex(ph.PrefactorConflictError, f"agent instance is already {status}"):
                self.client.agent_instances.finish(other.id)

    def test_each_endpoint_names_the_bad_argument_before_sending(self):
        naive = datetime(2026, 1, 1)
        instances, spans, agents = self.client.agent_instances, self.client.agent_spans, self.client.agents
        cases = [
            ("agent_version is required", lambda: instances.register(None)),
            ("^agent_schema_version must be a dict, got list", lambda: instances.register({}, [])),
            ("^status must be one of complete, failed, cancelled; got 'done'", lambda: spans.finish("s", "done")),
            ("^timestamp must be timezone-aware", lambda: instances.finish("i", timestamp=naive)),
            ("^agent_instance_id must be a non-empty id", lambda: instances.get(" ")),
            ("^name must be a non-empty string", lambda: instances.record_quality("i", "", {})),
            ("^agent_instance_id must be a non-empty id", lambda: spans.create(" ", "s", "active")),
            ("^schema_name must be a non-empty string", lambda: spans.create("i", "", "active")),
            ("^started_at must be timezone-aware", lambda: spans.create("i", "s", "active", started_at=naive)),
            ("^finished_at must be timezone-aware", lambda: spans.create("i", "s", "active", finished_at=naive)),
            ("^agent_span_id must be a non-empty id", lambda: spans.finish("..")),
            ("^timestamp must be timezone-aware", lambda: spans.finish("s", timestamp=naive)),
            ("^agent_id must be a non-empty id", lambda: agents.retire(".")),
            (r"details\['name'\] is required", lambda: agents.create({"description": "d"})),
            ("^details must be a dict, got str", lambda: agents.update("a", "d")),
            ("^page_size must be an integer from 1 to 100, got 0", lambda: agents.list_agents(page_size=0)),
            ("^page_size must be an integer from 1 to 100, got 101", lambda: agents.list_agents(page_size=101)),
            ("^offset must be a non-negative integer, got -1", lambda: agents.list_agents(offset=-1)),
        ]
        for text, call in cases:
            with self.subTest(text), self.assertRaisesRegex((ValueError, TypeError), text):
                call()
        self.assertEqual(self.api.requests, [])
        self.assertEqual(len(agents.list_agents(offset=0, page_size=100)), 0)  # the edges themselves are fine
        self.assertEqual(len(agents.list_agents(page_size=1)), 0)


class LimitTests(FaultTestCase):
    def test_the_documented_limits_hold_at_their_edges(self):
        api = LocalApiServer(token=TOKEN).start()
        self.addCleanup(api.stop)
        client, _ = self.client(api.url)
        inst = client.agent_instances.register({"name": "v"}, agent_id="a", idempotency_key="k" * 64)
        self.assertEqual(api.requests[-1]["body"]["idempotency_key"], "k" * 64)
        with self.assertRaisesRegex(ValueError, "at most 64 characters, got 65"):
            client.agent_instances.start(inst.id, idempotency_key="k" * 65)
        BulkRequest([BulkItem(_type="agents/list", idempotency_key=key) for key in ("k" * 8, "q" * 64)])
        for key in ("k" * 7, "k" * 65):
            with self.subTest(len(key)), self.assertRaisesRegex(ValueError, f"must be 8-64 characters, got {len(key)}"):
                BulkItem(_type="agents/list", idempotency_key=key)
        prefixed, _ = self.client(api.url, default_idempotency_key="p" * 28)
        prefixed.agent_instances.start(inst.id)
        self.assertRegex(api.requests[-1]["body"]["idempotency_key"], r"^p{28}[0-9a-f-]{36}$")
        with self.assertRaisesRegex(ValueError, "default_idempotency_key"):
            HttpClientConfig(api_url=api.url, api_token=TOKEN, default_idempotency_key="p" * 29)
        too_big = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 33554433\r\n\r\n{"
        not_json = http_response(200, b"<p>" + b"word " * 100 + b"</p>", {"Content-Type": "text/html"})
        head = b'{"code": "too_long", "message": "m", "pad": "'
        over_a_mib = head + b" " * (1024 * 1024 + 8 - len(head)) + b'"}'  # its envelope lies past the first MiB
        long_error = http_response(422, over_a_mib)
        server = self.serve([("reply", too_big)], [("reply", not_json), ("reply", long_error)])
        bounded, _ = self.client(server.url, max_retries=0)
        with self.assertRaisesRegex(
            ph.PrefactorResponseContractError, r"33554433 bytes or more refused \(limit 33554432"
        ):
            bounded.validate_token()
        with self.assertRaises(ph.PrefactorResponseContractError) as caught:
            bounded.validate_token()
        self.assertEqual(caught.exception.body_snippet, ("<p>" + "word " * 100)[:200] + "...")
        with self.assertRaises(ph.PrefactorValidationError) as caught:
            bounded.validate_token()
        self.assertEqual(caught.exception.code, "unknown")  # an error body is read in its first MiB only


class LocalApiServerContractTests(ApiTestCase):
    def test_a_fault_for_zero_requests_is_no_fault(self):
        self.api.fail_next(503, times=0)
        self.api.drop_next(times=0)
        self.assertEqual(self.client.validate_token(), {"status": "success"})
        self.assertEqual((len(self.api.requests), self.sleeps), (1, []))

    def test_a_replay_is_the_first_answer_as_it_was_sent(self):
        inst = self.register()
        first = self.client.agent_instances.start(inst.id, idempotency_key="start-key-0001")
        self.client.agent_instances.finish(inst.id, status="complete")
        again = self.client.agent_instances.start(inst.id, idempotency_key="start-key-0001")
        self.assertEqual((first.status, again.status), ("active", "active"))  # not the finished record
        self.assertEqual(self.api.instances[inst.id]["status"], "complete")
        register = {"_type": "agent_instances/register", "idempotency_key": "bulk-reg-0001", "id": "bulk-i-1"}
        register["agent_version"] = {"name": "b", "external_identifier": "v1"}
        start = {"_type": "agent_instances/start", "idempotency_key": "bulk-start-01", "agent_instance_id": "bulk-i-1"}
        outputs = self.client.bulk.execute([register, start]).outputs
        self.assertEqual(outputs["bulk-reg-0001"].details["status"], "pending")  # as it was when registered

    """LocalApiServer answers as the API does (api/prefactor-api.md): users' tests rely on it."""

    def assert_recent(self, text):
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        self.assertLess(abs((datetime.now(UTC) - when).total_seconds()), 60)

    def test_records_have_the_fields_of_the_api(self):
        status, _, body = call_raw(self.api, "POST", "/api/v1/agent_instance/register", {"agent_version": {}})
        self.assertEqual((status, set(body), body["status"]), (200, {"status", "details"}, "success"))
        inst = body["details"]
        self.assertEqual(
            set(inst),
            {"type", "id", "account_id", "agent_id", "agent_version_id", "environment_id", "agent_deployment_id"}
            | {"status", "inserted_at", "updated_at", "started_at", "finished_at", "termination_reason", "purpose"}
            | {"external_identifier", "quality_payloads", "quality_summaries", "span_counts"},
        )
        self.assertEqual((inst["type"], inst["status"], inst["purpose"]), ("agent_instance", "pending", "live"))
        ids = [inst[k] for k in ("id", "account_id", "agent_id", "agent_version_id", "environment_id")]
        for value in ids:
            self.assertRegex(value, f"^{PFID}$")
        self.assertEqual(
            inst["span_counts"], dict.fromkeys(("total", "active", "complete", "failed", "cancelled", "finished"), 0)
        )
        self.assertEqual(
            [inst[k] for k in ("started_at", "finished_at", "termination_reason", "external_identifier")], [None] * 4
        )
        self.assertEqual(inst["inserted_at"], inst["updated_at"])
        self.assert_recent(inst["inserted_at"])

        chosen = self.register(id="inst-chosen", purpose="eval", external_identifier="ext-1")
        self.assertEqual(
            (chosen.id, chosen.agent_id, chosen.purpose, chosen.external_identifier),
            ("inst-chosen", "agent-1", "eval", "ext-1"),
        )
        at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        self.client.agent_instances.start(chosen.id, timestamp=at)
        stored = self.api.instances["inst-chosen"]
        self.assertEqual((stored["status"], stored["started_at"]), ("active", "2026-01-02T03:04:05.000000Z"))
        span = self.client.agent_spans.create(chosen.id, "agent:llm", "active", started_at=at, parent_span_id="p-1")
        stored_span = self.api.spans[span.id]
        self.assertEqual(
            set(stored_span),
            {"type", "id", "account_id", "agent_id", "agent_instance_id", "parent_span_id", "schema_name"}
            | {"schema_title", "status", "payload", "result_payload", "summary", "started_at", "finished_at"}
            | {"inserted_at", "updated_at"},
        )
        self.assertEqual(
            [stored_span[k] for k in ("type", "account_id", "agent_id", "agent_instance_id", "parent_span_id")],
            ["agent_span", stored["account_id"], "agent-1", "inst-chosen", "p-1"],
        )
        self.assertEqual([stored_span[k] for k in ("payload", "result_payload", "finished_at")], [{}, None, None])
        self.assertEqual(stored_span["started_at"], "2026-01-02T03:04:05.000000Z")
        self.assert_recent(stored_span["inserted_at"])
        ended = datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)
        self.client.agent_spans.finish(span.id, "failed", {"error": "boom"}, timestamp=ended)
        self.assertEqual(
            [stored_span[k] for k in ("status", "result_payload", "finished_at")],
            ["failed", {"error": "boom"}, "2026-01-02T03:04:06.000000Z"],
        )
        self.client.agent_spans.create(chosen.id, "s", "active")
        closed = self.client.agent_spans.create(chosen.id, "s", "cancelled", started_at=at, finished_at=ended)
        self.assertEqual(self.api.spans[closed.id]["finished_at"], "2026-01-02T03:04:06.000000Z")
        self.client.agent_instances.record_quality(chosen.id, "q1", {"score": 1})
        self.client.agent_instances.record_quality(chosen.id, "q2", {"score": 2})
        self.client.agent_instances.record_quality(chosen.id, "q1", None)
        self.assertEqual(stored["quality_payloads"], {"q2": {"score": 2}})
        finished = self.client.agent_instances.finish(chosen.id, timestamp=ended)
        self.assertEqual((finished.status, stored["finished_at"]), ("complete", "2026-01-02T03:04:06.000000Z"))
        self.assertEqual(
            stored["span_counts"], {"total": 3, "active": 1, "complete": 0, "failed": 1, "cancelled": 1, "finished": 2}
        )

        status, headers, body = call_raw(self.api, "POST", "/api/v1/agent", {"details": {"name": "a"}})
        self.assertEqual(headers["Content-Type"], "application/json")
        agent = body["details"]
        self.assertEqual(
            set(agent),
            {"type", "id", "name", "status", "description", "external_identifier", "owner_person_id"}
            | {"risk_profile_id", "team_id", "inserted_at", "updated_at"},
        )
        self.assertEqual((status, body["status"], agent["type"], agent["status"]), (200, "success", "agent", "active"))
        self.assertEqual(
            [agent[k] for k in ("description", "external_identifier", "owner_person_id", "risk_profile_id", "team_id")],
            [None] * 5,
        )
        self.assertEqual(agent["inserted_at"], agent["updated_at"])
        self.assert_recent(agent["inserted_at"])
        ids += [agent["id"], span.id]
        self.assertTrue(set("".join(ids)) & set("13579bdfhkn"), ids)  # random bits use the whole alphabet
        values = [pfid_value(value) for value in ids]
        now_ms = time.time() * 1000
        for value in values:  # 48-bit milliseconds first (ids sort by time), then random bits
            self.assertLess(abs((value >> 112) - now_ms), 60_000)
        self.assertEqual(len({value & (2**112 - 1) for value in values}), len(ids))
        self.assertEqual(self.client.agents.show(agent_id=agent["id"]).id, agent["id"])
        for method, path in (("GET", f"/api/v1/agent/{agent['id']}"), ("GET", "/api/v1/agent_instance/inst-chosen")):
            self.assertEqual(call_raw(self.api, method, path)[2]["status"], "success")
        for action in ("retire", "reinstate"):
            answer = call_raw(self.api, "POST", f"/api/v1/agent/{agent['id']}/{action}", {})[2]
            self.assertEqual((answer["status"], answer["details"]["id"]), ("success", agent["id"]))

    def test_every_success_answer_has_the_success_envelope(self):
        inst = self.register()
        agent = {"name": "a", "id": "agent-chosen", "external_identifier": "ext-a"}
        span = {"agent_instance_id": inst.id, "schema_name": "s", "status": "active", "id": "span-chosen"}
        item = {"_type": "agents/list", "idempotency_key": "bulk-list-1"}
        calls = [
            ("POST", "/api/v1/agent", {"details": agent}, "details"),
            ("PUT", "/api/v1/agent/agent-chosen", {"details": {"description": "d"}}, "details"),
            ("GET", "/api/v1/agent/agent-chosen", None, "details"),
            ("GET", "/api/v1/agent/show?external_identifier=ext-a", None, "details"),
            ("GET", "/api/v1/agent/show?agent_id=agent-chosen", None, "details"),
            ("POST", "/api/v1/agent/agent-chosen/retire", {}, "details"),
            ("POST", "/api/v1/agent/agent-chosen/reinstate", {}, "details"),
            ("GET", "/api/v1/agent", None, "summaries"),
            ("POST", f"/api/v1/agent_instance/{inst.id}/start", {}, "details"),
            ("POST", "/api/v1/agent_spans", {"details": span}, "details"),
            ("POST", "/api/v1/agent_spans/span-chosen/finish", {}, "details"),
            ("POST", f"/api/v1/agent_instance/{inst.id}/record_quality", {"name": "q", "payload": {}}, "details"),
            ("POST", f"/api/v1/agent_instance/{inst.id}/finish", {}, "details"),
            ("GET", f"/api/v1/agent_instance/{inst.id}", None, "details"),
            ("POST", "/api/v1/bulk", {"items": [item]}, "outputs"),
            ("DELETE", "/api/v1/agent/agent-chosen", {}, "details"),
            ("GET", "/api/v1/ping", None, None),
        ]
        for method, path, body, part in calls:
            with self.subTest(method=method, path=path):
                status, _, answer = call_raw(self.api, method, path, body)
                self.assertEqual((status, answer["status"]), (200, "success"))
                self.assertEqual(set(answer) - {"pagination", "sorting"}, {"status"} | ({part} if part else set()))
        self.assertEqual(self.api.instances[inst.id]["status"], "complete")
        self.assertEqual(self.api.spans["span-chosen"]["status"], "complete")
        self.assertEqual(self.api.agents, {})

    def test_error_answers_carry_the_status_code_and_message_of_the_api(self):
        pending = self.register()
        active = self.active_instance()
        done = self.client.agent_spans.create(active.id, "s", "active")
        self.client.agent_spans.finish(done.id)
        waiting = self.client.agent_spans.create(active.id, "s", "pending")
        agent = self.client.agents.create({"name": "a"})
        self.client.agents.retire(agent.id)
        required = ["is required"]
        bad_span = {"details": {"status": "running"}}
        cases = [
            ("GET", "/api/v1/agent_instance/nope", None, 404, "not_found", "agent instance nope not found", None),
            ("POST", "/api/v1/agent_instance/register", {}, 422, "validation_error", "agent_version is required",
             {"agent_version": required}),
            ("POST", f"/api/v1/agent_instance/{active.id}/start", {}, 409, "invalid_action",
             "cannot start an instance that is active", None),
            ("POST", f"/api/v1/agent_instance/{pending.id}/finish", {}, 422, "validation_error",
             "agent instance must be active to finish", {"status": ["must be active"]}),
            ("POST", f"/api/v1/agent_instance/{active.id}/finish", {"status": "done"}, 422, "validation_error",
             "invalid status 'done'", {"status": ["is invalid"]}),
            ("POST", f"/api/v1/agent_instance/{active.id}/record_quality", {"name": ""}, 422, "validation_error",
             "name is required", {"name": required}),
            ("POST", "/api/v1/agent_spans", {}, 422, "validation_error", "details is required", {"details": required}),
            ("POST", "/api/v1/agent_spans", bad_span, 422, "validation_error", "invalid span",
             {"agent_instance_id": required, "schema_name": required, "status": ["is invalid"]}),
            ("POST", "/api/v1/agent_spans", {"details": {"agent_instance_id": active.id, "schema_name": "s"}}, 422,
             "validation_error", "invalid span", {"status": required}),
            ("POST", "/api/v1/agent_spans/nope/finish", {}, 404, "not_found", "agent span nope not found", None),
            ("POST", f"/api/v1/agent_spans/{done.id}/finish", {}, 409, "invalid_action",
             "agent span is already complete", None),
            ("POST", f"/api/v1/agent_spans/{waiting.id}/finish", {"status": "complete"}, 422, "validation_error",
             "cannot finish a pending span as complete", {"status": ["is invalid"]}),
            ("GET", "/api/v1/agent/nope", None, 404, "not_found", "agent nope not found", None),
            ("POST", "/api/v1/agent", {"details": {}}, 422, "validation_error", "details.name is required",
             {"name": required}),
            ("PUT", f"/api/v1/agent/{agent.id}", {"details": {"external_identifier": "x"}}, 422, "validation_error",
             "external_identifier cannot be changed", None),
            ("POST", f"/api/v1/agent/{agent.id}/retire", {}, 409, "invalid_action", "agent is already retired", None),
            ("GET", "/api/v1/agent/show?external_identifier=nope", None, 404, "not_found", "no such agent", None),
            ("POST", "/api/v1/bulk", {"items": []}, 422, "validation_error", "items must be a non-empty list",
             {"items": required}),
            ("GET", "/api/v1/nope", None, 404, "not_found", "no route for GET /api/v1/nope", None),
        ]  # fmt: skip
        for method, path, body, status, code, message, errors in cases:
            with self.subTest(path=path, message=message):
                wanted = {
                    "status": "error",
                    "code": code,
                    "message": message,
                    **({} if errors is None else {"errors": errors}),
                }
                self.assertEqual(call_raw(self.api, method, path, body)[::2], (status, wanted))
        self.assertEqual(
            call_raw(self.api, "POST", "/api/v1/agent", data=b"{not json")[::2],
            (400, {"status": "error", "code": "invalid_json", "message": "the request body is not JSON"}),
        )
        stranger = PrefactorHttpClient(self.api.config(api_token="wrong-token"))
        self.addCleanup(stranger.close)
        with self.assertRaises(ph.PrefactorAuthError) as caught:
            stranger.agents.create({"name": "b"})
        self.assertEqual(
            (caught.exception.status_code, caught.exception.code, caught.exception.message),
            (401, "unauthorized", "missing or invalid API token"),
        )
        self.assertEqual([a["name"] for a in self.api.agents.values()], ["a"])
        self.assertEqual([s["status"] for s in self.api.spans.values()], ["complete", "pending"])
        self.assertEqual(self.client.agent_spans.finish(waiting.id, "cancelled").status, "cancelled")

    def test_bulk_runs_every_item_type_in_order_and_stops_at_an_unknown_type(self):
        items = [
            {"_type": "agent_instances/register", "idempotency_key": "bulk-reg-01", "id": "inst-b",
             "agent_version": {"name": "v"}},
            {"_type": "agent_instances/start", "idempotency_key": "bulk-start-1", "agent_instance_id": "inst-b"},
            {"_type": "agent_spans/create", "idempotency_key": "bulk-span-01", "agent_instance_id": "inst-b",
             "id": "span-b", "schema_name": "s", "status": "active"},
            {"_type": "agent_spans/finish", "idempotency_key": "bulk-sfin-01", "agent_span_id": "span-b",
             "status": "failed"},
            {"_type": "agent_instances/finish", "idempotency_key": "bulk-ifin-01", "agent_instance_id": "inst-b",
             "status": "cancelled"},
            {"_type": "agents/create", "idempotency_key": "bulk-agent-1", "details": {"name": "bulk agent"}},
            {"_type": "agents/list", "idempotency_key": "bulk-list-01"},
            {"_type": "agents/frobnicate", "idempotency_key": "bulk-frob-01"},
            {"_type": "agents/create", "idempotency_key": "bulk-agent-2", "details": {"name": "never"}},
        ]  # fmt: skip
        outputs = self.client.bulk.execute(items).outputs
        self.assertEqual(list(outputs), [item["idempotency_key"] for item in items[:8]])
        self.assertEqual([o.status for o in outputs.values()], ["success"] * 7 + ["error"])
        frob = outputs["bulk-frob-01"]
        self.assertEqual((frob.code, frob.message), ("invalid_type", "unknown _type 'agents/frobnicate'"))
        self.assertEqual(
            (self.api.instances["inst-b"]["status"], self.api.spans["span-b"]["status"]), ("cancelled", "failed")
        )
        self.assertEqual(self.api.spans["span-b"]["agent_instance_id"], "inst-b")
        self.assertEqual(
            [o.details["id"] for o in list(outputs.values())[:5]], ["inst-b", "inst-b", "span-b", "span-b", "inst-b"]
        )
        self.assertEqual([a["name"] for a in self.api.agents.values()], ["bulk agent"])
        self.assertEqual([a["name"] for a in outputs["bulk-list-01"].summaries], ["bulk agent"])
        self.assertEqual(len(self.api.requests), 1)

    def test_faults_hit_the_requests_they_name(self):
        once, _ = make_client(self.api.url, max_retries=0)
        self.addCleanup(once.close)
        self.api.fail_next(503, times=2, retry_after=7, path="/api/v1/ping")
        inst = self.register()  # another path: answered
        for _ in range(2):
            with self.assertRaises(ph.PrefactorApiError) as caught:
                once.validate_token()
            error = caught.exception
            self.assertEqual(
                (error.status_code, error.code, error.message, error.retry_after),
                (503, "injected", "injected fault: HTTP 503", 7.0),
            )
        self.assertEqual(once.validate_token(), {"status": "success"})
        self.api.fail_next(500)  # any path, once
        with self.assertRaises(ph.PrefactorApiError) as caught:
            once.agent_instances.get(inst.id)
        self.assertEqual((caught.exception.status_code, caught.exception.retry_after), (500, None))
        self.assertEqual(once.agent_instances.get(inst.id).id, inst.id)

        def fresh():  # a new connection: a dropped reused one would be resent at once (promise 1)
            client = PrefactorHttpClient(self.api.config(max_retries=0))
            self.addCleanup(client.close)
            return client

        def answer_to_register(instance_id):  # every byte the server sends back, to its close
            body = json.dumps({"agent_version": {}, "id": instance_id}).encode()
            with socket.create_connection(("127.0.0.1", int(self.api.url.rsplit(":", 1)[1])), timeout=10) as sock:
                sock.sendall(
                    b"POST /api/v1/agent_instance/register HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )  # fmt: skip
                return b"".join(iter(lambda: sock.recv(65536), b""))

        self.api.drop_next()  # before processing, once
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            self.assertEqual(answer_to_register("inst-before"), b"")
        self.assertEqual(stderr.getvalue(), "")  # quietly: no traceback in the user's test output
        self.assertEqual(set(self.api.instances), {inst.id})  # closed before processing
        self.assertEqual(fresh().agent_instances.get(inst.id).id, inst.id)  # times=1: the next one is answered
        self.api.drop_next(when="after", path="/api/v1/agent_instance/register")
        once.agent_instances.get(inst.id)  # another path: answered
        with contextlib.redirect_stderr(stderr):
            self.assertEqual(answer_to_register("inst-after"), b"")
        self.assertIn("inst-after", self.api.instances)  # processed, the answer lost
        self.assertEqual(stderr.getvalue(), "")
        self.api.drop_next(when="after")
        with self.assertRaises(ph.PrefactorConnectionError):  # a client on a new connection sees it fail
            fresh().agent_instances.register({"name": "v"}, agent_id="a", id="inst-after-2")
        self.assertIn("inst-after-2", self.api.instances)
        with self.assertRaisesRegex(ValueError, "when must be"):
            self.api.drop_next(when="later")

        conn = http.client.HTTPConnection("127.0.0.1", int(self.api.url.rsplit(":", 1)[1]), timeout=10)
        self.addCleanup(conn.close)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(2):  # kept alive
            conn.request("GET", "/api/v1/ping", headers=auth)
            self.assertEqual(conn.getresponse().read(), b'{"status": "success"}')
        self.api.drop_next(when="idle")
        conn.request("GET", "/api/v1/ping", headers=auth)
        self.assertEqual(conn.getresponse().read(), b'{"status": "success"}')  # answered, then closed
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/api/v1/ping", headers=auth)
            conn.getresponse()

    def test_a_repeated_key_replays_the_first_answer_even_nested_in_details(self):
        inst = self.register()
        first = self.client.agent_instances.start(inst.id, idempotency_key="start-key-1")
        again = self.client.agent_instances.start(inst.id, idempotency_key="start-key-1")  # not a 409
        self.assertEqual((again.status, again.started_at), ("active", first.started_at))
        details = {
            "agent_instance_id": inst.id,
            "schema_name": "s",
            "status": "active",
            "idempotency_key": "span-key-1",
        }
        answers = [call_raw(self.api, "POST", "/api/v1/agent_spans", {"details": details})[2] for _ in range(2)]
        self.assertEqual(answers[0], answers[1])
        self.assertEqual(list(self.api.spans), [answers[0]["details"]["id"]])

    def test_terminate_changes_the_instance_and_later_span_answers_carry_control(self):
        inst = self.active_instance()
        body = {"details": {"agent_instance_id": inst.id, "schema_name": "s", "status": "active"}}
        before = call_raw(self.api, "POST", "/api/v1/agent_spans", body)[2]
        self.assertEqual(set(before), {"status", "details"})
        self.api.terminate(inst.id, "operator stop")
        stored = self.api.instances[inst.id]
        self.assertEqual((stored["status"], stored["termination_reason"]), ("terminated", "operator stop"))
        self.assertGreater(stored["updated_at"], stored["inserted_at"])
        control = {"terminate": True, "reason": "operator stop"}
        span_id = before["details"]["id"]
        self.assertEqual(call_raw(self.api, "POST", f"/api/v1/agent_spans/{span_id}/finish", {})[2]["control"], control)
        self.assertEqual(call_raw(self.api, "POST", "/api/v1/agent_spans", body)[2]["control"], control)
        with self.assertRaisesRegex(ph.PrefactorConflictError, "agent instance is already terminated"):
            self.client.agent_instances.finish(inst.id)

    def test_lists_filter_and_page(self):
        for name, team, risk, owner in (
            ("a0", "t1", "r1", "o1"),
            ("a1", "t1", "r2", "o1"),
            ("a2", "t1", "r1", "o2"),
            ("a3", "t2", "r1", "o1"),
        ):
            self.client.agents.create(
                {"name": name, "team_id": team, "risk_profile_id": risk, "owner_person_id": owner}
            )
        path = "/api/v1/agent?team_id=t1&pagination[page_size]=2"
        first = call_raw(self.api, "GET", path)[2]
        self.assertEqual(
            (first["status"], [a["name"] for a in first["summaries"]], first["sorting"]),
            ("success", ["a0", "a1"], None),
        )
        self.assertEqual(
            first["pagination"], {"item_count": 3, "page_offset": 0, "page_size": 2, "next_page_offset": 2}
        )
        last = call_raw(self.api, "GET", path + "&pagination[offset]=2")[2]
        self.assertEqual(
            ([a["name"] for a in last["summaries"]], last["pagination"]["next_page_offset"]), (["a2"], None)
        )
        whole = call_raw(self.api, "GET", path.replace("=2", "=3"))[2]  # exactly one page: no next page
        self.assertEqual((len(whole["summaries"]), whole["pagination"]["next_page_offset"]), (3, None))
        default = call_raw(self.api, "GET", "/api/v1/agent")[2]
        self.assertEqual((len(default["summaries"]), default["pagination"]["page_offset"]), (4, 0))
        self.assertEqual(default["pagination"]["page_size"], 20)
        for query, names in (("risk_profile_id=r2", ["a1"]), ("owner_person_id=o2", ["a2"]), ("team_id=t2", ["a3"])):
            self.assertEqual([a.name for a in self.client.agents.list_agents(**dict([query.split("=")]))], names)

    def test_config_and_stop(self):
        config = self.api.config(max_retries=1)
        self.assertEqual(
            (config.api_url, config.api_token, config.trust_env, config.initial_retry_delay, config.max_retry_delay),
            (self.api.url, TOKEN, False, 0.01, 0.5),
        )
        self.assertEqual(config.max_retries, 1)
        os.environ.update(HTTP_PROXY=api_gone_url(), ALL_PROXY=api_gone_url())
        self.addCleanup(clean_env)
        with PrefactorHttpClient(self.api.config()) as client:  # a proxy in the environment is not used
            self.assertEqual(client.validate_token(), {"status": "success"})

        def serving():
            return {t for t in threading.enumerate() if t.name == "LocalApiServer"}

        before = serving()
        api = LocalApiServer(token=TOKEN).start()
        started = serving() - before
        port = int(api.url.rsplit(":", 1)[1])
        with self.assertRaises(OSError):  # it listens on 127.0.0.1 only, not on every address
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a kept-alive connection, left open
        self.addCleanup(held.close)
        held.request("GET", "/api/v1/ping", headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(held.getresponse().read(), b'{"status": "success"}')
        stopping = threading.Thread(target=api.stop, daemon=True)
        stopping.start()
        stopping.join(10)
        self.assertFalse(stopping.is_alive(), "stop() waits for a client's idle connection")
        api.stop()  # twice is fine
        self.assertEqual(len(started), 1)
        self.assertFalse(any(t.is_alive() for t in started))
        with self.assertRaisesRegex(ph.PrefactorClientError, "not started"):
            api.url  # noqa: B018
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


class ProxyVariableTests(ApiTestCase):
    def test_every_proxy_variable_is_honoured_and_cgi_http_proxy_is_not(self):
        proxy = FaultServer([("reply", http_response(200, {"status": "proxied"}))])
        self.addCleanup(proxy.close)
        self.addCleanup(os.environ.pop, "REQUEST_METHOD", None)
        self.addCleanup(clean_env)
        address = f"http://127.0.0.1:{proxy.port}"
        for variables, through in (
            ({"http_proxy": address}, True),
            ({"HTTP_PROXY": address}, True),
            ({"all_proxy": address}, True),
            ({"ALL_PROXY": address}, True),
            ({"HTTP_PROXY": address, "REQUEST_METHOD": "GET"}, False),  # a CGI request's Proxy: header
            ({"http_proxy": address, "REQUEST_METHOD": "GET"}, True),
        ):
            with self.subTest(variables):
                clean_env()
                os.environ.pop("REQUEST_METHOD", None)
                os.environ.update(variables)
                with PrefactorHttpClient(self.api.config(trust_env=True)) as client:
                    answer = client.validate_token()
                self.assertEqual(answer["status"], "proxied" if through else "success")
        os.environ.pop("REQUEST_METHOD")
        for scheme in ("https", "socks5"):  # only a plain http:// proxy is spoken to
            clean_env()
            os.environ["HTTP_PROXY"] = f"{scheme}://127.0.0.1:{proxy.port}"
            with self.subTest(scheme), self.assertRaisesRegex(ValueError, r"must be http://\[user:pass@\]host"):
                PrefactorHttpClient(self.api.config(trust_env=True))


def strings_in(value):
    """Every key and string value in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, str):
        yield value


class CliOutputTests(unittest.TestCase):
    def test_demo_against_a_configured_api_prints_what_it_stored(self):
        with LocalApiServer(token=TOKEN) as api:
            began = time.monotonic()
            out = run_cli_in(HERE, "demo", url=api.url)
            wall_ms = (time.monotonic() - began) * 1000
        self.assertEqual(out.returncode, 0, out.stderr)
        (inst,) = api.instances.values()
        spans = {s["schema_name"]: s for s in api.spans.values()}
        run, llm, tool = spans["agent:run"]["id"], spans["agent:llm"]["id"], spans["agent:tool"]["id"]
        lines = out.stdout.decode().splitlines()
        patterns = [
            rf"agent instance {inst['id']}  complete  (\d+\.\d) ms",
            rf"└─ agent:run  {run}  complete  (\d+\.\d) ms",
            rf"   ├─ agent:llm  {llm}  complete  (\d+\.\d) ms",
            rf"   └─ agent:tool {tool}  complete  (\d+\.\d) ms",
            "",
            "spans: 3 total, 3 complete",
        ]
        self.assertEqual(len(lines), len(patterns), lines)
        for pattern, line in zip(patterns, lines):
            self.assertRegex(line, f"^{pattern}$")
        times = [float(re.fullmatch(pattern, line)[1]) for pattern, line in zip(patterns[:4], lines)]
        self.assertEqual(lines[4:], patterns[4:])
        self.assertGreater(min(times), 0)
        self.assertLess(times[0], wall_ms)
        self.assertGreaterEqual(times[0], times[1])
        self.assertGreaterEqual(times[1], max(times[2:]))
        self.assertEqual((inst["status"], inst["purpose"]), ("complete", "smoke_test"))
        self.assertEqual({s["status"] for s in api.spans.values()}, {"complete"})
        self.assertEqual((spans["agent:llm"]["parent_span_id"], spans["agent:tool"]["parent_span_id"]), (run, run))
        register = api.requests[0]["body"]
        self.assertNotIn("agent_id", register)  # a configured API knows its agent from the token
        types = register["agent_schema_version"]["span_type_schemas"]
        self.assertEqual({t["name"] for t in types}, set(spans))  # it registers the span types it uses
        for span in api.spans.values():
            self.assertTrue(span["payload"] and span["result_payload"], span)
        answers = [spans["agent:tool"]["result_payload"]["output"], spans["agent:run"]["result_payload"]["answer"]]
        self.assertEqual(answers, [6 * 7] * 2)  # the tool answers the question the run was asked
        sent = [r["body"] for r in api.requests if r["body"]]
        self.assertNotIn("", list(strings_in(sent)))  # every key and text the demo sends says something

    def test_ping_makes_one_attempt_and_send_sends_chunks_of_100(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with LocalApiServer(token=TOKEN) as api:
            with PrefactorHttpClient(api.config()) as client:
                inst = client.agent_instances.register({"name": "v"}, agent_id="a")
                client.agent_instances.start(inst.id)
            item = {"_type": "agent_spans/create", "agent_instance_id": inst.id, "schema_name": "s", "status": "active"}
            lines = [json.dumps({**item, "idempotency_key": f"chunk-key-{n:03d}"}).encode() + b"\n" for n in range(200)]
            api.fail_next(503, path="/api/v1/ping")
            ping = start_cli_in(folder, "ping", url=api.url)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFACTOR_")}
            env.update(PYTHONPATH=HERE, PREFACTOR_API_URL=api.url, PREFACTOR_API_TOKEN=TOKEN)
            terminal, tty = os.openpty()  # stderr is a terminal: send shows a progress line there
            self.addCleanup(os.close, terminal)
            pipe = subprocess.PIPE
            command = [sys.executable, "-m", "prefactor_http", "send"]
            send = subprocess.Popen(command, cwd=folder, env=env, stdin=pipe, stdout=pipe, stderr=tty)
            os.close(tty)
            failed, sent = finish_cli(ping), finish_cli(send, b"".join(lines))
            progress = b""
            with contextlib.suppress(OSError):  # EIO once the child's end is closed and all is read
                while select.select([terminal], [], [], 10)[0] and (piece := os.read(terminal, 65536)):
                    progress += piece
            ok = run_cli_in(folder, "ping", url=api.url)
            url = api.url
        self.assertEqual((failed.returncode, failed.stdout), (1, b""))  # the API's error answer; not retried
        self.assertEqual(failed.stderr.decode().splitlines(), [
            "unexpected answer: injected fault: HTTP 503 (HTTP 503, code 'injected')"])  # fmt: skip
        self.assertEqual((ok.returncode, ok.stderr), (0, b""))
        self.assertRegex(ok.stdout.decode(), rf"^ok: {re.escape(url)} accepted the token in \d+\.\d ms\n$")
        pings = [r for r in api.requests if r["path"] == "/api/v1/ping"]
        self.assertEqual(len(pings), 2)
        self.assertEqual((sent.returncode, sent.stdout), (0, b"200 sent, 0 rejected\n"))
        self.assertIn(b"\r\x1b[K100 sent, 0 rejected\r\x1b[K200 sent, 0 rejected", progress)
        self.assertTrue(progress.endswith(b"\r\x1b[K"), progress)  # the progress line is cleared at the end
        bulks = [r["body"]["items"] for r in api.requests if r["path"] == "/api/v1/bulk"]
        self.assertEqual([len(items) for items in bulks], [100, 100])  # and no empty request after them
        self.assertEqual(len(api.spans), 200)
        self.assertEqual(os.listdir(folder), [])

    def test_usage_errors_and_help_say_what_is_documented(self):
        def main(*argv):
            out, err = io.StringIO(), io.StringIO()
            with (
                self.assertRaises(SystemExit) as caught,
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
            ):
                ph.main(list(argv))
            return caught.exception.code, out.getvalue(), " ".join(err.getvalue().split())

        code, _, err = main("send", "--chunk", "0")
        self.assertEqual(code, 2)
        self.assertIn("--chunk must be at least 1", err)
        code, top, _ = main("--help")
        self.assertEqual(code, 0)
        for text in (
            "usage: prefactor-http", "--api-url API_URL API base URL (default: $PREFACTOR_API_URL)",
            "--api-token API_TOKEN API token (default: $PREFACTOR_API_TOKEN", "--timeout TIMEOUT seconds",
            "--retries RETRIES retries", "-v, --verbose log every HTTP attempt", "demo run one agent lifecycle",
            "ping check the URL and token", "send send bulk items",
            "exit status: 0 ok, 1 items rejected by the API, 2 token refused or bad usage, 3 network failure",
        ):  # fmt: skip
            self.assertIn(text, " ".join(top.split()))
        code, send, _ = main("send", "--help")
        for text in ("file JSON-lines file, or - for stdin", "--chunk CHUNK items per bulk request (default 100)",
                     "--rejects REJECTS where failed lines go"):  # fmt: skip
            self.assertIn(text, " ".join(send.split()))


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
        self.assertEqual((self.last()["method"], self.last()["body"]["details"]), ("PUT", {"description": "d"}))
        self.assertRegex(self.last()["body"]["idempotency_key"], r"^[0-9a-f-]{36}$")
        self.assertEqual(updated.description, "d")
        shown = agents.show(external_identifier="ext-1", include_counts=True)
        self.assertEqual(self.last()["query"], {"external_identifier": "ext-1", "include_counts": "true"})
        self.assertEqual(shown.id, agent.id)
        self.assertEqual(agents.retire(agent.id).status, "retired")
        self.assertEqual(set(self.last()["body"]), {"idempotency_key"})
        self.assertEqual(agents.reinstate(agent.id, idempotency_key="reinstate-1").status, "active")
        agents.delete(agent.id, idempotency_key="delete-1")
        self.assertEqual((self.last()["method"], self.last()["body"]), ("DELETE", {"idempotency_key": "delete-1"}))
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

    def test_importing_loads_no_asyncio_concurrent_futures_or_http_server(self):
        code = "import sys, prefactor_http; print([m for m in ('asyncio', 'concurrent.futures', 'http.server') if m in sys.modules])"
        out = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=HERE, capture_output=True, text=True)
        self.assertEqual((out.stdout.strip(), out.stderr), ("[]", ""))


def wait_until(predicate, seconds=10.0) -> bool:
    """Poll ``predicate`` (bounded); True once it holds. Waits on effects, never asserts timing."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


ASYNC_METHODS = {
    "agent_instances": ("register", "start", "finish", "get", "record_quality"),
    "agent_spans": ("create", "finish"),
    "agents": ("create", "get", "update", "show", "retire", "reinstate", "delete", "list_agents", "iter_agents"),
    "bulk": ("execute",),
    "": ("validate_token", "request"),
}


def _raised(function):
    try:
        function()
    except Exception as exc:
        return exc
    return None


class HeldTlsServer(Listener):
    """Accepts, holds the TLS handshake until ``go`` is set, then records what comes."""

    def __init__(self, cert_file: str):
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file)
        self.go, self.done, self.requests = threading.Event(), threading.Event(), []
        super().__init__()

    def handle(self, conn, index):
        self.go.wait(30)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                request = read_request(tls)
                if request:
                    self.requests.append(request)
        except OSError:
            pass
        finally:
            self.done.set()


class AsyncFacadeTests(FaultTestCase):
    """The async client: its own worker pool, cancellation that stops, real signatures."""

    def async_client(self, url, **overrides):
        overrides.setdefault("trust_env", False)
        return ph.AsyncPrefactorHttpClient(HttpClientConfig(api_url=url, api_token=TOKEN, **overrides))

    def test_every_async_method_has_the_sync_signature_and_docstring(self):
        import inspect
        import pydoc

        sync = PrefactorHttpClient(HttpClientConfig(api_url="http://127.0.0.1:9", api_token=TOKEN))
        client = ph.AsyncPrefactorHttpClient(sync.config)
        for group, names in ASYNC_METHODS.items():
            for name in names:
                with self.subTest(f"{group}.{name}"):
                    method = getattr(getattr(client, group) if group else client, name)
                    original = getattr(getattr(sync, group) if group else sync, name)
                    self.assertIn(name, dir(getattr(client, group) if group else client))
                    self.assertEqual(inspect.signature(method), inspect.signature(original))
                    self.assertEqual(method.__doc__, original.__doc__)
                    self.assertTrue(method.__doc__)
                    kind = inspect.isasyncgenfunction if name == "iter_agents" else inspect.iscoroutinefunction
                    self.assertTrue(kind(method))
        doc = pydoc.render_doc(type(client.agent_spans), renderer=pydoc.plaintext)
        self.assertIn("agent_instance_id: 'str'", doc)
        self.assertIn("Record a span.", doc)

    def test_a_cancelled_call_stops_and_the_default_executor_stays_free(self):
        server = self.serve([("stall",)])  # every connection: read the request, never answer
        client = self.async_client(server.url, request_timeout=20, max_retries=3, initial_retry_delay=0.01)

        async def main():
            loop = asyncio.get_running_loop()
            calls = [asyncio.ensure_future(client.validate_token()) for _ in range(20)]
            reached = await loop.run_in_executor(None, wait_until, lambda: len(server.requests) == 20)
            for call in calls:
                call.cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.wait_for(loop.run_in_executor(None, int), 1)  # the loop's own executor is free
            transport = client._sync._transport  # each socket is shut down, so each worker lets go of it:
            released = await loop.run_in_executor(None, wait_until, lambda: not transport._open, 5)
            await client.close()  # waits for the workers: every cancelled call has ended
            return reached, results, released

        reached, results, released = asyncio.run(main())
        self.assertTrue(reached, "20 calls at once did not all reach the server")
        self.assertTrue(released, "cancelled calls still wait for their answers")
        self.assertTrue(all(isinstance(r, asyncio.CancelledError) for r in results))
        self.assertEqual(len(server.requests), 20)  # no call made a second attempt

    def test_a_call_cancelled_while_waiting_for_its_answer_frees_its_worker_at_once(self):
        ok = http_response(200, {"status": "success"})
        server = FaultServer([("stall",)], [("reply", ok)])  # the first connection never answers
        self.addCleanup(server.close)
        client = ph.AsyncPrefactorHttpClient(
            HttpClientConfig(api_url=server.url, api_token=TOKEN, trust_env=False, request_timeout=30),
            max_concurrency=1,
        )

        async def main():
            loop = asyncio.get_running_loop()
            stalled = asyncio.ensure_future(client.validate_token())
            await loop.run_in_executor(None, wait_until, lambda: len(server.requests) == 1)
            stalled.cancel()
            await asyncio.gather(stalled, return_exceptions=True)
            answer = await asyncio.wait_for(client.validate_token(), 10)  # not 30 s behind the stalled read
            await client.close()
            return answer

        self.assertEqual(asyncio.run(main()), {"status": "success"})
        self.assertEqual(len(server.requests), 2)

    def test_max_concurrency_repr_and_a_closed_client(self):
        config = HttpClientConfig(api_url="http://127.0.0.1:9", api_token=TOKEN)
        for bad in (0, -1, True, 1.5, "2"):
            with self.subTest(bad=bad), self.assertRaisesRegex(ValueError, "max_concurrency"):
                ph.AsyncPrefactorHttpClient(config, max_concurrency=bad)
        client = ph.AsyncPrefactorHttpClient(config, max_concurrency=1)
        self.assertEqual(repr(client), "AsyncPrefactorHttpClient(api_url='http://127.0.0.1:9')")

        async def main():
            await client.close()
            await client.validate_token()

        with self.assertRaisesRegex(ph.PrefactorClientError, "the client is closed"):
            asyncio.run(main())

    def test_a_queued_call_never_starts_and_a_backoff_wait_ends(self):
        with LocalApiServer(token=TOKEN) as api:
            config = api.config(initial_retry_delay=30, max_retry_delay=60)
            client = ph.AsyncPrefactorHttpClient(config, max_concurrency=1)

            async def main():
                loop = asyncio.get_running_loop()
                api.fail_next(503, times=1)
                waiting = asyncio.ensure_future(client.validate_token())  # 503, then a 30 s backoff
                queued = asyncio.ensure_future(client.agents.create({"name": "never"}))  # behind it: one worker
                await loop.run_in_executor(None, wait_until, lambda: len(api.requests) == 1)
                queued.cancel()
                waiting.cancel()
                await asyncio.gather(waiting, queued, return_exceptions=True)
                await asyncio.wait_for(client.validate_token(), 5)  # the only worker is free again
                await client.close()

            asyncio.run(main())
            self.assertEqual([r["path"] for r in api.requests], ["/api/v1/ping"] * 2)  # no retry, no create
            self.assertEqual(api.agents, {})

    def test_a_call_cancelled_while_connecting_sends_nothing(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        cert_file = os.path.join(folder, "cert.pem")
        with open(cert_file, "w") as f:
            f.write(CERT_PEM + KEY_PEM)
        server = HeldTlsServer(cert_file)
        self.addCleanup(server.close)
        client = self.async_client(f"https://127.0.0.1:{server.port}", ca_file=cert_file)

        async def main():
            loop = asyncio.get_running_loop()
            call = asyncio.ensure_future(client.validate_token())
            accepted = await loop.run_in_executor(None, wait_until, lambda: server.connections == 1)
            call.cancel()  # while the TLS handshake is held
            await asyncio.gather(call, return_exceptions=True)
            server.go.set()  # now the connection completes: the cancelled call must not use it
            ended = await loop.run_in_executor(None, server.done.wait, 10)
            await client.close()
            return accepted, ended

        self.assertEqual(asyncio.run(main()), (True, True))
        self.assertEqual((server.connections, server.requests), (1, []))

    def test_close_wakes_a_thread_waiting_for_its_answer(self):
        server = self.serve([("stall",)])
        client, _ = self.client(server.url, request_timeout=20, max_retries=0)
        outcome = []
        caller = threading.Thread(target=lambda: outcome.append(_raised(client.validate_token)))
        caller.start()
        self.assertTrue(wait_until(lambda: len(server.requests) == 1))
        closer = threading.Thread(target=client.close)
        closer.start()
        closer.join(5)  # reading the answer holds the connection's reader: close() must not wait for it
        caller.join(5)
        self.assertFalse(closer.is_alive() or caller.is_alive(), "close() waited for the read to time out")
        self.assertIsInstance(outcome[0], ph.PrefactorHttpError)
        self.assertNotIsInstance(outcome[0], ph.PrefactorTimeoutError)

    def test_asyncio_run_per_invocation_leaves_threads_and_descriptors_flat(self):
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("needs /proc/self/fd")
        with LocalApiServer(token=TOKEN) as api:
            shared = ph.AsyncPrefactorHttpClient(api.config())  # once per container, as a Lambda does

            async def invocation():
                await shared.validate_token()
                async with ph.AsyncPrefactorHttpClient(api.config()) as client:  # once per invocation
                    await client.agent_instances.register({"name": "v"}, agent_id="a")

            def counts():
                return len(os.listdir("/proc/self/fd")), threading.active_count()

            for _ in range(5):
                asyncio.run(invocation())
            before = counts()
            for _ in range(200):
                asyncio.run(invocation())
            # the server's side of a closed connection ends a moment later: wait for it (bounded)
            wait_until(lambda: counts()[0] <= before[0] + 4 and counts()[1] <= before[1] + 2, 5)
            after = counts()
            asyncio.run(shared.close())
        self.assertLessEqual(after[0], before[0] + 4, f"descriptors {before[0]} -> {after[0]}")
        self.assertLessEqual(after[1], before[1] + 2, f"threads {before[1]} -> {after[1]}")

    def test_closing_ends_the_worker_threads_and_their_connections(self):
        with LocalApiServer(token=TOKEN) as api:

            async def main():
                async with ph.AsyncPrefactorHttpClient(api.config()) as client:
                    await asyncio.gather(*(client.validate_token() for _ in range(10)))
                    opened = len(client._sync._transport._open)
                return client, opened

            client, opened = asyncio.run(main())
            self.assertGreater(opened, 1)  # several worker threads, each with its connection
            self.assertFalse(client._sync._transport._open)
            self.assertEqual([t for t in threading.enumerate() if t.name.startswith("prefactor-http")], [])
            with self.assertRaises(ph.PrefactorClientError):
                asyncio.run(client.validate_token())

    def test_a_dropped_unclosed_client_lets_go_without_the_cycle_collector(self):
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("needs /proc/self/fd")
        gc_was_enabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if gc_was_enabled else None)
        with LocalApiServer(token=TOKEN) as api:
            descriptors = len(os.listdir("/proc/self/fd"))
            client = ph.AsyncPrefactorHttpClient(api.config())
            asyncio.run(client.validate_token())
            del client
            workers = lambda: [t for t in threading.enumerate() if t.name.startswith("prefactor-http")]  # noqa: E731
            self.assertTrue(wait_until(lambda: not workers(), 5), "worker threads outlived their client")
            self.assertTrue(wait_until(lambda: len(os.listdir("/proc/self/fd")) <= descriptors, 5))


class UpstreamCompatibilityTests(ApiTestCase):
    """What code written for upstream 0.4.3 and the official SDK relies on."""

    def sent_sdk_header(self) -> str:
        return {k.lower(): v for k, v in self.last()["headers"].items()}["x-prefactor-sdk"]

    def test_sdk_header_changed_after_construction_reaches_the_wire(self):
        own = "prefactor-http-stdlib@0.2.0"
        sync = PrefactorHttpClient(self.api.config(), sdk_header="prefactor-core@0.5.3")
        self.addCleanup(sync.close)
        sync.validate_token()
        self.assertEqual(self.sent_sdk_header(), f"prefactor-core@0.5.3 {own}")
        sync._sdk_header = "prefactor-langchain@0.2.7 prefactor-core@0.5.3"  # what prefactor-core does
        sync.validate_token()
        self.assertEqual(self.sent_sdk_header(), f"prefactor-langchain@0.2.7 prefactor-core@0.5.3 {own}")
        sync.sdk_header = None
        sync.validate_token()
        self.assertEqual(self.sent_sdk_header(), own)
        with self.assertRaises(ValueError):
            sync.sdk_header = "bad\r\nX-Evil: 1"

        async def main():
            async with ph.AsyncPrefactorHttpClient(self.api.config(), sdk_header="prefactor-core@0.5.3") as client:
                client._sdk_header = "prefactor-langchain@0.2.7 prefactor-core@0.5.3"
                await client.validate_token()
                first = self.sent_sdk_header()
                client.sdk_header = "a@1"
                await client.validate_token()
                return first, self.sent_sdk_header(), client.sdk_header

        self.assertEqual(
            asyncio.run(main()), (f"prefactor-langchain@0.2.7 prefactor-core@0.5.3 {own}", f"a@1 {own}", "a@1")
        )

    def test_the_six_other_names_of_upstream_import_and_serialise(self):
        from prefactor_http import (  # noqa: F401
            AgentInstanceRecordQuality,
            ApiResponse,
            FinishInstanceRequest,
            QualitySchemaDetails,
            QualitySchemaForCreate,
            RuntimeEnvironment,
        )

        names = ("RuntimeEnvironment", "QualitySchemaForCreate", "QualitySchemaDetails", "FinishInstanceRequest")
        self.assertTrue(set(names) | {"AgentInstanceRecordQuality", "ApiResponse"} <= set(ph.__all__))
        version = ph.AgentVersionForRegister(name="v", runtime_environment=RuntimeEnvironment(os="linux", runtime=None))
        schema = ph.AgentSchemaVersionForRegister(
            external_identifier="s1", quality_schemas=[QualitySchemaForCreate(name="q", schema_={"type": "object"})]
        )
        self.client.agent_instances.register(version, schema, agent_id="a")
        body = self.last()["body"]
        self.assertEqual(body["agent_version"]["runtime_environment"], {"os": "linux"})
        self.assertEqual(body["agent_schema_version"]["quality_schemas"], [{"name": "q", "schema": {"type": "object"}}])
        self.assertEqual(FinishInstanceRequest(status="complete").to_dict(), {"status": "complete"})

    def test_config_messages_begin_with_upstreams_words(self):
        cases = {
            "api_url is required": {"api_url": ""},
            "api_token is required": {"api_token": ""},
            "request_timeout must be positive": {"request_timeout": 0},
            "connect_timeout must be positive": {"connect_timeout": -1},
            "max_retries must be non-negative": {"max_retries": -1},
            "initial_retry_delay must be positive": {"initial_retry_delay": 0},
            "max_retry_delay must be positive": {"max_retry_delay": 0},
            "initial_retry_delay must be <= max_retry_delay": {"initial_retry_delay": 5, "max_retry_delay": 1},
            "retry_multiplier must be >= 1": {"retry_multiplier": 0.5},
        }
        for words, override in cases.items():
            with self.subTest(words), self.assertRaises(ValueError) as caught:
                HttpClientConfig(**{"api_url": "https://h", "api_token": "t", **override})
            self.assertTrue(str(caught.exception).startswith(words), str(caught.exception))

    def test_the_readme_async_snippet_runs_as_written(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            blocks = f.read().split("```python\n")[1:]
        snippet = next(block.split("```")[0] for block in blocks if "AsyncPrefactorHttpClient(" in block)
        env = {**os.environ, "PREFACTOR_API_URL": self.api.url, "PREFACTOR_API_TOKEN": TOKEN}
        out = subprocess.run(
            [sys.executable, "-c", snippet], cwd=HERE, env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual((out.returncode, out.stderr), (0, ""))
        self.assertEqual(len(self.api.instances), 1)
        self.assertTrue(self.api.spans)
        self.assertEqual({s["status"] for s in self.api.spans.values()}, {"complete"})


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
                self.assertEqual(ph._proxy_for("https", host, 443) is not None, proxied)


# ---------------------------------------------------------------------------- #
# Transport: lifecycle, deadlines, proxies and secrecy
# ---------------------------------------------------------------------------- #


def everything_shown(exc: BaseException, seen: set | None = None) -> str:
    """All an exception can show: str, repr, args, every attribute (exceptions
    among them recursively), the cause/context chain and the formatted traceback."""
    import traceback

    seen = set() if seen is None else seen
    if id(exc) in seen:
        return ""
    seen.add(id(exc))
    parts = [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(type(exc), exc, None))]
    for name in dir(exc):
        value = getattr(exc, name, None)
        if name.startswith("__") or callable(value):
            continue
        parts.append(f"{name}={value!r}")
        if isinstance(value, BaseException):
            parts.append(everything_shown(value, seen))
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            parts.append(everything_shown(linked, seen))
    return "\n".join(parts)


def module_frame_locals(call) -> str:
    """The locals of the module's frames in the traceback of ``call()``'s error recorded with
    them (as Sentry does: TracebackException(capture_locals=True)), causes and contexts too.
    Not through assertRaises: it clears the frames."""
    import traceback

    try:
        call()
    except ph.PrefactorHttpError as exc:
        shown, seen = [str(exc)], traceback.TracebackException.from_exception(exc, capture_locals=True)
    while seen is not None:
        shown += [repr(frame.locals) for frame in seen.stack if os.path.basename(frame.filename) == "prefactor_http.py"]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(shown)  # (unbound if nothing was raised: the test fails)


class SecretWalkTests(FaultTestCase):
    SECRET = "sk/live+0123456789abcdef"  # a '/' and a '+', as base64 tokens have

    def shown(self, url, secret=SECRET, call=PrefactorHttpClient.validate_token, **overrides):
        """Make a call against ``url``; everything the error and the log show."""
        overrides.setdefault("trust_env", False)
        client = PrefactorHttpClient(HttpClientConfig(api_url=url, api_token=secret, max_retries=0, **overrides))
        self.addCleanup(client.close)
        with self.assertLogs("prefactor_http", "DEBUG") as logs, self.assertRaises(ph.PrefactorHttpError) as caught:
            call(client)
        return everything_shown(caught.exception) + "\n".join(logs.output)

    def assert_hidden(self, seen, secret=SECRET):
        for form in (secret, secret[:8], json.dumps(secret)[1:-1], secret.replace("/", "\\/")):
            self.assertNotIn(form, seen)

    def test_an_escaped_echo_is_redacted_in_the_decoded_text(self):
        escaped = "".join(f"\\u{ord(c):04X}" for c in self.SECRET)
        for body in (
            b'{"code": "bad", "message": "token %s is expired", "errors": {"t": ["%s"]}}'
            % (self.SECRET.replace("/", "\\/").encode(), escaped.encode()),
            b'{"message": "token %s"}' % escaped.encode(),
            b"not json: %s" % escaped.encode(),
        ):
            with self.subTest(body=body):
                server = self.serve([("reply", http_response(401, body))])
                seen = self.shown(server.url)
                self.assert_hidden(seen)
                self.assertNotIn(escaped, seen)
                self.assertNotIn(escaped.lower(), seen)
                self.assertIn("[REDACTED]", seen)

    def test_a_location_header_is_redacted(self):
        headers = {"Location": f"https://elsewhere.example/?token={self.SECRET}"}
        server = self.serve([("reply", http_response(302, b"", headers))])
        seen = self.shown(server.url)
        self.assert_hidden(seen)
        self.assertIn("elsewhere.example", seen)

    def test_a_non_json_success_keeps_no_raw_body_in_its_chain(self):
        for body in (f"<p>{self.SECRET}</p>".encode(), b"\xff" + self.SECRET.encode()):
            with self.subTest(body=body):
                server = self.serve([("reply", http_response(200, body, {"Content-Type": "text/html"}))])
                seen = self.shown(server.url)
                self.assert_hidden(seen)
                self.assertIn("[REDACTED]", seen)

    def test_a_cut_does_not_leave_half_a_secret(self):
        for answer in (  # the reader quotes 80 bytes of a bad line: the secret's first 12 among them
            b"HTTP/1.1 abc " + b"x" * 55 + self.SECRET.encode() + b"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"x" * 68 + self.SECRET.encode() + b"\r\n\r\n",
            b"HTTP/1.1 " + self.SECRET.encode() + b"\r\n\r\n",
        ):
            with self.subTest(answer=answer):
                server = self.serve([("truncate", answer)])
                self.assert_hidden(self.shown(server.url))

    def test_a_huge_error_body_is_searched_in_its_first_mib_and_its_cut_shows_nothing(self):
        body = b" " * (ph._MAX_QUOTED - 4) + self.SECRET.encode()  # the first MiB ends 4 characters into it
        server = self.serve([("reply", http_response(502, body, {"Content-Type": "text/plain"}))])
        seen = self.shown(server.url)
        self.assertNotIn(self.SECRET[:4], seen)
        self.assertIn("HTTP 502", seen)

    def test_a_secret_in_a_field_of_a_success_is_not_quoted(self):
        body = {"status": "success", "details": {"id": "inst-1", "inserted_at": self.SECRET}}
        server = self.serve([("reply", http_response(200, body))])
        seen = self.shown(server.url, call=lambda client: client.agent_instances.get("inst-1"))
        self.assert_hidden(seen)
        self.assertIn("inserted_at is not an ISO-8601 timestamp", seen)

    def test_server_values_in_a_success_are_not_quoted(self):
        bulk = {"status": "success", "outputs": {self.SECRET: 1}}
        page = {"summaries": [{"id": "a"}], "pagination": {"next_page_offset": self.SECRET}}
        item = {"_type": "agents/create", "idempotency_key": "key-00000001", "details": {"name": "n"}}
        for body, call in ((bulk, lambda client: client.bulk.execute([item])),
                           (page, lambda client: list(client.agents.iter_agents()))):  # fmt: skip
            with self.subTest(body=body):
                server = self.serve([("reply", http_response(200, body))])
                self.assert_hidden(self.shown(server.url, call=call))

    def test_a_traceback_with_locals_shows_no_secret(self):
        echo = self.SECRET.encode()
        for answer in (http_response(401, b'{"message": "token %s"}' % echo),
                       http_response(200, b"<p>%s</p>" % echo, {"Content-Type": "text/html"}),
                       b"HTTP/1.1 abc " + echo + b"\r\n\r\n"):  # fmt: skip
            with self.subTest(answer=answer):
                server = self.serve([("reply", answer)])
                client = PrefactorHttpClient(HttpClientConfig(server.url, self.SECRET, max_retries=0, trust_env=False))
                self.addCleanup(client.close)
                shown = module_frame_locals(client.validate_token)
                self.assertIn("'path': \"'/api/v1/ping'\"", shown)  # the frames' locals are there
                self.assertNotIn(self.SECRET, shown)
        proxy = self.serve([("reply", b"HTTP/1.1 407 Who are you\r\nContent-Length: 0\r\n\r\n")])
        os.environ["HTTPS_PROXY"] = f"http://user:{self.SECRET.replace('/', '%2F')}@127.0.0.1:{proxy.port}"
        self.addCleanup(clean_env)
        client, _ = self.client("https://api.example.com", trust_env=True, max_retries=0)
        shown = module_frame_locals(client.validate_token)
        self.assertIn("refused the tunnel", shown)
        self.assertNotIn(base64.b64encode(f"user:{self.SECRET}".encode()).decode(), shown)

    def test_a_non_ascii_proxy_password_is_redacted_in_every_escape(self):
        from urllib.parse import quote

        password = "\U0001f600\u00e4\u00f6\u00fc-geheim"  # an emoji (two UTF-16 units), umlauts (two UTF-8 bytes)
        forms = [password, json.dumps(password)[1:-1], quote(password, safe=""), quote(password, safe="").lower()]
        body = json.dumps({"message": " | ".join(forms)}).encode()
        proxy = self.serve([("reply", http_response(403, body))])
        os.environ["HTTP_PROXY"] = f"http://user:{quote(password, safe='')}@127.0.0.1:{proxy.port}"
        self.addCleanup(clean_env)
        seen = self.shown("http://api.example.com", trust_env=True)
        self.assertEqual([form for form in forms if form[:6] in seen], [])
        self.assertIn("[REDACTED] | [REDACTED]", seen)

    def test_half_of_a_short_token_is_redacted(self):
        for token in ("abcdef123456", "abcd1234"):
            with self.subTest(token=token):
                half = token[: len(token) // 2]
                server = self.serve([("reply", http_response(401, b'{"message": "token %s..."}' % half.encode()))])
                seen = self.shown(server.url, secret=token)
                self.assertNotIn(half, seen)
                self.assertIn("[REDACTED]...", seen)

    def test_short_proxy_passwords_are_redacted_and_a_407_names_the_proxy_once(self):
        for password in ("p", "pw", "pwd"):
            with self.subTest(password=password):
                reply = f"HTTP/1.1 407 wrong password {password}\r\nContent-Length: 0\r\n\r\n".encode()
                proxy = self.serve([("reply", reply)])
                os.environ["HTTPS_PROXY"] = f"http://user:{password}@127.0.0.1:{proxy.port}"
                self.addCleanup(clean_env)
                seen = self.shown("https://api.example.com", trust_env=True)
                self.assertNotRegex(seen, rf"\b{password}\b")
                self.assertIn(f"proxy 127.0.0.1:{proxy.port}", seen)
                self.assertIn("407", seen)
                self.assertEqual(proxy.connections, 1)


class BlockingResolver:
    """Stands in for ``prefactor_http._getaddrinfo``: names in ``hang`` never
    answer (until the test ends), names in ``missing`` do not exist, others resolve."""

    def __init__(self, test, hang=(), missing=()):
        self.hang, self.missing, self.calls = hang, missing, []
        self.release = threading.Event()
        test.addCleanup(self.release.set)
        test.addCleanup(setattr, ph, "_getaddrinfo", getattr(ph, "_getaddrinfo", socket.getaddrinfo))
        test.addCleanup(ph._lookups.clear)  # a lookup left pending is not waited for by the next test
        ph._getaddrinfo = self

    def __call__(self, host, *args):
        self.calls.append(host)
        if host in self.hang:
            self.release.wait(30)
        if host in self.missing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return socket.getaddrinfo("127.0.0.1" if host == "localhost" else host, *args)


class ResolverTests(FaultTestCase):
    def test_a_resolver_that_never_answers_ends_the_attempt_as_a_timeout(self):
        BlockingResolver(self, hang=("hang.test",))
        for limits in ({"request_timeout": 0.2}, {"connect_timeout": 0.2}, {"total_timeout": 0.2}):
            with self.subTest(**limits):
                client, _ = self.client("http://hang.test:9", max_retries=0, **limits)
                with self.assertRaises(ph.PrefactorTimeoutError):
                    client.validate_token()

    def test_names_are_resolved_only_for_a_new_connection_and_never_for_an_ip(self):
        resolver = BlockingResolver(self)
        server = self.serve([("reply", http_response(200, ok_body()))] * 3)
        for host in ("127.0.0.1", "localhost"):
            client, _ = self.client(f"http://{host}:{server.port}")
            client.agent_instances.get("inst-1")
            client.agent_instances.get("inst-1")
        self.assertEqual(resolver.calls, ["localhost"])

    def test_a_lookup_that_never_ends_is_waited_for_again_not_repeated(self):
        resolver = BlockingResolver(self, hang=("hang.test",))
        client, _ = self.client("http://hang.test:9", max_retries=0, request_timeout=0.05)
        for _ in range(4):
            with self.assertRaises(ph.PrefactorTimeoutError):
                client.validate_token()
        self.assertEqual(resolver.calls, ["hang.test"])  # one thread, not one per attempt

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs RLIMIT_AS and /proc")
    def test_no_thread_for_a_lookup_is_our_error(self):
        script = """if True:
            import resource, prefactor_http as ph
            config = ph.HttpClientConfig("http://unresolved.test", "t", trust_env=False, max_retries=0)
            client = ph.PrefactorHttpClient(config)
            size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
            resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (4 << 20), resource.RLIM_INFINITY))  # no stack
            try:
                client.validate_token()
            except BaseException as error:
                print(type(error).__name__, error)
        """
        result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True)
        self.assertIn("PrefactorConnectionError GET /api/v1/ping: OSError: cannot start a thread", result.stdout)

    def test_a_proxy_that_does_not_resolve_is_named(self):
        BlockingResolver(self, missing=("proxy.invalid",))
        self.addCleanup(clean_env)
        os.environ["HTTPS_PROXY"] = "http://proxy.invalid:3128"
        client, _ = self.client("https://api.example.com", trust_env=True, max_retries=0)
        with self.assertRaisesRegex(ph.PrefactorConnectionError, "proxy.invalid:3128: cannot resolve proxy.invalid"):
            client.validate_token()


class ProxyTests(FaultTestCase):
    def setUp(self):
        self.addCleanup(clean_env)

    def test_connect_always_carries_the_port_and_a_refusal_is_not_retried(self):
        proxy = self.serve([("reply", b"HTTP/1.1 407 Who are you\r\nContent-Length: 0\r\n\r\n")])
        os.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{proxy.port}"
        for url, target in (("https://api.example.com", "api.example.com:443"), ("https://[::1]", "[::1]:443")):
            client, sleeps = self.client(url, trust_env=True)
            with self.assertRaises(ph.PrefactorHttpError) as caught:
                client.validate_token()
            connect = [f"CONNECT {target} HTTP/1.1".encode(), f"Host: {target}".encode()]
            self.assertEqual(proxy.requests[-1].split(b"\r\n")[:2], connect)
            self.assertIsInstance(caught.exception, ph.PrefactorConnectionError)
            self.assertIn(f"proxy 127.0.0.1:{proxy.port} refused the tunnel", str(caught.exception))
            self.assertTrue(ph.is_permanent_http_error(caught.exception))
            self.assertEqual(sleeps, [])

    def test_a_407_to_plain_http_through_a_proxy_names_it_and_is_not_retried(self):
        proxy = self.serve([("reply", b"HTTP/1.1 407 Who are you\r\nContent-Length: 0\r\n\r\n")])
        os.environ["HTTP_PROXY"] = f"http://127.0.0.1:{proxy.port}"
        client, sleeps = self.client("http://api.example.com", trust_env=True)
        with self.assertRaisesRegex(ph.PrefactorApiError, f"proxy 127.0.0.1:{proxy.port} asks for credentials"):
            client.validate_token()
        self.assertEqual((len(proxy.requests), sleeps), (1, []))

    def test_no_proxy_matches_ip_literals_and_ports(self):
        os.environ["HTTPS_PROXY"] = "http://proxy:3128"
        cases = [
            ("::1", "::1", 443, False),
            ("[::1]", "::1", 443, False),
            ("[::1]:443", "::1", 443, False),
            ("[::1]:8443", "::1", 443, True),
            ("10.0.0.1", "10.0.0.1", 443, False),
            ("10.0.0.1:8080", "10.0.0.1", 443, True),
            ("api.example.com:443", "api.example.com", 443, False),
            ("api.example.com:8443", "api.example.com", 443, True),
            ("example.com:8443", "api.example.com", 8443, False),
            ("::2", "::1", 443, True),
        ]
        for no_proxy, host, port, proxied in cases:
            with self.subTest(no_proxy=no_proxy, host=host, port=port):
                os.environ["NO_PROXY"] = no_proxy
                self.assertEqual(ph._proxy_for("https", host, port) is not None, proxied)

    def test_a_refused_connect_is_never_read_for_a_body(self):
        refusal = b"HTTP/1.1 407 Who are you\r\nProxy-Authenticate: Basic realm=x\r\n\r\nauth needed"  # to the close
        proxy = self.serve([("reply", refusal)])  # the connection stays open
        os.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{proxy.port}"
        client, sleeps = self.client("https://api.example.com", trust_env=True, request_timeout=1)
        with self.assertRaisesRegex(ph.PrefactorConnectionError, "refused the tunnel .*: 407 Who are you"):
            client.validate_token()
        self.assertEqual((proxy.connections, sleeps), (1, []))

    def test_a_proxy_failing_the_connect_is_named(self):
        for script in ([("drop_after",)], [("reset",)], [("truncate", b"SSH-2.0-OpenSSH\r\n")], [("stall",)]):
            with self.subTest(script[0][0]):
                proxy = self.serve(script)
                os.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{proxy.port}"
                client, _ = self.client("https://api.example.com", trust_env=True, max_retries=0, request_timeout=0.3)
                with self.assertRaisesRegex(ph.PrefactorConnectionError, f"proxy 127.0.0.1:{proxy.port}: "):
                    client.validate_token()

    def test_no_proxy_takes_ip_ranges_and_an_empty_lowercase_variable_hides_nothing(self):
        os.environ["HTTPS_PROXY"] = "http://proxy:3128"
        cases = [
            ({"NO_PROXY": "127.0.0.0/8"}, "127.0.0.1", False),
            ({"NO_PROXY": "10.0.0.0/8, ::1/128"}, "::1", False),
            ({"NO_PROXY": "127.0.0.0/8"}, "128.0.0.1", True),
            ({"NO_PROXY": "127.0.0.0/8"}, "localhost", True),
            ({"NO_PROXY": "127.0.0.0/33"}, "127.0.0.1", True),
            ({"no_proxy": "", "NO_PROXY": "127.0.0.1"}, "127.0.0.1", False),
        ]
        for env, host, proxied in cases:
            with self.subTest(env=env, host=host):
                os.environ.pop("no_proxy", None)
                os.environ.update(env)
                self.assertEqual(ph._proxy_for("https", host, 443) is not None, proxied)

    def test_a_proxy_port_of_0_is_refused_unshown(self):
        os.environ["HTTPS_PROXY"] = "http://user:hunter2secret@127.0.0.1:0"
        with self.assertRaisesRegex(ValueError, "proxy URL") as caught:
            make_client("https://api.example.com", trust_env=True)
        self.assertNotIn("hunter2secret", everything_shown(caught.exception))

    def test_a_password_with_an_unencoded_character_is_refused_unshown(self):
        for password in ("Qz7/Kx9w", "46/83", "Qz7#Kx9w", "Qz7?Kx9w", "Qz7/Kx9w:Vb2", "[Qz7:Kx9w]"):
            with self.subTest(password=password):
                os.environ["HTTPS_PROXY"] = f"http://user:{password}@proxy.example:3128"
                try:
                    client, _ = make_client("https://api.example.com", trust_env=True)
                except ValueError as error:
                    seen = everything_shown(error)
                    self.assertIn("percent-encoded", seen)
                    for piece in filter(None, re.split(r"[/#?:\[\]]", password)):
                        self.assertNotIn(piece, seen)
                else:  # 3.9/3.10 read "[...]" as a password; never a wrong proxy host
                    self.assertEqual((client._transport.proxy, password[0]), (("proxy.example", 3128), "["))


class Forwarder(Listener):
    """A middlebox between client and server, like a NAT gateway: ``forget()``
    makes it forget the flows it carries; bytes arriving later on one are then
    answered with a reset or swallowed without a word."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.forgotten: dict = {}  # connection index -> "reset" or "swallow"
        self.swallowed = 0
        self.carried: list = []
        super().__init__()

    def close(self):
        super().close()
        for sock in self.carried:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def forget(self, how: str) -> None:
        self.forgotten.update(dict.fromkeys(range(self.connections), how))

    def handle(self, conn, index):
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.carried += [conn, upstream]
        with conn, upstream:
            while True:
                readable, _, _ = select.select([conn, upstream], [], [], 30)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    how = self.forgotten.get(index)
                    if not data:
                        return
                    if sock is upstream:
                        conn.sendall(data)
                    elif how == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    elif how == "swallow":
                        self.swallowed += len(data)
                    else:
                        upstream.sendall(data)


class KeepAliveTests(FaultTestCase):
    def through_forwarder(self, calls, **overrides):
        server = self.serve([("reply", http_response(200, ok_body()))] * calls)
        forwarder = Forwarder(server.port)
        self.addCleanup(forwarder.close)
        client, sleeps = self.client(f"http://127.0.0.1:{forwarder.port}", **overrides)
        client.agent_instances.get("inst-1")
        return server, forwarder, client, sleeps

    def test_a_reset_on_a_kept_alive_connection_costs_no_retry(self):
        server, forwarder, client, sleeps = self.through_forwarder(3, max_retries=0)
        forwarder.forget("reset")
        self.assertEqual(client.agent_instances.get("inst-1").id, "inst-1")
        forwarder.forget("reset")
        inst = client.agent_instances.start("inst-1")  # a POST with its key: resent too
        self.assertEqual(inst.id, "inst-1")
        self.assertEqual((server.connections, len(server.requests), sleeps), (3, 3, []))
        self.assertIn(b'"idempotency_key"', server.requests[2])

    def test_a_request_without_its_key_is_not_resent(self):
        server, forwarder, client, _ = self.through_forwarder(2, max_retries=0)
        forwarder.forget("reset")
        with self.assertRaises(ph.PrefactorConnectionError):
            client.request("POST", "/api/v1/anything", json_data=[1, 2])
        self.assertEqual((server.connections, len(server.requests)), (1, 1))

    def test_a_connection_idle_past_keepalive_timeout_is_not_reused(self):
        shift = [0.0]
        self.addCleanup(setattr, ph, "_monotonic", ph._monotonic)
        ph._monotonic = lambda: time.monotonic() + shift[0]
        server, forwarder, client, sleeps = self.through_forwarder(
            3, keepalive_timeout=5, request_timeout=1, max_retries=0
        )
        shift[0] = 4.0  # idle for 4 s: reused
        client.agent_instances.get("inst-1")
        forwarder.forget("swallow")
        shift[0] = 10.0  # idle for 6 s: a new connection, the forgotten one is never written to
        self.assertEqual(client.agent_instances.get("inst-1").id, "inst-1")
        self.assertEqual((server.connections, len(server.requests), forwarder.swallowed, sleeps), (2, 3, 0, []))

    def test_keepalive_timeout_is_a_positive_config_field(self):
        self.assertEqual(HttpClientConfig(api_url="http://x", api_token=TOKEN).keepalive_timeout, 15.0)
        for bad in (0, -1, "5", True):
            with self.assertRaisesRegex(ValueError, "keepalive_timeout"):
                HttpClientConfig(api_url="http://x", api_token=TOKEN, keepalive_timeout=bad)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@unittest.skipUnless(os.path.isdir("/proc/self/fd"), "counts /proc/self/fd")
class ConnectionOwnershipTests(ApiTestCase):
    def test_threads_that_end_release_their_connections(self):
        self.client.validate_token()
        before = open_descriptors()
        for _ in range(75):  # 300 threads, 4 at a time (the server's backlog is 5), one call each
            threads = [threading.Thread(target=self.client.validate_token) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual(len(self.api.requests), 301)
        self.assertEqual(len(self.client._transport._open), 1)  # the main thread's
        for _ in range(500):  # the server's side closes once it reads the client's close
            if open_descriptors() <= before + 2:
                break
            time.sleep(0.01)
        self.assertLessEqual(open_descriptors(), before + 2)

    def test_an_unclosed_client_dropped_releases_its_socket_without_the_collector(self):
        closed = threading.Event()

        class OneAnswer(Listener):
            def handle(self, conn, index):
                read_request(conn)
                conn.sendall(http_response(200, {"status": "success"}))
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    if conn.recv(1) == b"":
                        closed.set()
                conn.close()

        server = OneAnswer()
        self.addCleanup(server.close)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        self.addCleanup(lambda: gc.enable() if gc_was_enabled else None)
        client, _ = make_client(server.url)
        client.validate_token()
        del client
        self.assertTrue(closed.wait(5))

    def test_a_group_outlives_the_expression_that_made_its_client(self):
        agents = PrefactorHttpClient(self.api.config()).agents  # the client itself is not kept
        self.assertEqual(agents.create({"name": "kept"}).name, "kept")
        self.assertEqual([a["name"] for a in self.api.agents.values()], ["kept"])


class RequestLineTests(FaultTestCase):
    def test_params_join_a_query_in_the_path_and_bodyless_writes_send_a_zero_length(self):
        server = self.serve([("reply", http_response(200, {"status": "success"}))] * 5)
        client, _ = self.client(server.url)
        client.request("GET", "/x?a=1", params={"b": 2})
        for method in ("POST", "PUT", "DELETE"):
            client.request(method, "/y")
        client.request("GET", "/z")
        heads = [r.partition(b"\r\n\r\n")[0].split(b"\r\n") for r in server.requests]
        self.assertEqual(heads[0][0], b"GET /x?a=1&b=2 HTTP/1.1")
        for head in heads[1:4]:
            self.assertIn(b"Content-Length: 0", head)
        self.assertFalse([line for line in heads[4] if line.lower().startswith(b"content-length")])


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
            self.assertIn("auth failed", bad.stderr)
        gone = self.run_cli("ping", url=api_gone_url())
        self.assertEqual(gone.returncode, 3)
        self.assertIn("network failure", gone.stderr)
        self.assertNotIn(TOKEN, ok.stdout + bad.stdout + gone.stdout + bad.stderr + gone.stderr)

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


class EveryDoorIsIdempotentTests(ApiTestCase):
    """Promise 2 at the doors besides the typed POSTs: request(), PUT, DELETE."""

    def span_body(self, inst_id):
        return {"details": {"agent_instance_id": inst_id, "schema_name": "agent:llm", "status": "active"}}

    def test_request_with_a_lost_answer_stores_one_record_with_or_without_a_key(self):
        inst = self.active_instance()
        for key in (None, "caller-key-7"):
            with self.subTest(key=key):
                before = len(self.api.spans)
                self.api.drop_next(when="after", path="/api/v1/agent_spans")
                data = self.client.request(
                    "POST", "/api/v1/agent_spans", json_data=self.span_body(inst.id), idempotency_key=key
                )
                self.assertEqual(len(self.api.spans), before + 1)
                self.assertIn(data["details"]["id"], self.api.spans)
                first, second = self.api.requests[-2:]
                self.assertEqual(first["body"], second["body"])
                self.assertEqual(first["body"]["idempotency_key"], key or first["body"]["idempotency_key"])
                self.assertEqual(second["headers"].get("Idempotency-Key"), first["body"]["idempotency_key"])

    def test_request_keeps_the_callers_body_key_and_does_not_touch_the_callers_dict(self):
        body = {**self.span_body(self.active_instance().id), "idempotency_key": "body-key-1"}
        sent = dict(body)
        self.client.request("POST", "/api/v1/agent_spans", json_data=body)
        self.assertEqual(self.last()["body"], sent)
        self.assertEqual(body, sent)

    def test_update_whose_answer_was_lost_does_not_undo_a_later_update(self):
        other, _ = make_client(self.api.url)
        self.addCleanup(other.close)
        agent = other.agents.create({"name": "first"})  # so the PUT below opens a fresh connection:
        # a lost answer on a reused one is resent at once, for free (promise 1), with no wait to hook
        # While the client waits to retry its lost PUT, someone else renames the agent.
        self.client._sleep = lambda delay: other.agents.update(agent.id, {"name": "third"})
        self.api.drop_next(when="after", path=f"/api/v1/agent/{agent.id}")
        self.assertEqual(self.client.agents.update(agent.id, {"name": "second"}).id, agent.id)
        self.assertEqual(self.api.agents[agent.id]["name"], "third")  # the retry changed nothing
        puts = [r for r in self.api.requests if r["method"] == "PUT"]
        self.assertEqual(len(puts), 3)
        self.assertEqual(puts[0]["body"], puts[2]["body"])

    def test_delete_whose_answer_was_lost_is_not_reported_as_not_found(self):
        agent = self.client.agents.create({"name": "doomed"})
        self.api.drop_next(when="after", path=f"/api/v1/agent/{agent.id}")
        deleted = self.client.agents.delete(agent.id)
        self.assertEqual(deleted.id, agent.id)
        self.assertEqual(self.api.agents, {})
        first, second = [r for r in self.api.requests if r["method"] == "DELETE"]
        self.assertEqual(first["body"], second["body"])
        self.assertRegex(first["body"]["idempotency_key"], r"^[0-9a-f-]{36}$")
        again = self.client.agents.delete(agent.id, idempotency_key=first["body"]["idempotency_key"])
        self.assertEqual(again.id, agent.id)  # the stand-in replays DELETE by key, like POST

    def test_a_mutation_that_cannot_carry_a_key_is_not_resent_once_sent(self):
        agent = self.client.agents.create({"name": "a"})
        for method, path, body in (
            ("DELETE", f"/api/v1/agent/{agent.id}", None),
            ("POST", "/api/v1/bulk", [{"_type": "agents/list", "idempotency_key": "list-key-1"}]),
        ):
            with self.subTest(method=method):
                before = len(self.api.requests)
                self.api.drop_next(when="after", path=path)
                with self.assertRaises(ph.PrefactorConnectionError):
                    self.client.request(method, path, json_data=body)
                self.assertEqual(len(self.api.requests), before + 1)
        self.assertEqual(self.sleeps, [])

    def test_a_mutation_that_cannot_carry_a_key_is_retried_when_nothing_was_sent(self):
        client, sleeps = make_client(api_gone_url(), max_retries=2, initial_retry_delay=0.01)
        self.addCleanup(client.close)
        with self.assertRaises(ph.PrefactorRetryExhaustedError) as caught:
            client.request("DELETE", "/api/v1/agent/a1")
        self.assertIn("refused", str(caught.exception.last_error))
        self.assertEqual(len(sleeps), 2)

    def test_request_uses_the_key_inside_details_so_sending_twice_stores_one_span(self):
        body = self.span_body(self.active_instance().id)
        body["details"]["idempotency_key"] = "details-key-1"  # upstream's span-create shape
        before = len(self.api.spans)
        for _ in range(2):
            self.client.request("POST", "/api/v1/agent_spans", json_data=body)
        self.assertEqual(len(self.api.spans), before + 1)
        for sent in self.api.requests[-2:]:
            self.assertEqual(sent["body"]["idempotency_key"], "details-key-1")
            self.assertEqual(sent["headers"].get("Idempotency-Key"), "details-key-1")

    def test_request_checks_every_key_it_is_given_before_sending(self):
        inst = self.active_instance()
        before = len(self.api.requests)
        cases = [
            ("at most 64", {"idempotency_key": "k" * 100}, None),
            ("non-empty string", {"idempotency_key": 12345}, None),
            ("non-empty string", {"idempotency_key": ""}, None),
            ("at most 64", {"details": {"idempotency_key": "k" * 65}}, None),
            ("differ", {"idempotency_key": "body-key-1"}, "argument-key-1"),
            ("differ", {"details": {"idempotency_key": "inner-key-1"}}, "argument-key-1"),
            ("non-empty string", {}, ""),
            ("non-empty string", None, ""),
        ]
        for text, extra, key in cases:
            with self.subTest(text, extra=extra, key=key), self.assertRaisesRegex(ValueError, text):
                body = None if extra is None else {**self.span_body(inst.id), **extra}
                self.client.request("POST", "/api/v1/agent_spans", json_data=body, idempotency_key=key)
        self.assertEqual(len(self.api.requests), before)

    def test_every_mutating_request_carries_its_key_in_a_header(self):
        agent = self.client.agents.create({"name": "a"})
        for method, path, body, key in (
            ("POST", f"/api/v1/agent/{agent.id}/retire", None, None),
            ("POST", "/api/v1/bulk", [], None),
            ("DELETE", f"/api/v1/agent/{agent.id}", None, "delete-key-1"),
        ):
            with self.subTest(method=method, path=path):
                with contextlib.suppress(ph.PrefactorApiError):
                    self.client.request(method, path, json_data=body, idempotency_key=key)
                self.assertRegex(self.last()["headers"].get("Idempotency-Key") or "", key or r"^[0-9a-f-]{36}$")
        self.client.request("GET", "/api/v1/ping")
        self.assertNotIn("Idempotency-Key", self.last()["headers"])


def start_cli_in(folder, *args, url=None, token=TOKEN):
    """Start ``python3 -m prefactor_http ARGS`` in ``folder`` (the module found by PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFACTOR_")}
    env["PYTHONPATH"] = HERE
    if url:
        env.update(PREFACTOR_API_URL=url, PREFACTOR_API_TOKEN=token)
    pipe = subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "prefactor_http", *args],
        cwd=folder,
        env=env,
        stdin=pipe,
        stdout=pipe,
        stderr=pipe,
        preexec_fn=sigint_delivered,
    )


def sigint_delivered():
    """In the CLI's process: Ctrl-C raises KeyboardInterrupt, even when these tests run
    as a shell's background job (which starts with SIGINT ignored, and Python keeps that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish_cli(proc, stdin=None):
    out, err = proc.communicate(stdin, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli_in(folder, *args, stdin=None, **env):
    return finish_cli(start_cli_in(folder, *args, **env), stdin)


class CliNeverLosesALineTests(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.api = LocalApiServer(token=TOKEN).start()
        self.addCleanup(self.api.stop)
        with PrefactorHttpClient(self.api.config()) as client:
            inst = client.agent_instances.register({"name": "v"}, agent_id="a")
            client.agent_instances.start(inst.id)
        self.inst = inst.id

    def span(self, n, instance=None, end=b"\n", tag="send"):
        item = {
            "_type": "agent_spans/create",
            "idempotency_key": f"{tag}-key-{n:05d}",
            "agent_instance_id": instance or self.inst,
            "schema_name": "s",
            "status": "active",
            "id": f"{tag}-span-{n:05d}",
        }
        return json.dumps(item).encode() + end

    def write(self, name, lines):
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.writelines(lines)
        return path

    def rejects(self, name="prefactor-rejects.jsonl"):
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            return f.read().splitlines(keepends=True)

    def assert_every_line_stored_or_rejected(self, lines, rejected):
        left = list(rejected)
        for number, line in enumerate(lines, 1):
            try:
                stored = json.loads(line).get("id") in self.api.spans
            except ValueError:
                stored = False
            if not stored:
                self.assertIn(line, left, f"line {number} lost")
                left.remove(line)
        self.assertEqual([line for line in left if line not in lines], [], "lines that were not in the input")

    def thousand_lines(self, tag):
        lines = [b"{not json\n"]  # one bad line at the top, as in the issue
        for n in range(2, 1001):
            if n % 97 == 0:
                lines.append(self.span(n, instance="missing-instance", tag=tag))  # the server refuses it
            elif n % 89 == 0:
                lines.append(lines[1])  # a key repeated within the file
            elif n % 83 == 0:
                lines.append(b'{"_type": "agent_spans/create", "idempotency_key": "cut-off\r\n')
            elif n == 500:
                lines.append(b"\xff\xfe not utf-8\n")
            else:
                lines.append(self.span(n, end=b"\r\n" if n % 7 == 0 else b"\n", tag=tag))
        return lines

    def test_the_rejects_file_may_be_the_input_and_is_sent_again(self):
        for name, extra in (("prefactor-rejects.jsonl", []), ("mine.jsonl", ["--rejects", "mine.jsonl"])):
            with self.subTest(name):
                lines = self.thousand_lines(tag=name[:4])
                self.write(name, lines)
                out = run_cli_in(self.folder, "send", name, *extra, url=self.api.url)
                self.assertEqual(out.returncode, 1, out.stderr)
                rejected = self.rejects(name)
                self.assert_every_line_stored_or_rejected(lines, rejected)
                self.assertGreater(len(self.api.spans), 500)
                again = run_cli_in(self.folder, "send", name, *extra, url=self.api.url)  # as the README advises
                self.assertEqual(again.returncode, 1, again.stderr)
                self.assert_every_line_stored_or_rejected(lines, self.rejects(name))
                self.assertNotIn(b"Invalid control character", out.stderr)
                self.assertIn(b"line 1: not JSON", out.stderr)
                self.assertIn(
                    b"line 178: not a bulk item: idempotency_key '" + name[:4].encode() + b"-key-00002' repeats line 2",
                    out.stderr,
                )
                self.assertEqual([f for f in os.listdir(self.folder) if f.endswith(".tmp")], [])

    def test_a_clean_run_exits_0_and_leaves_no_stale_rejects_file(self):
        self.write("prefactor-rejects.jsonl", [b"stale line from an earlier run\n"])
        input_path = self.write("in.jsonl", [self.span(1), self.span(2, end=b"")])
        out = run_cli_in(self.folder, "send", input_path, url=self.api.url)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), b"2 sent, 0 rejected")
        self.assertEqual(sorted(os.listdir(self.folder)), ["in.jsonl"])

    def test_a_whole_bulk_request_failing_rejects_its_lines_and_the_next_chunk_goes_on(self):
        lines = [self.span(n) for n in range(1, 151)]
        self.api.fail_next(422, path="/api/v1/bulk")
        out = run_cli_in(self.folder, "send", "--chunk", "100", url=self.api.url, stdin=b"".join(lines))
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertEqual(self.rejects(), lines[:100])
        self.assertEqual(len(self.api.spans), 50)
        self.assertEqual(out.stderr.count(b"\n"), 1, out.stderr)  # one line for the chunk, not one per item

    def test_an_unreachable_api_stops_after_the_first_chunks_attempts(self):
        lines = [self.span(n) for n in range(1, 251)]
        server = FaultServer([("drop_before",)])
        self.addCleanup(server.close)
        out = run_cli_in(self.folder, "send", "--chunk", "100", "--retries", "1", url=server.url, stdin=b"".join(lines))
        self.assertEqual(out.returncode, 3, out.stderr)
        self.assertEqual(server.connections, 2)  # one chunk, first attempt and one retry; then no more
        self.assertEqual(self.rejects(), lines)
        self.assertEqual(out.stderr.count(b"\n"), 1, out.stderr)
        self.assertIn(b"network failure", out.stderr)
        closed = run_cli_in(self.folder, "send", "--retries", "0", url=api_gone_url(), stdin=b"".join(lines))
        self.assertEqual(closed.returncode, 3, closed.stderr)
        self.assertEqual(self.rejects(), lines)

    def test_a_refused_token_stops_after_the_first_request(self):
        lines = [self.span(n) for n in range(1, 251)]
        before = len(self.api.requests)
        out = run_cli_in(
            self.folder, "send", "--chunk", "100", url=self.api.url, token="wrong-token", stdin=b"".join(lines)
        )
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertEqual(len(self.api.requests), before + 1)
        self.assertEqual(self.rejects(), lines)
        self.assertIn(b"auth failed", out.stderr)
        self.assertEqual(self.api.spans, {})

    def test_lines_json_reads_but_cannot_send_are_rejected_and_earlier_rejects_kept(self):
        def with_payload(n, value):
            return self.span(n, tag="nan").replace(b'"status"', b'"payload": {"x": %s}, "status"' % value)

        unsendable = [with_payload(3, b"NaN"), with_payload(4, b"-Infinity"), with_payload(5, b"1e400")]
        for tag, odd in (("nan", unsendable), ("deep", [b"[" * 100000 + b"]" * 100000 + b"\n"])):
            with self.subTest(tag):
                lines = [self.span(n, tag=tag, instance=None if n != 2 else "gone") for n in (1, 2)]
                lines += [*odd, self.span(6, tag=tag)]
                out = run_cli_in(self.folder, "send", self.write("in.jsonl", lines), "--chunk", "2", url=self.api.url)
                self.assertEqual(out.returncode, 1, out.stderr)
                self.assertNotIn(b"Traceback", out.stderr)
                self.assertEqual(self.rejects(), [lines[1], *odd])  # the API's reject, written before, is kept too
                self.assertEqual(
                    [k for k in sorted(self.api.spans) if tag in k], [f"{tag}-span-00001", f"{tag}-span-00006"]
                )
                self.assertEqual(out.stderr.count(b": not JSON: "), len(odd), out.stderr)

    def test_lines_are_split_at_newline_only_and_kept_byte_for_byte(self):
        cr = self.span(2).replace(b", ", b",\r ")  # a lone CR is JSON whitespace, not a line end
        odd = [b"\xc2\xa0\n", b"\x0c\n", b"\x1c\n", "\u3000\n".encode(), self.span(4).replace(b"s", b"\xe9", 1)]
        lines = [b"\xef\xbb\xbf" + self.span(1), cr, b" \t\r\n", *odd, self.span(5)]  # a BOM starts the file
        out = run_cli_in(self.folder, "send", self.write("in.jsonl", lines), url=self.api.url)
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertEqual(sorted(self.api.spans), ["send-span-00001", "send-span-00002", "send-span-00005"])
        self.assertEqual(self.rejects(), odd)
        self.assertEqual(out.stderr.count(b": not JSON: "), 4, out.stderr)
        self.assertIn(b"line 8: not UTF-8", out.stderr)

    def test_a_rejects_path_that_is_not_a_regular_file_is_refused_before_sending(self):
        target = self.write("target.txt", [b"keep me\n"])
        os.symlink(target, os.path.join(self.folder, "link.jsonl"))
        os.mkdir(os.path.join(self.folder, "dir.jsonl"))
        before = len(self.api.requests)
        for name in ("link.jsonl", "dir.jsonl"):
            with self.subTest(name):
                out = run_cli_in(self.folder, "send", "--rejects", name, url=self.api.url, stdin=self.span(1))
                self.assertEqual(out.returncode, 2, out.stderr)
                self.assertEqual(out.stderr.strip().count(b"\n"), 0, out.stderr)
                self.assertIn(b"not a regular file", out.stderr)
        self.assertEqual(len(self.api.requests), before)
        self.assertTrue(os.path.islink(os.path.join(self.folder, "link.jsonl")))
        self.assertEqual(sorted(os.listdir(self.folder)), ["dir.jsonl", "link.jsonl", "target.txt"])
        self.assertEqual(os.listdir(os.path.join(self.folder, "dir.jsonl")), [])

    def test_ctrl_c_keeps_every_line_not_stored_even_when_the_rejects_file_is_the_input(self):
        answer, bulks, gate = self.api._answer, [], {}

        def hold_the_second_bulk(method, path, *rest):
            if path == "/api/v1/bulk":
                bulks.append(path)
                if len(bulks) == 2:
                    gate["held"].set()
                    gate["release"].wait(30)
            return answer(method, path, *rest)

        self.api._answer = hold_the_second_bulk
        self.api._server.handle_error = lambda *args: None  # the held answer finds its client gone: no noise
        for tag in ("file", "stdin"):
            with self.subTest(tag):
                bulks.clear()
                gate.update(held=threading.Event(), release=threading.Event())
                self.addCleanup(gate["release"].set)
                lines = [self.span(n, tag=tag, instance="gone" if n == 2 else None) for n in range(1, 7)]
                self.write("prefactor-rejects.jsonl", lines)
                name = "prefactor-rejects.jsonl" if tag == "file" else "-"
                proc = start_cli_in(self.folder, "send", name, "--chunk", "2", url=self.api.url)
                proc.stdin.write(b"".join(lines) if tag == "stdin" else b"")
                proc.stdin.flush()
                self.assertTrue(gate["held"].wait(30))
                proc.send_signal(signal.SIGINT)
                out = finish_cli(proc)
                stored = [k for k in self.api.spans if tag in k]  # before the held chunk is let through
                gate["release"].set()
                self.assertEqual(out.returncode, 130, out.stderr)
                self.assertNotIn(b"Traceback", out.stderr)
                self.assertEqual(out.stderr.count(b"\n"), 2, out.stderr)  # the API's reject, then why it stopped
                self.assertIn(
                    b"interrupted" + (b"; stdin after line 4 was not read" if tag == "stdin" else b";"), out.stderr
                )
                kept = lines[1:] if tag == "file" else lines[1:4]  # the API's reject, the chunk held, the rest of FILE
                self.assertEqual(self.rejects(), kept)
                self.assertEqual(stored, [f"{tag}-span-00001"])
                self.assertEqual([f for f in os.listdir(self.folder) if f.endswith(".tmp")], [])


class CliConfigurationTests(unittest.TestCase):
    def assert_one_line(self, out, code=2):
        self.assertEqual(out.returncode, code, out.stderr)
        self.assertNotIn(b"Traceback", out.stderr)
        self.assertEqual(out.stderr.strip().count(b"\n"), 0, out.stderr)
        self.assertNotIn(TOKEN.encode(), out.stderr + out.stdout)

    def test_bad_configuration_is_one_line_and_exit_2_for_every_command(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        gone = api_gone_url()
        started = [
            (command, args, start_cli_in(folder, *args, command))  # at once: each only starts and fails
            for command in ("ping", "send", "demo")
            for args in (
                ["--api-url", "ftp://example.com", "--api-token", TOKEN],
                ["--api-url", gone, "--api-token", "two words"],
                ["--api-url", gone, "--api-token", TOKEN, "--timeout", "0"],
                ["--api-url", gone],
            )
        ]
        for command, args, proc in started:
            with self.subTest(command=command, args=args):
                self.assert_one_line(finish_cli(proc, b""))
        self.assertEqual(os.listdir(folder), [])

    def test_options_go_before_or_after_the_command(self):
        with LocalApiServer(token=TOKEN) as api:
            after = run_cli_in(HERE, "ping", "--api-url", api.url, "--api-token", TOKEN, "-v")
            before = run_cli_in(HERE, "--api-url", api.url, "--api-token", TOKEN, "ping", "--timeout", "5")
        for out in (after, before):
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn(b"accepted the token", out.stdout)
        self.assertIn(b"GET /api/v1/ping -> 200", after.stderr)

    def test_numbers_that_overflow_and_hosts_that_cannot_be_named_are_bad_configuration(self):
        cases = {
            "request_timeout must be positive": {"request_timeout": math.inf},
            "connect_timeout must be positive": {"connect_timeout": 1e300},
            "max_retry_delay must be positive": {"max_retry_delay": math.nan},
            "total_timeout must be positive": {"total_timeout": math.inf},
            "retry_multiplier must be >= 1": {"retry_multiplier": math.inf},
            "api_url host": {"api_url": "http://a..b"},
            "api_url host ": {"api_url": "https://" + "x" * 64 + ".example.com/api"},
        }
        for text, override in cases.items():
            values = {"api_url": "https://h", "api_token": "t", **override}
            with self.subTest(text), self.assertRaisesRegex(ValueError, "^" + text):
                HttpClientConfig(**values)
        gone = api_gone_url()
        started = [
            start_cli_in(HERE, "ping", "--api-url", gone, "--api-token", TOKEN, "--timeout", "inf"),
            start_cli_in(HERE, "ping", "--api-url", "http://a..b", "--api-token", TOKEN, "--retries", "1"),
        ]
        for proc in started:
            self.assert_one_line(finish_cli(proc))

    def test_demo_with_a_refused_token_is_one_line_and_exit_2(self):
        with LocalApiServer(token=TOKEN) as api:
            out = run_cli_in(HERE, "demo", url=api.url, token="wrong-token")
        self.assert_one_line(out)
        self.assertIn(b"auth failed", out.stderr)


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


def parse(answer: bytes, method: str = "GET"):
    """Our reader over the bytes alone: (response, body, what is left unread)."""
    reader = io.BufferedReader(io.BytesIO(answer))
    response, body = ph._read_response(reader, method)
    return response, body, reader.read()


def write_cert(test: unittest.TestCase) -> str:
    folder = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, folder)
    cert_file = os.path.join(folder, "cert.pem")
    with open(cert_file, "w") as f:
        f.write(CERT_PEM + KEY_PEM)
    return cert_file


class TlsFaultServer(FaultServer):
    """A FaultServer that speaks TLS with the test certificate."""

    def __init__(self, cert_file, *scripts):
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file)
        super().__init__(*scripts)
        self.url = f"https://127.0.0.1:{self.port}"

    def handle(self, conn, index):
        try:
            conn = self.context.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        super().handle(conn, index)


def interrupt_main_thread_when(condition) -> None:
    """SIGALRM to the main thread once ``condition()`` holds (checked every 10 ms, 5 s at most)."""

    def watch():
        for _ in range(500):
            if condition():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
                return
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


class CleanConnectionTests(FaultTestCase):
    """A connection carries another request only when its last answer ended
    exactly at its framing boundary (issue 9, items 1 and 2)."""

    A, B, X = (http_response(200, {"id": name}) for name in "ABX")  # X: bytes that are no call's answer

    def two_calls(self, server, **overrides):
        client, _ = self.client(server.url, max_retries=0, **overrides)
        try:
            first = client.validate_token()
        except ph.PrefactorHttpError as error:
            first = error
        return first, client.validate_token()

    def test_bytes_past_an_answer_close_its_connection(self):
        chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{"id":1\r\n1\r\n}\r\n0\r\n\r\n'
        cases = {
            "past Content-Length": self.A + self.X,
            "body on a 204": b"HTTP/1.1 204 No Content\r\n\r\n" + self.X,
            "body on a 304": b"HTTP/1.1 304 Not Modified\r\n\r\n" + self.X,
            "chunked and a Content-Length covering more": chunked.replace(b"OK\r\n", b"OK\r\nContent-Length: 99\r\n")
            + self.X,
            "after the last chunk": chunked + self.X,
        }
        for name, answer in cases.items():
            with self.subTest(name):
                server = self.serve([("reply", answer)], [("reply", self.B)])
                _, second = self.two_calls(server)
                self.assertEqual((second, server.connections), ({"id": "B"}, 2))

    def test_a_declared_body_on_a_204_arriving_late_is_never_read_as_an_answer(self):
        head = b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n" % len(self.X)
        server = self.serve([("reply", head), ("reply", self.X)], [("reply", self.B)])
        self.assertEqual(self.two_calls(server)[1], {"id": "B"})

    def test_bytes_past_an_answer_close_a_tls_connection_too(self):
        cert_file = write_cert(self)
        pad = 8192 - len(http_response(200, {"id": "A", "pad": "p" * 1000})) + 1000  # fills the reader's buffer
        exactly_one_buffer = http_response(200, {"id": "A", "pad": "p" * pad})
        self.assertEqual(len(exactly_one_buffer), 8192)
        for name, answer in {"in the reader's buffer": self.A + self.X,
                             "decrypted, pending in the TLS record": exactly_one_buffer + self.X}.items():  # fmt: skip
            with self.subTest(name):
                server = TlsFaultServer(cert_file, [("reply", answer)], [("reply", self.B)])
                self.addCleanup(server.close)
                first, second = self.two_calls(server, ca_file=cert_file)
                self.assertEqual((first["id"], second, server.connections), ("A", {"id": "B"}, 2))

    def test_a_clean_answer_keeps_its_connection(self):
        server = self.serve([("reply", self.A), ("reply", self.B)])
        self.assertEqual(self.two_calls(server), ({"id": "A"}, {"id": "B"}))
        self.assertEqual(server.connections, 1)

    @unittest.skipUnless(hasattr(signal, "pthread_kill"), "needs signal.pthread_kill")
    def test_an_interrupted_call_closes_its_connection(self):
        if threading.current_thread() is not threading.main_thread():
            self.skipTest("signal handlers run in the main thread only")

        class Interrupted(Exception):
            """As pytest-timeout or Celery raise from a signal handler."""

        for exc in (Interrupted, KeyboardInterrupt):
            with self.subTest(exc.__name__):

                def interrupt(signum, frame, exc=exc):
                    raise exc

                previous = signal.signal(signal.SIGALRM, interrupt)
                self.addCleanup(signal.signal, signal.SIGALRM, previous)
                # connection 0 holds its answer to the first request and sends it late, with the next one
                server = self.serve([("reply", b""), ("reply", self.A)], [("reply", self.B)])
                client, _ = self.client(server.url, max_retries=0, request_timeout=5)
                interrupt_main_thread_when(lambda server=server: server.requests)  # while the call waits
                with self.assertRaises(exc):
                    client.validate_token()
                self.assertEqual((client.validate_token(), server.connections), ({"id": "B"}, 2))

    @unittest.skipUnless(hasattr(signal, "pthread_kill"), "needs signal.pthread_kill")
    def test_a_call_interrupted_while_sending_closes_its_connection(self):
        if threading.current_thread() is not threading.main_thread():
            self.skipTest("signal handlers run in the main thread only")

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        self.addCleanup(signal.signal, signal.SIGALRM, signal.signal(signal.SIGALRM, interrupt))
        server = DeafToBigBodies(self.B)
        self.addCleanup(server.close)
        client, _ = self.client(server.url, max_retries=0, request_timeout=2)
        interrupt_main_thread_when(server.deaf.is_set)  # the server stopped reading: the send blocks
        with self.assertRaises(KeyboardInterrupt):
            client.request("POST", "/x", json_data={"big": "x" * 32_000_000})
        self.assertEqual(client.validate_token(), {"id": "B"})  # not sent after the half-sent body


class DeafToBigBodies(Listener):
    """Answers requests without a body; at a request with a body over 1 MB it stops
    reading (the client's send blocks once the buffers are full) and stays open."""

    def __init__(self, answer: bytes):
        self.answer, self.stopping, self.deaf = answer, threading.Event(), threading.Event()
        super().__init__()

    def handle(self, conn, index):
        with conn:
            head = b""
            while not self.stopping.is_set():
                piece = conn.recv(65536)
                if not piece:
                    return
                head += piece
                if b"\r\n\r\n" not in head:
                    continue
                length = re.search(rb"(?i)\ncontent-length: *([0-9]+)", head)
                if length and int(length[1]) > 1_000_000:
                    self.deaf.set()
                    self.stopping.wait(30)
                    return
                conn.sendall(self.answer)
                head = b""

    def close(self):
        self.stopping.set()
        super().close()


class StrictReaderTests(FaultTestCase):
    """RFC 9112 grammar and bounds: reject rather than guess (issue 9, items 3, 4, 7, 9)."""

    OK = b"HTTP/1.1 200 OK\r\n"

    def assert_rejected(self, answer, text, **overrides):
        """Refused at once, though the server keeps the connection open."""
        server = self.serve([("reply", answer)])
        client, _ = self.client(server.url, max_retries=0, request_timeout=2, **overrides)
        with self.assertRaisesRegex(ph.PrefactorConnectionError, text):
            client.validate_token()

    def test_chunk_sizes_are_bounded_hex_digits(self):
        for size in (b"-3", b"+2", b"0x2", b" 2", b"1_0", b"", b"0" * 17 + b"2"):
            with self.subTest(size):
                answer = self.OK + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n{}\r\n0\r\n\r\n"
                self.assert_rejected(answer, "bad chunk size")

    def test_chunk_data_is_followed_by_exactly_crlf(self):
        for end in (b"\n", b"XY", b"\r"):
            with self.subTest(end):
                self.assert_rejected(
                    self.OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}" + end + b"0\r\n\r\n", "CRLF"
                )

    def test_many_small_chunks_keep_memory_bounded(self):
        import tracemalloc

        answer = self.OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"2\r\nab\r\n" * 30_000 + b"0\r\n\r\n"
        tracemalloc.start()
        try:
            _, body, _ = parse(answer)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(len(body), 60_000)
        self.assertLess(peak, 1_000_000)  # 0.13 MB; a list of 30,000 pieces took 3.8 MB for a 60 kB body

    def test_header_limits_count_lines_and_bytes(self):
        self.assert_rejected(
            self.OK + b"X-A: 1\r\n" * 101 + b"Content-Length: 2\r\n\r\n{}", "more than 100 header lines"
        )
        self.assert_rejected(self.OK + b"X-A: " + b"a" * 65536 + b"\r\n\r\n{}", "headers over 65536 bytes")
        many = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 700) for i in range(99))  # 99 lines, 70 kB
        self.assert_rejected(self.OK + many + b"\r\n", "headers over")
        self.assertEqual(parse(self.OK + b"X-A: 1\r\n" * 100 + b"\r\n")[0].headers["x-a"], ", ".join("1" * 100))

    def test_trailers_are_bounded(self):
        chunked = self.OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        self.assert_rejected(chunked + b"T: 1\r\n" * 101 + b"\r\n", "more than 100 header lines")
        self.assert_rejected(chunked + b"bad trailer\r\n\r\n", "bad header line")
        self.assertEqual(parse(chunked + b"T: 1\r\n\r\n")[1:], (b"{}", b""))

    def test_a_malformed_line_quoting_the_token_is_redacted_before_any_cut(self):
        pieces = {TOKEN[i : i + 8] for i in range(len(TOKEN) - 7)}  # no 8 characters of it may show
        for answer in (self.OK + b"X-Echo " + b"x" * 65 + TOKEN.encode() + b" : 1\r\n\r\n",
                       b"HTTP/1.1 2000 " + b"x" * 60 + TOKEN.encode() + b"\r\n\r\n",
                       self.OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"1;" + b"x" * 30 + TOKEN.encode() + b"\x01\r\n",
                       self.OK + b"Content-Length: " + b"1" * 30 + TOKEN.encode() + b"\r\n\r\n"):  # fmt: skip
            with self.subTest(answer):
                server = self.serve([("reply", answer)])
                client, _ = self.client(server.url, max_retries=0)
                with self.assertRaises(ph.PrefactorConnectionError) as caught:
                    client.validate_token()
                cause = caught.exception.__cause__
                seen = " ".join([str(caught.exception), repr(caught.exception), str(cause), repr(cause.args)])
                self.assertEqual([p for p in pieces if p in seen], [])

    def test_deeply_nested_json_is_our_error_not_recursion_error(self):
        deep = b"[" * 100_000
        for status, cls in ((200, ph.PrefactorResponseContractError), (500, ph.PrefactorApiError)):
            with self.subTest(status):
                server = self.serve([("reply", http_response(status, deep))])
                client, _ = self.client(server.url, max_retries=0)
                with self.assertRaises(cls) as caught:
                    client.validate_token()
                self.assertEqual(caught.exception.status_code, status)

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs RLIMIT_AS and /proc")
    def test_a_json_body_too_big_to_hold_is_our_error_not_memory_error(self):
        script = """if True:
            import resource, test_prefactor_http as t
            body = b"[" + b",".join([b"{}"] * 3_000_000) + b"]"  # 9 MB, about 200 MB as Python objects
            server = t.FaultServer([("reply", t.http_response(200, body))], [("reply", t.http_response(500, body))])
            size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
            resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (128 << 20), resource.RLIM_INFINITY))
            for _ in range(2):
                client, _ = t.make_client(server.url, max_retries=0)
                try:
                    client.validate_token()
                except BaseException as error:
                    print(type(error).__name__)
                client.close()
        """
        env = {**os.environ, "MALLOC_ARENA_MAX": "1"}  # thread arenas would take the headroom
        result = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True)
        self.assertEqual(result.stdout.split(), ["PrefactorResponseContractError", "PrefactorApiError"], result.stderr)

    def test_status_line_grammar(self):
        for line in (b"HTTP/1.1 2000 OK", b"HTTP/1.1 099 Low", b"HTTP/1.1 600 High", b"HTTP/1.1 20 OK",
                     b"HTTP/1.1  200 OK", b"HTTP/1.1 200 OK\r", b"HTTP/2.0 200 OK", b"HTTP/1.1 2x0 OK",
                     b"HTTP/1.1 200 \x01", b"http/1.1 200 OK"):  # fmt: skip
            with self.subTest(line):
                self.assert_rejected(line + b"\r\nContent-Length: 2\r\n\r\n{}", "bad status line")
        for line, reason in ((b"HTTP/1.1 200", ""), (b"HTTP/1.0 599 Caf\xe9 ", "Caf\xe9")):
            response, body, _ = parse(line + b"\r\nContent-Length: 2\r\n\r\n{}")
            self.assertEqual((response.reason, body), (reason, b"{}"))

    def test_field_grammar(self):
        for field in (b"Content-Length : 2", b"Bad Name: x", b": empty", b"X-A\x00: x", b"X-A: a\rb",
                      b"X-A: a\x7fb", b" X-A: first field folded"):  # fmt: skip
            with self.subTest(field):
                self.assert_rejected(self.OK + field + b"\r\nContent-Length: 2\r\n\r\n{}", "bad header line")

    def test_obs_fold_is_unfolded_into_the_previous_value(self):
        answer = self.OK + b"X-A: a\r\n Content-Length: 2\r\n\tb \r\nConnection: close\r\n\r\n{}extra"
        response, body, _ = parse(answer)
        self.assertEqual(response.headers, {"x-a": "a Content-Length: 2 b", "connection": "close"})
        self.assertEqual(body, b"{}extra")  # no Content-Length: read to the close

    def test_content_length_grammar(self):
        for value, text in ((b"+2", "bad Content-Length"), (b"1_2", "bad Content-Length"),
                            (b"2, 3", "bad Content-Length"), (b"\xb2", "bad Content-Length"),
                            (b"2\r\nContent-Length: 3", "bad Content-Length"), (b"9" * 19, "bad Content-Length"),
                            (b"0x2", "bad Content-Length")):  # fmt: skip
            with self.subTest(value):
                self.assert_rejected(self.OK + b"Content-Length: " + value + b"\r\n\r\n{}", text)
        same_twice = self.OK + b"Content-Length: 2, 2\r\nContent-Length: 2\r\n\r\n{}"
        self.assertEqual(parse(same_twice)[1:], (b"{}", b""))

    def test_transfer_encoding_accepts_chunked_only(self):
        for coding in (b"notchunked", b"gzip, chunked", b"chunked, chunked", b"identity", b"chunked;q=1", b""):
            with self.subTest(coding):
                answer = self.OK + b"Transfer-Encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                self.assert_rejected(answer, "Transfer-Encoding")
        for coding in (b"Chunked", b"chunked "):
            response, body, _ = parse(self.OK + b"Transfer-Encoding: " + coding + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            self.assertEqual((body, response.will_close), (b"{}", False))

    def test_interim_answers_are_bounded_and_101_is_an_error(self):
        self.assert_rejected(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n" + http_response(), "101")
        self.assert_rejected(b"HTTP/1.1 100 Continue\r\n\r\n" * 11 + http_response(), "interim")
        answer = b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + b"HTTP/1.1 199 X\r\n\r\n" + http_response(200, {})
        self.assertEqual(parse(answer)[:2][1], b"{}")


class BoundedAnswerTests(FaultTestCase):
    """Memory and the C stack stay bounded whatever a 2xx or error body holds (attack 1)."""

    def call(self, answer, call=PrefactorHttpClient.validate_token):
        server = self.serve([("reply", answer)])
        client, _ = self.client(server.url, max_retries=0)
        return call(client)

    def test_a_long_timestamp_is_not_cached(self):
        ph._parse_iso.cache_clear()
        answer = http_response(200, ok_body(inserted_at="2024-01-01T00:00:00" + "0" * 100_000))
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, "inserted_at is not an ISO-8601 timestamp"):
            self.call(answer, lambda client: client.agent_instances.get("inst-1"))
        self.assertEqual(ph._parse_iso.cache_info().currsize, 0)

    def test_json_nesting_is_bounded_whatever_the_recursion_limit(self):
        self.addCleanup(sys.setrecursionlimit, sys.getrecursionlimit())
        sys.setrecursionlimit(5000)  # as some applications do
        deep = b'{"a":' * 1500 + b"1" + b"}" * 1500  # under the recursion limit, over ours
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, "expected JSON"):
            self.call(http_response(200, deep))
        brackets_in_strings = {"s": "[{" * 5000, "t": ["[\\", '"[', "]"] * 100}
        self.assertEqual(self.call(http_response(200, brackets_in_strings)), brackets_in_strings)
        script = """if True:
            import sys, test_prefactor_http as t
            server = t.FaultServer([("reply", t.http_response(200, b"[" * 4_000_000))])
            client, _ = t.make_client(server.url, max_retries=0)
            sys.setrecursionlimit(1_000_000)  # the C decoder would overflow the C stack
            try:
                client.validate_token()
            except BaseException as error:
                print(type(error).__name__)
        """
        result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout), (0, "PrefactorResponseContractError\n"), result.stderr)

    def test_json_values_are_bounded_and_a_big_bulk_answer_passes(self):
        with self.assertRaisesRegex(ph.PrefactorResponseContractError, "expected JSON") as caught:
            self.call(http_response(200, b'{"details":[' + b"{}," * 600_000 + b"0]}"))  # 1.8 MB, 90 MB as objects
        self.assertIn("250000 values", str(caught.exception.cause))
        envelope = b'{"message": "m", "x": [' + b"0," * 510_000 + b"0]}"  # within the first MiB that is decoded
        with self.assertRaisesRegex(ph.PrefactorApiError, "ping: HTTP 500"):  # not "m": no envelope read
            self.call(http_response(500, envelope))
        output = {"status": "success", "details": {"id": "s", "payload": {f"k{i}": "v" * 20 for i in range(30)}}}
        outputs = {f"key-{i:08d}": output for i in range(2500)}  # 5 times 500 outputs of ~1 KB
        self.assertEqual(len(self.call(http_response(200, {"status": "success", "outputs": outputs}))["outputs"]), 2500)

    @unittest.skipUnless(sys.platform.startswith("linux"), "needs RLIMIT_AS and /proc")
    def test_memory_pressure_is_our_error_not_memory_error(self):
        script = """if True:
            import resource, test_prefactor_http as t
            for status, body, headroom in ((200, b"x" * (32 << 20), 16), (500, "\U0001f600".encode() * (30 << 18), 60)):
                server = t.FaultServer([("reply", t.http_response(status, body, {}))])
                client, _ = t.make_client(server.url, max_retries=0)
                size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
                resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + (headroom << 20), resource.RLIM_INFINITY))
                try:
                    client.validate_token()
                except BaseException as error:
                    print(type(error).__name__)
                resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                client.close()
                server.close()
        """
        env = {**os.environ, "MALLOC_ARENA_MAX": "1"}  # thread arenas would take the headroom
        result = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True)
        self.assertEqual(result.stdout.split(), ["PrefactorConnectionError", "PrefactorApiError"], result.stderr)


# ---------------------------------------------------------------------------- #
# Differential test: our reader against http.client
# ---------------------------------------------------------------------------- #


def generate_answer(rng: random.Random) -> bytes:
    """One answer: half of them valid (in every form the RFC allows), half with
    odd choices here and there: every framing rule and its neighbours."""
    odd_mode = rng.random() < 0.5

    def pick(good, odd=()):
        return rng.choice(odd if odd and odd_mode and rng.random() < 0.2 else good)

    def eol():
        return pick([b"\r\n"] * 9 + [b"\n"], [b"\r", b"\n\r", b" \r\n", b""])

    def chunked(body):
        out = b""
        while body:
            n = rng.randint(1, len(body))
            size = pick([b"%x" % n] * 5 + [b"%X" % n, b"00%x" % n, b"%x;ext=1" % n, b'%x ; e="q"' % n, b"%x " % n],
                        [b"-%x" % n, b"+%x" % n, b"0x%x" % n, b" %x" % n, b"%x" % (n + 1), b"%x" % max(n - 1, 0),
                         b"1_%x" % n, b"%x\xff" % n, b"1" * 17])  # fmt: skip
            out += size + eol() + body[:n] + pick([b"\r\n"], [b"\n", b"", b"\r\r\n", b"XY"])
            body = body[n:]
        last = pick([b"0", b"000", b"0;x=y", b"0 "], [b"", b"-0", b"0x0"]) + eol()
        trailers = pick([b"", b"T: v" + eol(), b"T: v\r\n u" + eol()], [b"bad trailer\r\n", b"T : v\r\n"])
        return out + last + trailers + pick([b"\r\n", b"\n"], [b"", b"junk"])

    prefix = b""
    for _ in range(pick([0, 0, 0, 1, 2], [11])):
        prefix += pick([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n",
                        b"HTTP/1.1 102 Processing\n\n", b"HTTP/1.1 100 Continue\r\nX: y\r\n z\r\n\r\n"],
                       [b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n", b"HTTP/1.1 100\r\nBad Line\r\n\r\n"])  # fmt: skip
    version = pick([b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/1.9"], [b"HTTP/2.0", b"HTTP/1", b"http/1.1", b"HTTP/1.1 "])
    code = pick([b"200"] * 5 + [b"201", b"204", b"304", b"404", b"429", b"500", b"599"],
                [b"100", b"101", b"199", b"600", b"099", b"2000", b"20", b"2x0", b"-20", b" 200", b"+20"])  # fmt: skip
    reason = pick([b" OK", b"", b" ", b" Not Found Here", b" \xe9t\xe9", b"\tOK"], [b" bad\x01", b" OK\r"])
    body = rng.choice([b"", b"{}", b'{"id": "x"}', bytes(rng.randrange(256) for _ in range(rng.randrange(40))),
                       b"x" * rng.randrange(3000)])  # fmt: skip
    n = len(body)
    framing = pick(["length", "length", "chunked", "chunked", "close"], ["both"])
    fields = []
    if framing in ("length", "both"):
        fields.append(b"Content-Length: " + pick([b"%d" % n] * 4 + [b"0%d" % n, b"%d " % n, b"%d, %d" % (n, n),
            b"%d\r\nContent-Length: %d" % (n, n)], [b"%d" % (n + 3), b"%d" % max(n - 3, 0), b"+%d" % n, b"-1",
            b"%d,%d" % (n, n + 1), b"0x%x" % n, b"%d\x00" % n, b"", b"1" * 25, b"99999999",
            b"%d\r\nContent-Length: %d" % (n, n + 1), b"%d\r\n %d" % (n, n)]))  # fmt: skip
    if framing in ("chunked", "both"):
        fields.append(b"Transfer-Encoding: " + pick([b"chunked"] * 4 + [b"Chunked", b" chunked", b"chunked "],
            [b"chunked, chunked", b"gzip, chunked", b"notchunked", b"identity", b"chunked,", b"", b"chunked;q=1",
             b"x-chunked", b"chunked\r\nTransfer-Encoding: chunked"]))  # fmt: skip
        body = chunked(body)
    for _ in range(rng.randrange(4)):
        fields.append(pick([b"Content-Type: application/json", b"Retry-After: 5", b"Connection: close",
            b"Connection: keep-alive", b"X-Long: " + b"a" * rng.randrange(100), b"X-Fold: a\r\n b",
            b"X-Fold: a\r\n\tContent-Length: 3", b"X-Obs: caf\xe9", b"Content-Type: text/html",
            b"Content-Type: a\r\n  b", b"Retry-After: 1, 2", b"X-Empty:", b"X-Tab:\tv\t", b"Location: /x",
            b"Content-Type: a\r\n "], [b"Content-Length : 3", b"Bad Name: x", b": empty", b"no colon",
            b"X-CR: a\rb", b"X-NUL: a\x00b", b"Transfer-Encoding: chunked", b"Content-Length: 0"]))  # fmt: skip
    rng.shuffle(fields)
    fields.insert(0, pick([b"Date: today"], [b" leading: whitespace"]))
    head = prefix + version + b" " + code + reason + eol() + b"".join(f + eol() for f in fields) + eol()
    answer = head + body + pick([b""], [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nX", b"junk"])
    return answer[: rng.randrange(len(answer) + 1)] if odd_mode and rng.random() < 0.1 else answer


class _FakeSocket:
    def __init__(self, reader):
        self.reader = reader

    def makefile(self, *args, **kwargs):
        return self.reader


#: Headers whose values the client uses; compared with runs of whitespace collapsed.
DIFFERENTIAL_HEADERS = ("content-type", "retry-after", "location")


def read_with_http_client(reader) -> tuple | None:
    """(status, headers that matter, body) as http.client reads the answer, None if it refuses it."""
    responses = []  # kept: a dropped HTTPResponse closes the shared reader
    try:
        for _ in range(20):  # http.client skips only 100 itself; others are skipped here, as the RFC asks
            responses.append(http.client.HTTPResponse(_FakeSocket(reader), method="GET"))
            responses[-1].begin()
            if not 102 <= responses[-1].status < 200:
                break
        status, msg, body = responses[-1].status, responses[-1].msg, responses[-1].read()
    except Exception:  # refused; not only HTTPException: a huge length raises OverflowError or MemoryError
        return None
    finally:
        for response in responses:
            response.fp = None  # closing one must not close the reader under the others
    values = {k: ", ".join(v.strip() for v in msg.get_all(k)) for k in DIFFERENTIAL_HEADERS if k in msg}
    return status, {k: " ".join(v.split()) for k, v in values.items()}, body


def read_with_ours(reader) -> tuple | None:
    try:
        response, body = ph._read_response(reader, "GET")
    except (ValueError, OSError, ph._TooLarge):
        return None
    headers = {k: " ".join(response.headers[k].split()) for k in DIFFERENTIAL_HEADERS if k in response.headers}
    return response.status, headers, body


def deliberate_difference(answer: bytes, ours: tuple) -> str | None:
    """Why our reading of an answer may differ from http.client's, on purpose:
    each is RFC 9110/9112 against an http.client leniency. Nothing else may differ."""
    if ours[0] in (204, 304) and re.search(rb"\ntransfer-encoding:", answer, re.I):
        return "a 204/304 has no body whatever its headers say (RFC 9112 §6.3); http.client reads a chunked one"
    if re.search(rb"\ncontent-length: *([0-9]+) *, *\1 *\r?\n", answer, re.I):
        return "one Content-Length line listing one value twice: that value (RFC 9110 §8.6); http.client: no length"
    if re.search(rb"\ntransfer-encoding:[ \t]*chunked[ \t]+\r?\n", answer, re.I):
        return "'chunked ' with trailing whitespace is chunked (RFC 9110 §5.5); http.client compares the raw value"
    return None


class DifferentialTests(unittest.TestCase):
    """Seeded answers, valid and malformed, read by ours and by http.client: where
    ours accepts, status, the headers that matter and the body are http.client's,
    or the case is a deliberate difference. Replay: DIFFERENTIAL_SEED=<seed>."""

    CASES = 10_000

    def setUp(self):
        self.seed = int(os.environ.get("DIFFERENTIAL_SEED") or random.randrange(2**32))

    def test_our_reader_agrees_with_http_client(self):
        seed = self.seed
        rng = random.Random(seed)
        accepted = 0
        for case in range(self.CASES):
            answer = generate_answer(rng)
            where = f"DIFFERENTIAL_SEED={seed}, case {case}: {answer!r}"
            try:
                ours = read_with_ours(io.BufferedReader(io.BytesIO(answer)))
                theirs = ours and read_with_http_client(io.BufferedReader(io.BytesIO(answer)))
            except Exception as exc:  # ours raised something but our errors
                raise AssertionError(where) from exc
            if ours is None:
                continue
            accepted += 1
            if ours != theirs and not deliberate_difference(answer, ours):
                self.fail(f"{where}\nours:   {ours!r}\ntheirs: {theirs!r}")
        self.assertGreater(accepted, self.CASES // 10, f"DIFFERENTIAL_SEED={seed}")

    def test_over_real_sockets_a_call_sees_what_the_reader_sees(self):
        rng = random.Random(self.seed)
        wanted = {True: 8, False: 4}  # answers our reader accepts, and refuses
        while any(wanted.values()):
            answer = generate_answer(rng)
            ours = read_with_ours(io.BufferedReader(io.BytesIO(answer)))
            if not wanted[ours is not None]:
                continue
            wanted[ours is not None] -= 1
            server = FaultServer([("truncate", answer)])  # sent, then the connection closes
            self.addCleanup(server.close)
            client, _ = make_client(server.url, max_retries=0)
            self.addCleanup(client.close)
            self.assertEqual(call_outcome(client), expected_outcome(ours), f"DIFFERENTIAL_SEED={self.seed}: {answer!r}")


def expected_outcome(ours: tuple | None):
    """What a call makes of an answer our reader read as ``ours``."""
    if ours is None:
        return "refused"
    status, _, body = ours
    try:
        data = json.loads(body.decode()) if 200 <= status < 300 else None
    except ValueError:
        data = None
    return data if isinstance(data, dict) else status


def call_outcome(client: PrefactorHttpClient):
    try:
        return client.request("GET", "/x")
    except (ph.PrefactorApiError, ph.PrefactorResponseContractError) as error:
        return "refused" if "refused" in str(error) else error.status_code
    except ph.PrefactorConnectionError:
        return "refused"
