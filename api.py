"""The HTTP API (``dunning api``): what ``DunningClient`` offers, over HTTP with bearer keys.

    POST /v1/invoices                                start one invoice or a list
    GET  /v1/invoices?state=&customer_id=            a page of runs (Temporal visibility)
    GET  /v1/invoices/{id}                           the run's status
    GET  /v1/invoices/{id}/events                    its audit trail
    POST /v1/invoices/{id}/payments                  a payment: its outcome and the balance after
    POST /v1/invoices/{id}/actions/{action}          pause, resume, dispute, resolve, promise, plan,
                                                     write-off, escalate, cancel
    POST /v1/invoices/{id}/reversals                 a payment taken back (a paid run reopens)
    PUT  /v1/customers/{id}                          contact details
    GET  /v1/webhooks?status=failed                  provider events that need an operator
    POST /v1/webhooks/{id}/retry                     process a failed one again
    GET  /healthz                                    Temporal and the database reachable
    POST /webhooks/...  GET|POST /unsubscribe/{token}   providers' webhooks (``webhooks.py``)

Keys come from ``DUNNING_API_KEYS`` (comma separated; ``name:key`` names the key for the audit
trail). Every POST honours an ``Idempotency-Key`` header: the first answer is stored and given
again to a retry with the same key and body; the same key with another body is refused. Errors
are ``{"detail": ...}`` naming the field or the reason: 401 no valid key, 404 unknown invoice, 409
a conflict with the run's state, 422 a malformed request, 503 Temporal or the database down; 202
when no worker answered an action in time (it is with the run and applies when one runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from codec import PayloadUnreadable
from inbox import Inbox
from models.database import OPERATIONAL_ERRORS, DatabaseError, database_error, prepare
from models.errors import reason
from models.records import ApiRequest, utcnow
from settings import Settings
from starter import (
    ActionRefused,
    DunningClient,
    DunningError,
    InvoiceRejected,
    PaymentRefused,
    Pending,
    RunClosed,
    RunNotFound,
    ServerUnavailable,
)

log = logging.getLogger(__name__)
IDEMPOTENCY_KEY_MAX = 200
LEASE = timedelta(seconds=120)  # an in-progress claim older than this belongs to a dead process
ACTIONS = ("pause", "resume", "dispute", "resolve", "promise", "plan", "write-off", "escalate", "cancel")


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def parse_keys(text: str) -> dict[str, str]:
    """``DUNNING_API_KEYS`` -> {key: name}. ``name:key`` names a key; a bare key is named by a
    short digest of itself (never the key: the name goes into the audit trail)."""
    keys: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, key = item.partition(":")
        if not sep:
            name, key = f"key-{hashlib.sha256(item.encode()).hexdigest()[:8]}", item
        if len(key) < 16:
            raise ValueError("DUNNING_API_KEYS: each key needs at least 16 characters")
        keys[key] = name
    if not keys:
        raise ValueError("DUNNING_API_KEYS: set at least one bearer key (comma separated)")
    return keys


class Idempotency:
    """Stored answers of POSTs that carried an ``Idempotency-Key`` (table ``api_requests``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def run(self, scope: str, key: str | None, request: Request,
                  handler: Callable[[], Awaitable[JSONResponse]]) -> JSONResponse:
        if key is None:
            return await handler()
        if not key.strip() or len(key) > IDEMPOTENCY_KEY_MAX:
            raise ApiError(422, f"Idempotency-Key: 1 to {IDEMPOTENCY_KEY_MAX} characters")
        body = await request.body()
        fingerprint = hashlib.sha256(b"\0".join([request.method.encode(), request.url.path.encode(),
                                                 body])).hexdigest()
        earlier = await asyncio.to_thread(self._claim, scope, key, fingerprint)
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise ApiError(422, "Idempotency-Key: already used for a different request")
            if earlier.status_code is None:
                raise ApiError(409, "Idempotency-Key: the first request with this key is still running")
            return JSONResponse(json.loads(earlier.response or "null"), status_code=earlier.status_code,
                                headers={"Idempotent-Replayed": "true"})
        try:
            response = await handler()
        except ApiError as exc:
            if exc.status >= 500:
                await asyncio.to_thread(self._release, scope, key)
                raise
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status)
        except BaseException:
            await asyncio.to_thread(self._release, scope, key)  # nothing was answered: may retry
            raise
        if b'"status":5' in bytes(response.body):  # a list with rows Temporal could not take
            await asyncio.to_thread(self._release, scope, key)  # a retry does them again
            return response
        try:
            await asyncio.to_thread(self._keep, scope, key, response)
        except Exception:
            # Not kept: a retry runs again (actions carry the key into Temporal as the update id,
            # starts and payments are idempotent themselves), which beats a key stuck forever.
            await asyncio.to_thread(self._release, scope, key)
            raise
        return response

    def _claim(self, scope: str, key: str, fingerprint: str) -> ApiRequest | None:
        """Claim the key (None), or return the request that already holds it. A claim left in
        progress longer than ``LEASE`` (its process died) is taken over."""
        with Session(self.engine) as db:
            db.add(ApiRequest(scope=scope, key=key, fingerprint=fingerprint))
            try:
                db.commit()
                return None
            except IntegrityError:
                db.rollback()
        with Session(self.engine) as db:
            row = db.exec(select(ApiRequest).where(ApiRequest.scope == scope, ApiRequest.key == key)).one()
            stale = row.created_at < utcnow() - LEASE
            if row.status_code is None and stale and row.fingerprint == fingerprint:
                row.created_at = utcnow()
                db.add(row)
                db.commit()
                return None
            return row

    def _keep(self, scope: str, key: str, response: JSONResponse) -> None:
        with Session(self.engine) as db:
            row = db.get(ApiRequest, (scope, key))
            if row is not None:
                row.status_code, row.response = response.status_code, bytes(response.body).decode()
                db.add(row)
                db.commit()

    def _release(self, scope: str, key: str) -> None:
        with Session(self.engine) as db:
            row = db.get(ApiRequest, (scope, key))
            if row is not None and row.status_code is None:
                db.delete(row)
                db.commit()


def _http_error(exc: Exception) -> ApiError:
    """The product's errors as HTTP answers."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RunNotFound):
        return ApiError(404, str(exc))
    if isinstance(exc, ActionRefused):
        return ApiError(409 if exc.conflict else 422, str(exc))
    if isinstance(exc, RunClosed):
        return ApiError(409, str(exc))
    if isinstance(exc, Pending):  # accepted by the run, applied when a worker runs
        return ApiError(202, str(exc))
    if isinstance(exc, ServerUnavailable | DatabaseError):
        return ApiError(503, str(exc))
    if isinstance(exc, OPERATIONAL_ERRORS):  # gone since the API started, or busy: try again
        return ApiError(503, str(database_error(exc)))
    if isinstance(exc, PayloadUnreadable):  # a payload key missing from this server's settings
        return ApiError(500, str(exc))
    if isinstance(exc, InvoiceRejected | PaymentRefused | DunningError):
        return ApiError(422, str(exc))
    raise exc


def _json(value: Any) -> Any:
    """Dataclasses and pydantic models as JSON-ready values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_json(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _json(v) for k, v in asdict(value).items()}
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def create_app(settings: Settings, dunning: DunningClient | None = None) -> FastAPI:
    """The API app. Without ``dunning`` it connects to Temporal when it starts (uvicorn's loop)."""
    keys = parse_keys(settings.api_keys.get_secret_value() if settings.api_keys else "")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # The database first, Temporal when it answers: the webhooks only need the inbox, and a
        # provider that gets no answer may never send again (Twilio does not retry an inbound
        # SMS), so the API serves them while Temporal is away and processes them once it is back.
        engine = dunning.ledger.engine if dunning else prepare(settings.database())
        state["engine"] = engine
        state["idempotency"] = Idempotency(engine)
        state["inbox"] = Inbox(engine)
        connecting = asyncio.create_task(connect_and_drain())
        try:
            yield
        finally:
            connecting.cancel()

    async def connect_and_drain() -> None:
        from webhooks import Processor, drain_forever

        wait = 1.0
        while "dunning" not in state:
            try:
                state["dunning"] = dunning or await DunningClient.connect(settings)
            except ServerUnavailable as exc:
                log.warning("%s; webhooks are stored and wait for it (trying again in %.0f s)", exc, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 30.0)
        state["processor"] = Processor(state["dunning"], state["inbox"])
        await drain_forever(state["processor"])

    app = FastAPI(title="Dunning API", version="1", lifespan=lifespan,
                  description="Start, inspect and act on dunning runs. Bearer keys: DUNNING_API_KEYS.")
    bearer = HTTPBearer(auto_error=False)
    from webhooks import routes as webhook_routes

    app.include_router(webhook_routes(settings, state))

    @app.exception_handler(RequestValidationError)
    async def _malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [p for p in first.get("loc", ()) if p not in ("query", "path", "body")] or ["request"]
        return JSONResponse({"detail": reason(where, first.get("msg", "malformed"))}, status_code=422)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    for kind in (*OPERATIONAL_ERRORS, PayloadUnreadable):
        # raised outside an answer (the idempotency record, the webhook inbox): the same words
        @app.exception_handler(kind)
        async def _server_side(request: Request, exc: Exception) -> JSONResponse:
            return await _api_error(request, _http_error(exc))

    def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The key's name, or 401."""
        given = credentials.credentials if credentials else ""
        for key, name in keys.items():
            if hmac.compare_digest(given.encode(), key.encode()):
                return name
        raise ApiError(401, "a valid bearer key is required (Authorization: Bearer <key>)")

    async def answer(work: Callable[[], Awaitable[Any]], status: int = 200) -> JSONResponse:
        try:
            result = await work()
        except Exception as exc:  # the product's errors become HTTP answers; others propagate
            raise _http_error(exc) from None
        return JSONResponse(_json(result), status_code=status)

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(422, "body: not valid JSON") from None

    async def once(request: Request, name: str,
                   handler: Callable[[], Awaitable[JSONResponse]]) -> JSONResponse:
        idempotency: Idempotency = state["idempotency"]
        return await idempotency.run(name, request.headers.get("Idempotency-Key"), request, handler)

    def client() -> DunningClient:
        if "dunning" not in state:
            raise ApiError(503, f"cannot reach the Temporal server at {settings.temporal_address} yet "
                                "(provider webhooks are still taken and kept)")
        return state["dunning"]

    @app.post("/v1/invoices", summary="Start dunning one invoice, or a list")
    async def start(request: Request, name: str = Depends(caller)) -> JSONResponse:
        async def handle() -> JSONResponse:
            body = await body_of(request)
            if isinstance(body, list):
                rows = [await _start_row(client(), index, item) for index, item in enumerate(body)]
                return JSONResponse({"results": rows}, status_code=200)
            if not isinstance(body, dict):
                raise ApiError(422, "body: an invoice object or a list of them")
            row = await _start_row(client(), None, body)
            if row["status"] >= 400:
                raise ApiError(row["status"], row["detail"])
            return JSONResponse(row, status_code=row["status"])
        return await once(request, name, handle)

    @app.get("/v1/invoices", summary="A page of runs, filtered by state and customer")
    async def list_runs(state: str | None = None, customer_id: str | None = None, page_size: int = 50,
                        page_token: str | None = None, _name: str = Depends(caller)) -> JSONResponse:
        async def work() -> Any:
            runs, following = await client().list_runs(state=state, customer_id=customer_id,
                                                       page_size=page_size, page_token=page_token)
            return {"runs": _json(runs), "next_page_token": following}
        return await answer(work)

    @app.get("/v1/invoices/{invoice_id}", summary="The run's status")
    async def status(invoice_id: str, _name: str = Depends(caller)) -> JSONResponse:
        return await answer(lambda: client().status(invoice_id))

    @app.get("/v1/invoices/{invoice_id}/events", summary="The run's audit trail")
    async def events(invoice_id: str, _name: str = Depends(caller)) -> JSONResponse:
        async def work() -> Any:
            trail = await asyncio.to_thread(client().log, invoice_id)
            if not trail:
                raise RunNotFound(f"no dunning run for invoice {invoice_id}")
            return [{"at": e.at.isoformat(), "kind": e.kind, "status": e.status, "step": e.step,
                     "channel": e.channel, "detail": e.detail} for e in trail]
        return await answer(work)

    @app.get("/v1/webhooks", summary="Provider webhook events: failed ones (what needs an operator) "
                                     "by default, or ?status=pending|done|ignored|all")
    async def webhook_events(status: str = "failed", _name: str = Depends(caller)) -> JSONResponse:
        inbox: Inbox = state["inbox"]
        try:
            events = await asyncio.to_thread(inbox.listed, status)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        return JSONResponse([Inbox.summary(e) for e in events])

    @app.post("/v1/webhooks/{event_id}/retry", summary="Process a failed webhook event again")
    async def webhook_retry(event_id: int, _name: str = Depends(caller)) -> JSONResponse:
        inbox: Inbox = state["inbox"]
        if not await asyncio.to_thread(inbox.requeue, event_id):
            raise ApiError(404, f"no failed webhook event {event_id}")
        processor = state.get("processor")
        if processor is not None:
            asyncio.get_running_loop().create_task(processor.drain())
        return JSONResponse({"id": event_id, "status": "pending"})

    @app.post("/v1/invoices/{invoice_id}/payments", summary="Record a payment")
    async def pay(invoice_id: str, request: Request, name: str = Depends(caller)) -> JSONResponse:
        async def handle() -> JSONResponse:
            body = await body_of(request)
            fields = _fields(body, required=("payment_id", "amount"),
                             allowed=("payment_id", "amount", "currency", "paid_at"),
                             texts=("payment_id", "currency"))
            paid_at = None
            if fields.get("paid_at") is not None:
                from models.action import ActionInputError, parse_datetime
                try:
                    paid_at = parse_datetime(fields["paid_at"], "paid_at")
                except ActionInputError as exc:
                    raise ApiError(422, str(exc)) from None

            async def work() -> Any:
                result = await client().pay(invoice_id, _text_amount(fields["amount"]),
                                            currency=fields.get("currency"),
                                            payment_id=fields["payment_id"], paid_at=paid_at,
                                            actor=f"api:{name}")
                return {"outcome": result.outcome, "detail": result.detail,
                        "payment": _json(result.payment), "status": _json(result.status)}
            return await answer(work)
        return await once(request, name, handle)

    @app.post("/v1/invoices/{invoice_id}/actions/{action}",
              summary=f"Act on a run: {', '.join(ACTIONS)}; answers the status after it")
    async def act(invoice_id: str, action: str, request: Request,
                  name: str = Depends(caller)) -> JSONResponse:
        async def handle() -> JSONResponse:
            if action not in ACTIONS:
                raise ApiError(404, f"action: unknown action {action!r} (known: {', '.join(ACTIONS)})")
            body = await body_of(request)
            if not isinstance(body, dict):
                raise ApiError(422, "body: a JSON object of the action's fields")

            async def work() -> Any:
                if action == "cancel":
                    fields = _fields(body, required=("reason",), allowed=("reason",))
                    await client().cancel(invoice_id, str(fields["reason"]), actor=f"api:{name}")
                    return await client().status(invoice_id)
                return await client().act(invoice_id, action, body, actor=f"api:{name}",
                                          request_id=request.headers.get("Idempotency-Key"))
            return await answer(work)
        return await once(request, name, handle)

    @app.post("/v1/invoices/{invoice_id}/reversals",
              summary="A payment taken back (refund, lost chargeback); a paid run is reopened")
    async def reversal(invoice_id: str, request: Request, name: str = Depends(caller)) -> JSONResponse:
        async def handle() -> JSONResponse:
            fields = _fields(await body_of(request), required=("key", "amount"),
                             allowed=("key", "amount", "reason"))

            async def work() -> Any:
                return await client().reverse(invoice_id, _text_amount(fields["amount"]),
                                              key=str(fields["key"]), reason=str(fields.get("reason") or ""),
                                              actor=f"api:{name}")
            return await answer(work)
        return await once(request, name, handle)

    @app.put("/v1/customers/{customer_id}", summary="Store a customer's contact details")
    async def put_customer(customer_id: str, request: Request, _name: str = Depends(caller)) -> JSONResponse:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(422, "body: the customer's fields as a JSON object")
        if body.setdefault("id", customer_id) != customer_id:
            raise ApiError(422, "id: does not match the customer id in the path")

        async def work() -> Any:
            return await asyncio.to_thread(client().update_customer, body)
        return await answer(work)

    @app.post("/v1/customers/{customer_id}/holds", summary="Hold a customer: no contact, no handoff")
    async def hold(customer_id: str, request: Request, name: str = Depends(caller)) -> JSONResponse:
        async def handle() -> JSONResponse:
            fields = _fields(await body_of(request), required=("kind", "reason"), allowed=("kind", "reason"))

            async def work() -> Any:
                kinds = await client().hold_customer(customer_id, str(fields["kind"]), str(fields["reason"]),
                                                     actor=f"api:{name}")
                return {"customer_id": customer_id, "holds": kinds}
            return await answer(work)
        return await once(request, name, handle)

    @app.delete("/v1/customers/{customer_id}/holds/{kind}", summary="Release a customer's hold")
    async def release(customer_id: str, kind: str, name: str = Depends(caller)) -> JSONResponse:
        async def work() -> Any:
            kinds = await client().hold_customer(customer_id, kind, "", actor=f"api:{name}", release=True)
            return {"customer_id": customer_id, "holds": kinds}
        return await answer(work)

    @app.get("/healthz", summary="Temporal and the database reachable (no key needed)")
    async def healthz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            await client().client.workflow_service.get_system_info(
                _system_info_request(), timeout=_HEALTH_TIMEOUT)
            checks["temporal"] = "ok"
        except Exception as exc:  # reported, not raised: this is the health check
            checks["temporal"] = f"unreachable: {exc.__class__.__name__}"
        try:
            await asyncio.wait_for(asyncio.to_thread(_ping, state["engine"]),
                                   _HEALTH_TIMEOUT.total_seconds())
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {exc.__class__.__name__}"
        healthy = all(v == "ok" for v in checks.values())
        return JSONResponse(checks, status_code=200 if healthy else 503)

    return app


async def _start_row(dunning: DunningClient, index: int | None, item: Any) -> dict[str, Any]:
    """One invoice of a start request: 201 started, 200 already running, 422 naming the field."""
    where = f"[{index}]." if index is not None else ""
    if not isinstance(item, dict):
        return {"index": index, "status": 422, "detail": f"{where or 'body'}: an invoice object"}
    try:
        result = await dunning.start(item)
    except InvoiceRejected as exc:
        return {"index": index, "invoice_id": item.get("invoice_id"), "status": 422,
                "detail": f"{where}{exc}"}
    except ServerUnavailable as exc:
        if index is None:
            raise ApiError(503, str(exc)) from None
        return {"index": index, "invoice_id": item.get("invoice_id"), "status": 503, "detail": str(exc)}
    row = {"invoice_id": result.invoice_id, "workflow_id": result.workflow_id,
           "status": 201 if result.started else 200, "detail": result.detail}
    return row if index is None else {"index": index, **row}


def _fields(body: Any, *, required: tuple[str, ...], allowed: tuple[str, ...],
            texts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The body's fields: an object, with ``required`` present, nothing outside ``allowed``, and
    ``texts`` strings when given (422 naming the first field that is not)."""
    if not isinstance(body, dict):
        raise ApiError(422, "body: a JSON object")
    for name in required:
        if body.get(name) in (None, ""):
            raise ApiError(422, f"{name}: required")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(422, f"{unknown[0]}: not a field here (fields: {', '.join(allowed)})")
    for name in texts:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ApiError(422, f"{name}: a string")
    return body


def _text_amount(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ApiError(422, "amount: a decimal string such as '120.00'")
    return str(value)


_HEALTH_TIMEOUT = timedelta(seconds=5)


def _system_info_request() -> Any:
    from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

    return GetSystemInfoRequest()


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


class Background:
    """The API served from a thread of its own (the demo, the tests): uvicorn's loop and signal
    handling stay out of the caller's."""

    def __init__(self, settings: Settings, *, host: str, port: int) -> None:
        import uvicorn

        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port,
                                                     log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="dunning-api", daemon=True)

    async def __aenter__(self) -> Background:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        await asyncio.to_thread(self._thread.join, 10)


def serve(settings: Settings, *, host: str, port: int) -> None:
    """Run the API until SIGTERM or Ctrl-C (uvicorn shuts down gracefully)."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
