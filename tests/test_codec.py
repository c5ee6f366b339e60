"""Payload encryption and the Web UI codec server: what a user or an attacker would notice.

Every test that claims "the secret is hidden" also checks the secret is visible without the codec,
so the assertion cannot pass vacuously.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.failure.v1 import Failure
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import SerializationContext, WithSerializationContext
from temporalio.exceptions import ApplicationError
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from codec import EncryptionCodec, SharedPydanticConverter, codec_app, data_converter, parse_keys, serve
from models.invoice import Invoice
from runner import ContextFreeRunner
from tests.conftest import ROOT, sample_invoice
from worker import sandbox_runner

PHONE = "+14155550100"
NAME = "Ada Lovelace"
K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(100, 132))).decode()
K9 = base64.b64encode(b"\x09" * 32).decode()
SHORT = base64.b64encode(b"s" * 16).decode()
TOKEN = "codec-test-token-5f1c"
UI = "http://localhost:8233"


def plain_bytes(payloads: list[Payload]) -> bytes:
    return b"".join(p.SerializeToString() for p in payloads)


async def test_round_trip_hides_personal_data() -> None:
    converter = data_converter(f"k1:{K1}")
    invoice = Invoice.model_validate(sample_invoice())
    note = {"note": f"call {PHONE}", "amount": "1250.00"}
    assert NAME.encode() in plain_bytes(await pydantic_data_converter.encode([invoice]))

    payloads = await converter.encode([invoice, note])

    assert len(payloads) == 2
    for payload in payloads:
        raw = payload.SerializeToString()
        assert NAME.encode() not in raw and PHONE.encode() not in raw and b"json/plain" not in raw
        assert dict(payload.metadata) == {"encoding": b"binary/encrypted", "encryption-key-id": b"k1"}
    assert payloads[0].data[:12] != payloads[1].data[:12], "every payload gets its own nonce"
    assert await converter.decode(payloads, [Invoice, dict]) == [invoice, note]


async def test_without_keys_nothing_changes() -> None:
    assert data_converter(None) is data_converter("")
    assert data_converter(None).payload_codec is None
    assert data_converter(f"k1:{K1}").payload_codec is not None
    invoice = Invoice.model_validate(sample_invoice())
    written = await data_converter(None).encode([invoice])
    assert written == await pydantic_data_converter.encode([invoice])  # the same JSON as the SDK's
    assert await data_converter(None).decode(written, [Invoice]) == [invoice]


def test_the_payload_converter_is_built_once() -> None:
    """Each converter the worker makes per activation reuses one payload converter (and its
    cache of pydantic type adapters) instead of building a new one."""
    for keys in (None, f"k1:{K1}"):
        assert data_converter(keys).payload_converter_class is SharedPydanticConverter
    assert SharedPydanticConverter() is SharedPydanticConverter()


async def test_key_rotation_old_data_still_reads_new_data_uses_first_key() -> None:
    old = await data_converter(f"k1:{K1}").encode([{"customer": NAME}])
    rotated = data_converter(f"k2:{K2}, k1:{K1}")

    assert await rotated.decode(old, [dict]) == [{"customer": NAME}]
    fresh = await rotated.encode([{"customer": NAME}])
    assert fresh[0].metadata["encryption-key-id"] == b"k2"
    with pytest.raises(ValueError, match="'k2'"):
        await data_converter(f"k1:{K1}").decode(fresh, [dict])


async def test_wrong_key_names_the_key_id_not_the_data() -> None:
    encoded = await data_converter(f"k1:{K1}").encode([{"customer": NAME}])

    with pytest.raises(ValueError, match="key id 'k1'") as unknown:
        await data_converter(f"k2:{K2}").decode(encoded, [dict])
    with pytest.raises(ValueError, match=r"key id 'k1' failed authentication") as wrong_material:
        await data_converter(f"k1:{K2}").decode(encoded, [dict])
    for error in (unknown, wrong_material):
        message = str(error.value)
        assert NAME not in message and K1 not in message and K2 not in message


async def test_tampered_or_relabelled_payload_is_rejected() -> None:
    # the same key material under two ids: only the key id as associated data tells them apart
    converter = data_converter(f"k1:{K1},k2:{K1}")
    [payload] = await converter.encode([{"amount": "1250.00"}])

    tampered = Payload()
    tampered.CopyFrom(payload)
    tampered.data = payload.data[:-1] + bytes([payload.data[-1] ^ 1])
    with pytest.raises(ValueError, match="failed authentication"):
        await converter.decode([tampered], [dict])

    relabelled = Payload()
    relabelled.CopyFrom(payload)
    relabelled.metadata["encryption-key-id"] = b"k2"
    with pytest.raises(ValueError, match="'k2' failed authentication"):
        await converter.decode([relabelled], [dict])

    truncated = Payload()
    truncated.CopyFrom(payload)
    truncated.data = payload.data[:5]
    with pytest.raises(ValueError, match="failed authentication"):
        await converter.decode([truncated], [dict])


async def test_plaintext_payloads_from_before_encryption_still_decode() -> None:
    invoice = Invoice.model_validate(sample_invoice())
    recorded = await pydantic_data_converter.encode([invoice, None])

    codec = data_converter(f"k1:{K1}").payload_codec
    assert codec is not None
    assert await codec.decode(recorded) == recorded
    assert await data_converter(f"k1:{K1}").decode(recorded, [Invoice, type(None)]) == [invoice, None]


def test_parse_keys_accepts_whitespace_and_keeps_order() -> None:
    assert parse_keys(f" k2 : {K2} ,\tk1:{K1}\n") == [
        ("k2", base64.b64decode(K2)),
        ("k1", base64.b64decode(K1)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"k1:{K1},k2:{SHORT}",
            "DUNNING_PAYLOAD_KEYS item 2 ('k2'): key must be 32 bytes of base64 (AES-256), got 16",
        ),
        (f"k1:{K1},k2:{K2[:-4]}!!!!", "item 2 ('k2'): key is not valid standard base64"),
        (f"k1:{K1},k1:{K2}", "item 2 ('k1'): duplicate key id"),
        (f"k1:{K1},,k2:{K2}", "item 2 is empty"),
        (f"k1:{K1},", "item 2 is empty"),
        ("", "item 1 is empty"),
        (f"k1:{K1},{K2}", "item 2: expected keyid:base64key"),
        (f"{K2}:k2", "item 1: key id must be 1-32 characters"),
        (f"bad id:{K1}", "item 1: key id must be 1-32 characters"),
    ],
)
def test_parse_keys_errors_name_the_item_never_the_key(text: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_keys(text)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    for secret in (K1, K2, K2[:-4], SHORT):
        assert secret not in str(error.value)


def _raise_and_capture() -> ApplicationError:
    try:
        raise ApplicationError(f"customer {PHONE} refused", {"phone": PHONE}, type="Refused")
    except ApplicationError as error:
        return error


async def test_failure_messages_and_stack_traces_are_encrypted() -> None:
    error = _raise_and_capture()
    plain = Failure()
    await pydantic_data_converter.encode_failure(error, plain)
    assert PHONE.encode() in plain.SerializeToString()

    converter = data_converter(f"k1:{K1}")
    failure = Failure()
    await converter.encode_failure(error, failure)

    assert PHONE.encode() not in failure.SerializeToString()
    assert (failure.message, failure.stack_trace) == ("Encoded failure", "")
    assert failure.encoded_attributes.metadata["encoding"] == b"binary/encrypted"
    assert failure.application_failure_info.type == "Refused"  # the type stays readable for retry policies
    restored = await converter.decode_failure(failure)
    assert isinstance(restored, ApplicationError)
    assert restored.message == f"customer {PHONE} refused"
    assert restored.details == ({"phone": PHONE},)
    assert restored.failure is not None
    assert "_raise_and_capture" in restored.failure.stack_trace  # decoding put the stack trace back


# --- the codec server over real HTTP ------------------------------------------------------------

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def http(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def post(base: str, path: str, body: Any, token: str | None = TOKEN, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    status, _, raw = http(base + path, "POST", data, sent)
    return status, json.loads(raw)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The codec app on a real socket; uvicorn runs in a thread and stops via should_exit."""
    app = codec_app(EncryptionCodec(parse_keys(f"k1:{K1}")), token=TOKEN,
                    origins=[UI, "http://127.0.0.1:8233"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "codec server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)
    sock.close()


def to_json(payloads: list[Payload]) -> dict[str, Any]:
    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


async def test_server_encode_then_decode_round_trip(server: str) -> None:
    original = pydantic_data_converter.payload_converter.to_payloads([{"customer": NAME, "phone": PHONE}])

    status, encoded = post(server, "/encode", to_json(original))
    assert status == 200
    assert NAME not in json.dumps(encoded) and PHONE not in json.dumps(encoded)
    [item] = encoded["payloads"]
    assert base64.b64decode(item["metadata"]["encoding"]) == b"binary/encrypted"
    # what the server encrypted, the worker (same keys) can read, and vice versa
    parsed = json_format.ParseDict(encoded, Payloads())
    worker_view = await data_converter(f"k1:{K1}").decode(parsed.payloads, [dict])
    assert worker_view == [{"customer": NAME, "phone": PHONE}]

    status, decoded = post(server, "/decode", encoded)
    assert status == 200
    assert decoded == to_json(original)

    status, passthrough = post(server, "/decode", to_json(original))
    assert (status, passthrough) == (200, to_json(original))


async def test_server_decode_with_unknown_key_is_400_naming_the_key_id(server: str) -> None:
    foreign = await EncryptionCodec(parse_keys(f"k9:{K9}")).encode([Payload(data=b'"x"')])
    status, body = post(server, "/decode", to_json(foreign))
    assert status == 400
    assert "'k9'" in body["detail"]


def test_server_requires_the_bearer_token(server: str) -> None:
    body = {"payloads": []}
    assert post(server, "/encode", body, token=None)[0] == 401
    assert post(server, "/decode", body, token=None)[0] == 401
    assert post(server, "/decode", body, token="wrong")[0] == 401
    assert post(server, "/decode", body, token=None, Authorization=TOKEN)[0] == 401  # no "Bearer "
    assert post(server, "/decode", body)[0] == 200
    status, _, health = http(server + "/health")
    assert (status, json.loads(health)) == (200, {"status": "ok"})


def test_server_rejects_malformed_bodies(server: str) -> None:
    malformed = (b"not json", b'{"payloads": "x"}', b'{"unknown": 1}', b'{"payloads": [{"data": 5}]}',
                 b"\xff")
    for body in malformed:
        status, answer = post(server, "/decode", body)
        assert status == 400, body
        assert answer["detail"].startswith("body is not Temporal Payloads JSON")
        assert len(answer["detail"]) < 300


def test_server_cors_allows_the_ui_origin_only(server: str) -> None:
    preflight = {
        "Origin": UI,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
    }
    status, headers, _ = http(server + "/decode", "OPTIONS", headers=preflight)  # no token
    assert status == 200
    assert headers["access-control-allow-origin"] == UI
    allowed = headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-namespace" in allowed and "content-type" in allowed
    assert "POST" in headers["access-control-allow-methods"]

    status, headers, _ = http(
        server + "/decode", "POST", b'{"payloads": []}',
        {"Origin": UI, "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert status == 200 and headers["access-control-allow-origin"] == UI

    evil = {**preflight, "Origin": "https://evil.example.com"}
    status, headers, _ = http(server + "/decode", "OPTIONS", headers=evil)
    assert status >= 400
    assert "access-control-allow-origin" not in headers


def test_serve_stops_cleanly_on_sigterm() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (
        "import codec;"
        f"codec.serve(codec.EncryptionCodec(codec.parse_keys('k1:{K1}')), host='127.0.0.1', port={port},"
        f" token=None, origins=[{UI!r}])"
    )
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost"}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.communicate()[1].decode()
            try:
                if http(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve() did not come up"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        # uvicorn shuts down, then re-raises SIGTERM with the default handler
        assert process.returncode in (0, -signal.SIGTERM)
        assert K1.encode() not in process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_to_run_where_signals_would_be_ignored() -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(EncryptionCodec(parse_keys(f"k1:{K1}")), host="127.0.0.1", port=0, token=None, origins=[])
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


class ContextReadingCodec(EncryptionCodec, WithSerializationContext):
    """A codec that, say, keys by workflow id: it needs each payload's serialization context."""

    def with_context(self, context: SerializationContext) -> ContextReadingCodec:
        return ContextReadingCodec(parse_keys(f"k1:{K1}"))


def test_runner_skips_the_sandbox_round_trip_only_for_converters_that_ignore_context() -> None:
    encrypted = data_converter(f"k1:{K1}")
    assert isinstance(sandbox_runner(converter=pydantic_data_converter), ContextFreeRunner)
    assert isinstance(sandbox_runner(converter=encrypted), ContextFreeRunner)
    reading = dataclasses.replace(encrypted, payload_codec=ContextReadingCodec(parse_keys(f"k1:{K1}")))
    assert not ContextFreeRunner.fits(reading)  # this one gets the sandbox's answer, per payload
    assert isinstance(sandbox_runner(converter=reading), SandboxedWorkflowRunner)
    assert isinstance(sandbox_runner(), SandboxedWorkflowRunner)
