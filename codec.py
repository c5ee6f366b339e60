"""Encrypt every payload the dunning workflows carry, and serve a codec for the Temporal Web UI.

Why: Temporal stores workflow inputs, results, signals, activity arguments and failure messages in
its event histories as plaintext JSON. Contact details never go there (runs carry the customer's
id), but amounts owed, invoice data, payment details and operators' free text do, so anyone who
can read the Temporal database, its backups or the Web UI could read them. With
``DUNNING_PAYLOAD_KEYS`` set, the worker and the client encrypt each payload with AES-256-GCM
before it leaves the process; the server only ever holds ciphertext. Failure messages and stack
traces are moved into an encoded attribute so they are encrypted as well (they often quote the
data that caused them).

Keys: ``DUNNING_PAYLOAD_KEYS=keyid:base64key,oldid:base64key``. The first key encrypts, every key
decrypts, so a key is rotated by putting a new one first and keeping the old ones until no open
history still references them. Each encrypted payload names its key id (authenticated as
associated data, so it cannot be relabelled). Payloads recorded before encryption was turned on
have no encryption metadata and still decode unchanged. Make a key with
``python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"``.

The Web UI cannot decrypt by itself: it sends payloads to a codec server (this module's
``codec_app``/``serve``), which speaks Temporal's remote codec protocol (``POST /decode`` and
``POST /encode`` with ``{"payloads": [...]}``). The browser calls it directly, so it needs CORS for
the UI's origin and sits on loopback, or, with a bearer token, behind an https proxy that checks the
UI's login (the UI's "pass access token" sends its login's own token, to https endpoints only, so
it cannot carry ours). Point the UI at it with ``temporal server start-dev --ui-codec-endpoint
http://127.0.0.1:PORT`` or, in a running UI, under "Data Encoder"; the ``temporal`` CLI sends the
token with ``--codec-auth "Bearer <token>"``.

Keys and tokens are never logged nor put in error messages; errors name key ids only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import os
import re
import threading
from collections.abc import Sequence
from typing import ClassVar

import uvicorn
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_SIZE = 12  # the size AES-GCM is designed for; random per payload
KEY_SIZE = 32  # AES-256
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """Parse ``keyid:base64key,...`` into ``[(key_id, key), ...]``, the encrypting key first.

    Errors name the item by position and key id only: they end up in logs and terminals, and a key
    pasted in the wrong place must not be echoed there.
    """
    keys: list[tuple[str, bytes]] = []
    items = text.split(",")
    for position, raw in enumerate(items, start=1):
        item = raw.strip()
        where = f"DUNNING_PAYLOAD_KEYS item {position}"
        if not item:
            raise ValueError(f"{where} is empty (expected keyid:base64key, items separated by commas)")
        key_id, colon, encoded = (part.strip() for part in item.partition(":"))
        if not colon:
            raise ValueError(f"{where}: expected keyid:base64key")
        if not _KEY_ID.fullmatch(key_id):
            # The bad id is not echoed: it may well be key material typed in the wrong order.
            raise ValueError(f"{where}: key id must be 1-32 characters of A-Z a-z 0-9 . _ -")
        where = f"{where} ({key_id!r})"
        if any(key_id == seen for seen, _ in keys):
            raise ValueError(f"{where}: duplicate key id")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: key is not valid standard base64") from None
        if len(key) != KEY_SIZE:
            raise ValueError(f"{where}: key must be {KEY_SIZE} bytes of base64 (AES-256), got {len(key)}")
        keys.append((key_id, key))
    return keys


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole serialized payloads; the first key encrypts, all keys decrypt.

    The whole ``Payload`` (metadata included) is encrypted, so the original encoding and any
    message type name are hidden too. The key id is the GCM associated data: moving a ciphertext
    under another key id fails authentication instead of decrypting to garbage.
    """

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("EncryptionCodec needs at least one key")
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if len(key) != KEY_SIZE:
                raise ValueError(f"key {key_id!r} must be {KEY_SIZE} bytes, got {len(key)}")
            if key_id in self._ciphers:
                raise ValueError(f"duplicate key id {key_id!r}")
            self._ciphers[key_id] = AESGCM(key)
        self._encrypting_id = keys[0][0]

    @property
    def key_ids(self) -> list[str]:
        """The configured key ids, encrypting key first (safe to show: ids are not secrets)."""
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload with the first key and a fresh random nonce."""
        key_id = self._encrypting_id.encode()
        cipher = self._ciphers[self._encrypting_id]
        encoded: list[Payload] = []
        for payload in payloads:
            nonce = os.urandom(NONCE_SIZE)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), key_id)
            encoded.append(
                Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id}, data=nonce + sealed)
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt encrypted payloads; pass others through so pre-encryption histories still read."""
        decoded: list[Payload] = []
        for payload in payloads:
            if payload.metadata.get("encoding") != ENCODING:
                plain = Payload()
                plain.CopyFrom(payload)
                decoded.append(plain)
                continue
            raw_id = payload.metadata.get(KEY_ID_METADATA, b"")
            key_id = raw_id.decode("utf-8", "replace")
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise PayloadUnreadable(
                    f"payload was encrypted with key id {key_id!r}, which is not in DUNNING_PAYLOAD_KEYS "
                    f"(configured: {', '.join(self._ciphers)})"
                )
            nonce, sealed = payload.data[:NONCE_SIZE], payload.data[NONCE_SIZE:]
            try:
                if len(nonce) != NONCE_SIZE:
                    raise InvalidTag
                plaintext = cipher.decrypt(nonce, sealed, raw_id)
            except InvalidTag:
                raise PayloadUnreadable(
                    f"payload encrypted with key id {key_id!r} failed authentication "
                    "(wrong key for that id, or the data was altered)"
                ) from None
            decoded.append(Payload.FromString(plaintext))
        return decoded


class PayloadUnreadable(ValueError):
    """An encrypted payload this process cannot read: its key is not in DUNNING_PAYLOAD_KEYS, or
    the key under that id is not the one it was encrypted with. A setting to fix, not bad input."""


class SharedPydanticConverter(PydanticPayloadConverter):
    """The SDK's pydantic payload converter, built once per process.

    A ``DataConverter`` builds a new payload converter from its class whenever one is made, and
    the worker makes several per workflow activation and one per run, each with an empty cache
    of pydantic type adapters: measured, about a tenth of the worker's CPU per activation went to
    building converters and adapters that were used once. This class hands out one instance (its
    adapter cache is thread-safe), so the JSON written and read is exactly the same.
    """

    _instance: ClassVar[SharedPydanticConverter | None] = None

    def __new__(cls) -> SharedPydanticConverter:
        if cls._instance is None:
            instance = super().__new__(cls)
            PydanticPayloadConverter.__init__(instance)
            cls._instance = instance
        return cls._instance

    def __init__(self) -> None:  # built once, in __new__
        pass


PLAIN = dataclasses.replace(pydantic_data_converter, payload_converter_class=SharedPydanticConverter)


def data_converter(keys: str | None) -> DataConverter:
    """The project's data converter: pydantic JSON, encrypted when ``keys`` is set.

    Without keys this writes exactly what ``pydantic_data_converter`` writes, so nothing changes
    for deployments that have not opted in. With keys, failure messages and stack traces are
    encoded as well: an exception text like "customer +1415... refused" would otherwise stay
    readable.
    """
    if not keys or not keys.strip():
        return PLAIN
    return dataclasses.replace(
        PLAIN,
        payload_codec=EncryptionCodec(parse_keys(keys)),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def codec_app(codec: PayloadCodec, *, token: str | None, origins: list[str]) -> FastAPI:
    """A Temporal remote codec server (``POST /encode``, ``POST /decode``) for the Web UI.

    ``origins`` are the Web UI origins allowed to call it from the browser (CORS). With a
    ``token``, /encode and /decode require ``Authorization: Bearer <token>``: without one, anyone
    who can reach the port can decrypt. CORS preflights and ``GET /health`` need no token
    (browsers never send credentials on a preflight). ``X-Namespace`` is accepted but ignored:
    one key set serves every namespace.
    """
    app = FastAPI(title="dunning payload codec", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["POST"],
        allow_headers=["Content-Type", "Authorization", "X-Namespace"],
        # Lets the UI's "include cross-origin credentials" option work; the token is a header,
        # not a cookie, so this grants nothing a foreign page could use.
        allow_credentials=True,
    )
    expected = f"Bearer {token}".encode() if token else None

    def require_token(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def read_payloads(request: Request) -> Payloads:
        body = await request.body()
        try:
            return json_format.Parse(body, Payloads())
        except (json_format.ParseError, ValueError, TypeError) as exc:
            reason = (str(exc).splitlines() or [""])[0][:200]
            raise HTTPException(400, f"body is not Temporal Payloads JSON: {reason}") from None

    def answer(payloads: Sequence[Payload]) -> JSONResponse:
        return JSONResponse({"payloads": [json_format.MessageToDict(p) for p in payloads]})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/encode", dependencies=[Depends(require_token)])
    async def encode(request: Request) -> JSONResponse:
        return answer(await codec.encode((await read_payloads(request)).payloads))

    @app.post("/decode", dependencies=[Depends(require_token)])
    async def decode(request: Request) -> JSONResponse:
        payloads = await read_payloads(request)
        try:
            return answer(await codec.decode(payloads.payloads))
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    return app


def serve(codec: PayloadCodec, *, host: str, port: int, token: str | None, origins: list[str]) -> None:
    """Run the codec server until SIGTERM or SIGINT (blocking).

    uvicorn installs its own SIGTERM/SIGINT handlers and shuts down gracefully, but only when it
    runs in the main thread; elsewhere it would silently ignore them, so that is refused here.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() must run in the main thread so that SIGTERM/SIGINT stop it")
    app = codec_app(codec, token=token, origins=origins)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
