"""The pages and endpoints of the web UI: Data, Train, Runs (watch, compare), Export and chat."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from backpropagate.config import resolve_settings
from backpropagate.errors import BackpropagateError, ConfigError, InputError
from backpropagate.export import FORMATS
from backpropagate.presets import PRESETS
from backpropagate.ui import security
from backpropagate.ui.app import STATUS_BY_CODE, csrf_ok, ensure_csrf, guarded, render, state
from backpropagate.ui.form import check_options, form_fields, parse_options
from backpropagate.ui.preview import preview
from backpropagate.ui.workers import METRICS, RunSpec, gguf_files, gpu_status, log_line, read_lines
from backpropagate.ui.workspace import check_name

DEFAULT_MODEL = "tiny-llama"
QUANTIZATIONS = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "f16", "bf16", "f32")
SSE_INTERVAL_S = 1.0
MAX_CHAT_TOKENS = 256
# The history's statuses, and "starting" for a run whose worker has not recorded itself yet.
STATES = ("starting", "running", "completed", "interrupted", "failed")


def fmt_number(value: Any, digits: int = 4) -> str:
    """A number as pages show it (None as a dash)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


# Login


async def login_page(request: Request) -> Response:
    """The login form (straight to Data when no login is configured)."""
    ensure_csrf(request)
    if state(request).config.credential is None:
        return RedirectResponse("/data", status_code=303)
    return render(request, "login.html")


async def login(request: Request) -> Response:
    """Checks the password (rate limited) and opens a fresh session with a new CSRF token."""
    shared = state(request)
    credential = shared.config.credential
    if credential is None:
        return RedirectResponse("/data", status_code=303)
    if not await csrf_ok(request):
        return JSONResponse({"ok": False, "error": {"code": "csrf_failed"}}, status_code=403)
    form = await request.form()
    user = str(form.get("user") or "")
    password = str(form.get("password") or "")
    keys = (f"ip:{request.client.host if request.client else '?'}", f"user:{user}")
    wait = shared.limiter.blocked(*keys)
    if wait:
        return render(
            request, "login.html", status_code=429, message=f"Too many failed logins; wait {math.ceil(wait)} s."
        )
    if not await run_in_threadpool(credential.matches, user, password):
        shared.limiter.failed(*keys)
        return render(request, "login.html", status_code=401, message="Wrong user name or password.")
    request.session.clear()
    request.session["user"] = user
    request.session["csrf"] = security.new_csrf_token()
    return RedirectResponse("/data", status_code=303)


async def logout(request: Request) -> Response:
    """Ends the session."""
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


async def home(request: Request) -> Response:
    """The Data page is the start."""
    return RedirectResponse("/data", status_code=303)


# Data


async def data_page(request: Request) -> Response:
    """Data files, upload, and the validation report with a preview of the chosen file."""
    shared = state(request)
    file = request.query_params.get("file")
    model = request.query_params.get("model") or DEFAULT_MODEL
    context: dict[str, Any] = {"files": shared.workspace.data_files(), "file": file, "model": model}
    context["presets"] = list(PRESETS)
    context["max_mb"] = shared.workspace.max_upload_bytes // 2**20
    if file:
        path = shared.workspace.resolve(file)
        report, samples = await run_in_threadpool(_report, path, shared.workspace.model_ref(model))
        context.update(report=report, samples=samples, bars=histogram_bars(report["lengths"]))
    return render(request, "data.html", **context)


def _report(path: Any, model: str) -> tuple[dict[str, Any], list[Any]]:
    from backpropagate.data.validate import validate

    config = dataclasses.replace(resolve_settings(model, {}).data, cache=False)
    report = validate(path, model, config)
    report["file"] = path.name
    report["model"] = Path(model).name if Path(model).is_absolute() else model  # no host paths on the page
    samples = preview(path, model, config) if report["rows_valid"] else []
    return report, samples


def histogram_bars(lengths: dict[str, Any], width: int = 480, height: int = 160) -> list[dict[str, Any]]:
    """Bar geometry of the token-length histogram, for the page's SVG."""
    bins = lengths.get("histogram") or []
    if not bins:
        return []
    peak = max(b["count"] for b in bins) or 1
    step = width / len(bins)
    return [
        {
            "x": round(i * step + 2, 1),
            "w": round(step - 4, 1),
            "h": round(height * b["count"] / peak, 1),
            "y": round(height - height * b["count"] / peak, 1),
            "label": f"{b['from']}-{b['to']}",
            "count": b["count"],
        }
        for i, b in enumerate(bins)
    ]


async def upload(request: Request) -> Response:
    """Saves an uploaded dataset under uploads/ (type and size checked while it streams in)."""
    shared = state(request)
    limit = shared.workspace.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit() or int(declared) > limit + 64 * 1024:
        raise InputError(
            "INPUT_UPLOAD_REJECTED", f"uploads are limited to {limit // 2**20} MiB (with a Content-Length)"
        )
    async with request.form(max_files=1, max_fields=4) as form:
        if not security.same_token(str(form.get("csrf") or ""), request.session.get("csrf")):
            return JSONResponse({"ok": False, "error": {"code": "csrf_failed"}}, status_code=403)
        file = form.get("file")
        if file is None or isinstance(file, str) or not file.filename:
            raise InputError("INPUT_UPLOAD_REJECTED", "no file was sent")

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await file.read(1 << 20):
                yield chunk

        path = await shared.workspace.save_upload(file.filename, chunks())
    return RedirectResponse(f"/data?file={shared.workspace.relative(path)}", status_code=303)


# Train


async def train_page(request: Request) -> Response:
    """The training form, defaults from the chosen preset."""
    shared = state(request)
    model = request.query_params.get("model") or DEFAULT_MODEL
    return render(
        request,
        "train.html",
        model=model,
        data=request.query_params.get("data") or "",
        files=shared.workspace.data_files(),
        presets=list(PRESETS),
        fields=form_fields(model),
        values={},
        name=time.strftime("run-%Y%m%d-%H%M%S"),
    )


async def train_start(request: Request) -> Response:
    """Checks the settings as `backprop train` would and starts the worker; a refusal shows on the form."""
    shared = state(request)
    form = {k: str(v) for k, v in (await request.form()).items()}
    model = form.get("model", "").strip() or DEFAULT_MODEL
    fields = form_fields(model)
    context = {"model": model, "files": shared.workspace.data_files(), "presets": list(PRESETS), "fields": fields}
    try:
        name = check_name(form.get("name", "").strip(), "run name")
        data = form.get("data", "")
        shared.workspace.resolve(data)
        options = parse_options(form, fields)
        steps = _optional(form, "steps", int)
        epochs = _optional(form, "epochs", float)
        await run_in_threadpool(check_options, model, options)
        spec = RunSpec(model=shared.workspace.model_ref(model), data=data, steps=steps, epochs=epochs, options=options)
        shared.runs.start(name, spec)
    except BackpropagateError as err:
        error = {"code": err.code, "message": err.message, "hint": err.hint}
        return render(
            request,
            "train.html",
            status_code=STATUS_BY_CODE.get(err.code, 400),
            error=error,
            values=form,
            data=form.get("data"),
            name=form.get("name"),
            **context,
        )
    return RedirectResponse(f"/runs/{name}", status_code=303)


def _optional(form: dict[str, str], name: str, kind: type) -> Any:
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError("CONFIG_INVALID_SETTING", f"{name}={text!r} is invalid: expected a positive number") from None
    if value <= 0:
        raise ConfigError("CONFIG_INVALID_SETTING", f"{name}={text!r} is invalid: expected a positive number")
    return value


# Runs


async def runs_page(request: Request) -> Response:
    """The run history (the same store as `backprop runs`), filtered by text and status."""
    from backpropagate.ui.history import run_rows

    query = request.query_params.get("q", "").lower()
    wanted = request.query_params.get("state", "")
    rows, note = await run_in_threadpool(run_rows, state(request).runs)
    rows = [
        r
        for r in rows
        if (not query or query in f"{r['name']} {r['model']} {r['data']} {r['run_id']}".lower())
        and (not wanted or r["state"] == wanted)
    ]
    return render(request, "runs.html", rows=rows, q=query, state=wanted, note=note, states=STATES)


async def compare_page(request: Request) -> Response:
    """Two runs side by side: settings, results and loss curves."""
    shared = state(request)
    names = [check_name(request.query_params.get(k, ""), "run name") for k in ("a", "b")]
    runs = [{"status": shared.runs.status(n), "spec": dataclasses.asdict(shared.runs.spec(n))} for n in names]
    keys = sorted(set(runs[0]["spec"]["options"]) | set(runs[1]["spec"]["options"]))
    return render(request, "compare.html", runs=runs, names=names, keys=keys)


async def run_page(request: Request) -> Response:
    """One run: progress, curves, log, export and chat."""
    shared = state(request)
    name = request.path_params["name"]
    status = shared.runs.status(name)
    folder = shared.runs.folder(name)
    ggufs = [shared.workspace.relative(p) for p in gguf_files(folder)]
    return render(
        request,
        "run.html",
        run=status,
        spec=dataclasses.asdict(shared.runs.spec(name)),
        formats=FORMATS,
        quantizations=QUANTIZATIONS,
        ggufs=ggufs,
        has_plot=(folder / "loss.png").is_file(),
    )


async def run_state(request: Request) -> Response:
    """The run's status as JSON (for scripts and polling)."""
    shared = state(request)
    name = request.path_params["name"]
    return JSONResponse(await run_in_threadpool(shared.runs.status, name))


async def run_events(request: Request) -> Response:
    """Server-sent events: new metrics and log lines, the run's state and the GPUs, about once a second."""
    shared = state(request)
    name = request.path_params["name"]
    folder = shared.runs.folder(name)
    shared.runs.spec(name)  # refuses an unknown run before the stream opens

    async def stream() -> AsyncIterator[str]:
        metrics_at = logs_at = 0
        last = None
        while True:
            metrics, metrics_at = read_lines(folder / METRICS, metrics_at)
            logs, logs_at = read_lines(folder / "worker.log", logs_at)
            status = await run_in_threadpool(shared.runs.status, name)
            update = {
                "status": status,
                "metrics": metrics,
                "logs": [log_line(r) for r in logs],
                "gpus": gpu_status(),
                "export": _export_state(request, name),
            }
            if metrics or logs or update != last:
                yield f"event: update\ndata: {json.dumps(update)}\n\n"
            last = {**update, "metrics": [], "logs": []}
            if await request.is_disconnected() or shared.stopping():
                return
            await asyncio.sleep(SSE_INTERVAL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


async def run_metrics(request: Request) -> Response:
    """Every metrics record of the run as JSON."""
    shared = state(request)
    records, _ = read_lines(shared.runs.folder(request.path_params["name"]) / METRICS)
    return JSONResponse(records)


async def run_plot(request: Request) -> Response:
    """The loss plot the trainer wrote."""
    shared = state(request)
    path = shared.runs.folder(request.path_params["name"]) / "loss.png"
    if not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="image/png")


async def run_stop(request: Request) -> Response:
    """Asks the run to stop after a checkpoint."""
    runs = state(request).runs
    runs.spec(request.path_params["name"])  # an unknown run is a 404
    return JSONResponse({"ok": runs.stop(request.path_params["name"])})


async def run_resume(request: Request) -> Response:
    """Starts the run again from its last checkpoint."""
    shared = state(request)
    name = request.path_params["name"]
    shared.runs.start(name, shared.runs.spec(name), resume=True)
    return JSONResponse({"ok": True})


def _export_state(request: Request, name: str) -> dict[str, Any] | None:
    job = state(request).exports.jobs.get(name)
    return dataclasses.asdict(job) if job else None


async def run_export(request: Request) -> Response:
    """Starts exporting the run's adapter (format, quantization, Ollama) in the background."""
    shared = state(request)
    name = request.path_params["name"]
    body = await request.json()
    adapter = shared.runs.folder(name) / "adapter"
    if not adapter.is_dir():
        raise InputError("INPUT_ADAPTER_INVALID", f"run {name!r} has no trained adapter yet")
    fmt = str(body.get("format", "gguf"))
    quantization = body.get("quantization") if fmt == "gguf" else None
    shared.exports.start(name, adapter, fmt, quantization, bool(body.get("ollama")))
    return JSONResponse({"ok": True, "export": _export_state(request, name)})


async def run_export_state(request: Request) -> Response:
    """The export's progress."""
    return JSONResponse({"export": _export_state(request, request.path_params["name"])})


async def run_chat(request: Request) -> Response:
    """One chat answer from a GGUF this run exported, through llama.cpp."""
    shared = state(request)
    name = request.path_params["name"]
    body = await request.json()
    gguf = shared.workspace.resolve(str(body.get("gguf", "")))
    if gguf.suffix != ".gguf" or shared.runs.folder(name) not in gguf.parents:
        raise InputError("INPUT_PATH_OUTSIDE_WORKSPACE", "the chat model must be a .gguf file of this run")
    messages = [
        {"role": str(m.get("role")), "content": str(m.get("content", ""))}
        for m in body.get("messages", [])
        if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
    ]
    if not messages or messages[-1]["role"] != "user":
        raise ConfigError("CONFIG_INVALID_SETTING", "messages: the last message must be the user's")
    answer = await run_in_threadpool(shared.chat.reply, gguf, messages, MAX_CHAT_TOKENS)
    return JSONResponse({"ok": True, "reply": answer.text, "tokens": answer.completion_tokens})


ROUTES = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", guarded(logout), methods=["POST"]),
    Route("/", guarded(home, page=True), methods=["GET"]),
    Route("/data", guarded(data_page, page=True), methods=["GET"]),
    Route("/data/upload", guarded(upload), methods=["POST"]),
    Route("/train", guarded(train_page, page=True), methods=["GET"]),
    Route("/train", guarded(train_start), methods=["POST"]),
    Route("/runs", guarded(runs_page, page=True), methods=["GET"]),
    Route("/runs/compare", guarded(compare_page, page=True), methods=["GET"]),
    Route("/runs/{name}", guarded(run_page, page=True), methods=["GET"]),
    Route("/runs/{name}/state", guarded(run_state), methods=["GET"]),
    Route("/runs/{name}/events", guarded(run_events), methods=["GET"]),
    Route("/runs/{name}/metrics", guarded(run_metrics), methods=["GET"]),
    Route("/runs/{name}/loss.png", guarded(run_plot), methods=["GET"]),
    Route("/runs/{name}/stop", guarded(run_stop), methods=["POST"]),
    Route("/runs/{name}/resume", guarded(run_resume), methods=["POST"]),
    Route("/runs/{name}/export", guarded(run_export), methods=["POST"]),
    Route("/runs/{name}/export", guarded(run_export_state), methods=["GET"]),
    Route("/runs/{name}/chat", guarded(run_chat), methods=["POST"]),
]
