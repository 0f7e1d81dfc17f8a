"""The FastAPI front door: OpenAI-compatible routes, auth, limits, and errors that say what to do.

Every failure is a JSON body in OpenAI's error shape with a status a client can act on: 401 for a missing or
wrong bearer token and 413 for a body over ``max_request_bytes`` (both before the body is parsed), 422 for a bad
field or an unusable image or mask file (naming it), for settings the engine refuses or for a request over
the compute budget (in model calls, see ``budget``), 404 for an unknown model, 429 (or 503) with ``Retry-After``
when the generator's queue is full, 503 with ``Retry-After`` while no generator replica has loaded the model yet
(``startup_wait_s``), 504 when a request outlives ``request_timeout_s``, and 500 only for a fault of the server. A full queue never surfaces as a 500: Serve
raises ``BackPressureError`` in this replica's handle call, and it is turned into the 429 here rather than into
Serve's plain-text default. A body FastAPI cannot read (a broken multipart form, a form field over
``MAX_FORM_FIELD_BYTES``) is a 400, an unknown path a 404 and a wrong method a 405, in the same shape. An error
message quotes at most 80 characters of anything the client sent (see ``errors``).

No ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations at run time.
"""

import asyncio
import base64
import hmac
import json
import logging
import os
import secrets
import time
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from actors.generator import encode_image
from jobs.serve.budget import model_calls
from jobs.serve.config import ServeConfig
from jobs.serve.edit_images import ImageFieldError, read_edit
from jobs.serve.errors import QUOTE_CHARS, clip, clip_echoes, error_response, quote
from jobs.serve.openai_schema import (
    ErrorResponse,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from mgt.config import GenerationSettings
from mgt.editing import Edit
from mgt.sampling.sampler_config import SamplerConfig

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="maskray images API",
    description="OpenAI-compatible image generation with masked generative transformers (Meissonic, aMUSEd) and "
    "the samplers of arXiv 2411.10781. Send `Authorization: Bearer <key>` when the server has an API key.",
    version="1",
)
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 500, 503, 504)}
PUBLIC_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}  # no key needed
EDITS_PATH = "/v1/images/edits"  # its body carries image files: capped by max_edit_request_bytes
MAX_FORM_FIELD_BYTES = 64 * 1024  # a text field of the edits form (a prompt is at most 2000 characters)
ROUTES = "POST /v1/images/generations, POST /v1/images/edits, GET /v1/models (documented at /docs)"


@app.exception_handler(Exception)
async def _server_error(_: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises after answering, so the traceback still reaches the replica's log.
    return error_response(500, f"internal server error ({type(error).__name__}); the server log has the details",
                          "server_error", code="internal_error")


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (unknown path, wrong method, unreadable body) in OpenAI's shape."""
    path = clip(request.url.path)
    if error.status_code == 404:
        return error_response(404, f"no route {path}; this server answers {ROUTES}", "invalid_request_error",
                              code="not_found")
    if error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        return error_response(405, f"{request.method} is not allowed on {path}; use {allowed}",
                              "invalid_request_error", code="method_not_allowed", headers=error.headers)
    if error.status_code == 400:
        form = "multipart" in request.headers.get("content-type", "")
        advice = (f"send a multipart/form-data body with the image file and text fields of at most "
                  f"{MAX_FORM_FIELD_BYTES // 1024} KB each" if form else "send a JSON body")
        return error_response(400, f"the request body cannot be read ({clip(str(error.detail))}); {advice}",
                              "invalid_request_error", code="invalid_multipart" if form else "invalid_body")
    return error_response(error.status_code, clip(str(error.detail)), "invalid_request_error",
                          headers=error.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems, params = [], []
    for item in error.errors():
        path = [clip(str(part)) for part in item["loc"] if part != "body"]
        param = ".".join(path) or "body"
        params.append(param)
        given = item.get("input")
        # a validator may quote its input whole (the engine's sampler-spec errors do)
        message = clip_echoes(item["msg"], given if isinstance(given, str) else repr(given))
        got = f" (got {quote(given)})" if "input" in item and path else ""
        problems.append(f"{param}: {message}{got}")
    return error_response(422, "; ".join(problems), "invalid_request_error", params[0], "invalid_value")


def encode_png(image: np.ndarray) -> str:
    """Base64 of the lossless PNG of one ``(H, W, 3)`` uint8 image (deterministic: same pixels, same bytes)."""
    return base64.b64encode(encode_image(image, "png")).decode("ascii")


def _cause(error: Exception, body: ImageGenerationRequest) -> str:
    """The message of the exception a deployment raised (Ray wraps it in one holding the remote traceback),
    quoting at most ``QUOTE_CHARS`` characters of the request's ``body``."""
    sent = json.dumps(body.model_dump(mode="json", exclude={"image", "mask"}))
    message = clip_echoes(str(getattr(error, "cause", error)), sent)
    return message if len(message) <= 4 * QUOTE_CHARS else message[:4 * QUOTE_CHARS] + "..."


async def _await_or_cancel(response: DeploymentResponse):
    """The response's result; if this request is timed out or dropped first, the remote call is cancelled too
    (awaiting a DeploymentResponse does not cancel it by itself)."""
    try:
        return await response
    except BaseException:
        response.cancel()
        raise


class RequestGuard:
    """ASGI middleware: the bearer token is checked and the body capped before any route reads or parses it.

    FastAPI reads and parses a route's JSON body before its dependencies run, so these checks cannot be route
    dependencies: a client without a key could make the replica parse a body of any size. The key and the cap
    are those of the ``ImagesAPI`` instance this replica runs (Serve's replica context), from its ServeConfig:
    ``max_edit_request_bytes`` for the edits route, whose body holds images, ``max_request_bytes`` elsewhere.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        front_door = serve.get_replica_context().servable_object
        path = _route_path(scope)
        denied = None if path in PUBLIC_PATHS else front_door.check_key(Headers(scope=scope))
        if denied is None:
            config = front_door.config
            limit = ((config.max_edit_request_bytes, "max_edit_request_bytes", "send smaller image files")
                     if path == EDITS_PATH else
                     (config.max_request_bytes, "max_request_bytes", "a valid request is a few kB"))
            denied, receive = await _read_capped(scope, receive, *limit)
        await (denied or self.app)(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


async def _read_capped(scope: Scope, receive: Receive, limit: int, setting: str,
                       advice: str) -> tuple[JSONResponse | None, Receive]:
    """A 413 if the body is over ``limit`` bytes (by Content-Length, else counted as chunks arrive), or None and
    a ``receive`` that replays the body read here to the app. The 413 names the ``setting`` and gives ``advice``."""
    declared = Headers(scope=scope).get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    messages, size = [], 0
    while not too_large:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client left: the app sees the disconnect
            break
        size += len(message.get("body", b""))
        too_large = size > limit
        if not message.get("more_body", False):
            break
    if too_large:
        return error_response(413, f"the request body is over this server's limit of {limit} bytes ({setting}); "
                              f"{advice}", "invalid_request_error", code="request_too_large"), receive

    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return None, replay


app.add_middleware(RequestGuard)  # before @serve.ingress, which takes a copy of the app


# The front door only awaits other deployments, so one replica holds many requests; its queue bound is a last
# resort (the generator's is the one that sheds load, see app.build_application).
@serve.deployment(max_ongoing_requests=256, max_queued_requests=1024, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class ImagesAPI:
    """Routes of the endpoint; the generator (and optional scorer) deployments do the work."""

    async def __init__(self, config: ServeConfig, generator: DeploymentHandle, scorer: DeploymentHandle | None):
        self.config = config
        self.generator = generator
        self.scorer = scorer
        self.api_key = config.api_key(os.environ)
        if self.api_key is None:
            logger.warning(f"serving WITHOUT authentication (allow_unauthenticated; {config.api_key_env} is unset): "
                           "anyone who reaches this endpoint can generate images")
        # Not awaited here: where the generator waits for a node (a GPU node the autoscaler starts from zero), the
        # front door is up at once and answers 503 with Retry-After until the model is loaded (see _wait_for_model).
        self.model: dict | None = None
        self._describing = asyncio.ensure_future(generator.describe.remote())

    async def _wait_for_model(self) -> JSONResponse | None:
        """None once the generator has described its model (``self.model``), waiting up to ``startup_wait_s`` for
        its first replica; else the 503 with Retry-After a client retries on."""
        if self.model is None:
            try:
                self.model = await asyncio.wait_for(asyncio.shield(self._describing), self.config.startup_wait_s)
            except TimeoutError:
                return error_response(503, f"the model is still starting (no generator replica has loaded it within "
                                      f"startup_wait_s={self.config.startup_wait_s} s, e.g. while a GPU node joins); "
                                      f"retry after {self.config.retry_after_s} s", "service_unavailable",
                                      code="model_starting", headers={"Retry-After": str(self.config.retry_after_s)})
        return None

    def check_key(self, headers: Headers) -> JSONResponse | None:
        """None if the request may proceed, else the 401 (called by ``RequestGuard`` before the body is read)."""
        if self.api_key is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                              f"with the key set in {self.config.api_key_env} on the server",
                              "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz", summary="Liveness: 200 while this front door runs.")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.config.model_id}

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, summary="The served model.")
    async def models(self):
        starting = await self._wait_for_model()
        if starting:
            return starting
        return ModelList(data=[ModelCard(id=self.config.model_id, created=self.model["loaded_at"])])

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS,
              summary="Create images from a prompt (OpenAI Images API, plus seed/sampler/steps/guidance/"
              "negative_prompt).")
    async def generate(self, body: ImageGenerationRequest):
        starting = await self._wait_for_model()
        if starting:
            return starting
        width, height = body.dimensions() or (self.model["width"], self.model["height"])
        refused = self._check_model(body) or self._check_size(width, height, "size")
        if refused:
            return refused
        settings = self._settings(body, width, height)
        return self._check_budget(body, settings) or await self._run(body, settings, None)

    @app.post(EDITS_PATH, response_model=ImagesResponse, responses=_ERRORS,
              form_limits={"max_part_size": MAX_FORM_FIELD_BYTES},
              summary="Edit an image: inpaint where the mask is transparent, or img2img without a mask (OpenAI "
              "Images API multipart form, plus seed/sampler/steps/guidance/negative_prompt/strength).")
    async def edit(self, body: Annotated[ImageEditRequest, Form(media_type="multipart/form-data")]):
        refused = self._check_model(body) or await self._wait_for_model()
        if refused:
            return refused
        image, mask = await body.image.read(), None if body.mask is None else await body.mask.read()
        try:
            edit = await asyncio.to_thread(read_edit, image, mask, body.strength)
        except ImageFieldError as error:
            return error_response(422, str(error), "invalid_request_error", error.param, "invalid_image")
        width, height = edit.image.size
        if body.dimensions() not in (None, (width, height)):
            return error_response(422, f"size: {body.size} is not the image's size {width}x{height}; edits keep "
                                  "the image's size, so leave size unset ('auto') or resize the image",
                                  "invalid_request_error", "size", "invalid_value")
        refused = self._check_size(width, height, "image")
        if refused:
            return refused
        settings = self._settings(body, width, height)
        try:
            start_step = edit.start_step(settings.steps)
        except ValueError as error:
            return error_response(422, f"strength: {error}", "invalid_request_error", "strength", "invalid_value")
        return self._check_budget(body, settings, start_step) or await self._run(body, settings, edit)

    def _check_model(self, body: ImageGenerationRequest) -> JSONResponse | None:
        """None if ``body.model`` is unset or the served model, else the 404."""
        if body.model is None or body.model == self.config.model_id:
            return None
        return error_response(404, f"model {quote(body.model)} is not served here; use {self.config.model_id!r} "
                              "(GET /v1/models) or leave model unset", "invalid_request_error", "model",
                              "model_not_found")

    def _check_size(self, width: int, height: int, param: str) -> JSONResponse | None:
        """None if the model takes ``width`` x ``height``, else the 422 naming ``param`` (the field it came from)."""
        step = self.model["size_multiple"]
        if not (width % step or height % step):
            return None
        return error_response(422, f"{param}: {width}x{height} does not fit this model; width and height must be "
                              f"multiples of {step}, e.g. {max(step, width // step * step)}x"
                              f"{max(step, height // step * step)}", "invalid_request_error", param, "invalid_value")

    def _settings(self, body: ImageGenerationRequest, width: int, height: int) -> GenerationSettings:
        return GenerationSettings(
            steps=body.steps or self.model["steps"], width=width, height=height,
            guidance=self.model["guidance"] if body.guidance is None else body.guidance,
            sampler=body.sampler or SamplerConfig(),
        )

    def _check_budget(self, body: ImageGenerationRequest, settings: GenerationSettings,
                      start_step: int = 0) -> JSONResponse | None:
        """None if n x width x height x model calls (those of the sampler asked for, from ``start_step`` on) is
        within max_pixel_steps, else the 422 naming the limit and the request's cost (or the engine's refusal of
        the sampler's steps)."""
        try:
            calls = model_calls(settings, start_step)
        except ValueError as error:
            return error_response(422, f"the model refused these settings: {_cause(error, body)}",
                                  "invalid_request_error", "sampler", "invalid_value")
        cost = body.n * settings.width * settings.height * calls
        if cost <= self.config.max_pixel_steps:
            return None
        return error_response(422, f"this request costs n x width x height x model calls = {body.n} x "
                              f"{settings.width} x {settings.height} x {calls} = {cost:,}, over this server's budget "
                              f"of {self.config.max_pixel_steps:,} (max_pixel_steps); a model call is one step that "
                              "runs, and Masked Z-Sampling adds two per zigzag step (3T-2 calls for T steps); ask "
                              "for fewer images, fewer steps, a smaller size or fewer zigzag steps",
                              "invalid_request_error", code="over_budget")

    async def _run(self, body: ImageGenerationRequest, settings: GenerationSettings,
                   edit: Edit | None) -> ImagesResponse | JSONResponse:
        """The images of a checked request (image i with seed seed+i), scored if a scorer is configured, or the
        error a client can act on."""
        first_seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        seeds = [first_seed + i for i in range(body.n)]
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                images = await _await_or_cancel(
                    self.generator.generate.remote(body.prompt, seeds, body.negative_prompt, settings, edit))
                scores = [None] * len(images)
                if self.scorer is not None:
                    scores = await _await_or_cancel(self.scorer.score.remote(images, [body.prompt] * len(images)))
        except BackPressureError as error:
            return error_response(self.config.backpressure_status, f"the server is at capacity ({error.message}); "
                                  f"retry after {self.config.retry_after_s} s", "rate_limit_error",
                                  code="queue_full", headers={"Retry-After": str(self.config.retry_after_s)})
        except DeploymentUnavailableError as error:
            return error_response(503, f"the model is not available yet ({error.message}); retry shortly",
                                  "service_unavailable", code="model_unavailable",
                                  headers={"Retry-After": str(self.config.retry_after_s)})
        except ValueError as error:  # the engine refused these settings (ImageGenerator.generate checks them first)
            return error_response(422, f"the model refused these settings: {_cause(error, body)}", "invalid_request_error",
                                  code="invalid_value")
        except TimeoutError:
            return error_response(504, f"no answer within request_timeout_s={self.config.request_timeout_s} s; "
                                  "ask for fewer images (n), fewer steps or a smaller size", "timeout_error",
                                  code="timeout")
        encoded = await asyncio.to_thread(lambda: [encode_png(image) for image in images])
        return ImagesResponse(
            created=int(time.time()), model=self.config.model_id, size=f"{settings.width}x{settings.height}",
            scorer=self.config.scorer.name if self.config.scorer else None,
            data=[ImageData(b64_json=b64, seed=seed, score=score) for b64, seed, score in zip(encoded, seeds, scores)],
        )
