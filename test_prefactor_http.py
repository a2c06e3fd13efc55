"""Tests for prefactor_http: real servers on 127.0.0.1, real sockets, no mocks.

Two tiers of server: ``LocalApiServer`` (the stateful stand-in shipped in the
module) for behaviour, and ``FaultServer`` below, a raw-socket server that plays a
script of actions per connection to inject faults. ``sleep`` and ``random`` are
injected into clients so backoff is asserted exactly and nothing waits.

Run: ``python -m unittest -v`` (nothing to install) or ``pytest``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import unittest
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


class FaultServer:
    """Connection n plays ``scripts[n]`` (the last script repeats). Actions:
    ``("reply", bytes)`` read a request, send bytes; ``("drop_before",)`` close on
    accept; ``("drop_after",)`` read, close; ``("stall",)`` read, never answer;
    ``("trickle", bytes)`` read, send a byte every 50 ms; ``("close",)`` close an
    idle kept-alive connection and set ``idle_closed``."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.requests: list = []
        self.connections = 0
        self.idle_closed = threading.Event()
        self.stopping = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            script = self.scripts[min(self.connections, len(self.scripts) - 1)]
            self.connections += 1
            threading.Thread(target=self._play, args=(conn, script), daemon=True).start()

    def _play(self, conn, script):
        with conn:
            for action in script:
                kind = action[0]
                if kind == "drop_before":
                    return
                if kind == "close":
                    conn.shutdown(socket.SHUT_RDWR)
                    self.idle_closed.set()
                    return
                request = read_request(conn)
                if request is None:
                    return
                self.requests.append(request)
                if kind == "reply":
                    conn.sendall(action[1])
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
        self.sock.close()


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
