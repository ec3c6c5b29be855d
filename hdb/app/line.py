"""The line every visitor shares (Gradio's queue), and the door in front of it that keeps its limits.

A public Space's API is open to anyone, and the client chooses its own session hash. So the limits are checked at
the door, on every request that joins the line, whatever event it names (the page's, or one no page sends):

- the line holds at most LINE_SIZE requests, waiting or running;
- one visitor (a session) has at most MAX_JOBS_PER_VISITOR of them;
- one network address at most MAX_JOBS_PER_ADDRESS (several visitors may share one address: a household, a
  school, a test suite), so fresh session hashes do not multiply a visitor's share;
- one address uploads at most UPLOAD_BYTES in UPLOAD_WINDOW seconds.

Gradio checks its queue's size before it awaits an event's validator, so requests that join together would all
pass it: the door lets one join in at a time, and answers a refusal at once, with HTTP 429 and the reason (the page
shows it; gradio_client raises it).

The address: on Hugging Face Spaces every request arrives from Hugging Face's proxy, which appends the address it
saw to `X-Forwarded-For`; the last entry is the proxy's own and cannot be forged by the caller (client.host is an
internal address of the proxy there). Sources: the mteb leaderboard's fix for Spaces (embeddings-benchmark/mteb
pull request 4754, 2026-05) and a Space that measured forged entries (qdonnars/ohmywind pull request 195,
2026-08). Elsewhere the address is the connection's (uvicorn rewrites it from a proxy on 127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from hdb.app.visitors import VisitorFiles

MAX_UPLOAD = "20mb"  # per file (Gradio's own check): a phone photo or a personal file fits
LINE_SIZE = 32  # requests waiting or running, every visitor's together
MAX_JOBS_PER_VISITOR = 1
MAX_JOBS_PER_ADDRESS = 12  # generous: several visitors behind one address (the tests run nine from 127.0.0.1)
UPLOAD_BYTES, UPLOAD_WINDOW = 256 * 2**20, 600  # a visitor's photos and a personal file fit many times over
SWEEP_EVERY = 60  # seconds between sweeps of orphaned uploads (VisitorFiles.sweep_orphans), run by uploads

Scope = dict[str, Any]


def address(scope: Scope, behind_spaces_proxy: bool) -> str:
    """The network address a request comes from (see the module's docstring for the proxy)."""
    if behind_spaces_proxy:
        for name, value in reversed(scope.get("headers", [])):
            if name == b"x-forwarded-for":
                return value.decode("latin-1").rsplit(",", 1)[-1].strip()
    client = scope.get("client")
    return client[0] if client else ""


def events_in_line(blocks: gr.Blocks) -> list:
    """Gradio's events waiting or running (gradio 6.31's queue: its per-group waiting lists and its active jobs).

    Read from the queue itself, never counted by hand: an event leaves the active jobs before its client hears it
    finished, so a chained event (personalise, then its pictures) never finds its predecessor still in line."""
    queue = blocks._queue
    waiting = [event for group in queue.event_queue_per_concurrency_id.values() for event in group.queue]
    running = [event for job in queue.active_jobs if job for event in job]
    return waiting + running


def refusal(events: list, session_hash: str | None, where: str, behind_spaces_proxy: bool) -> str | None:
    """Why a request from session `session_hash` at address `where` may not join a line of `events`; None: it may."""
    if len(events) >= LINE_SIZE:
        return f"The line is full ({len(events)} requests are waiting or running); please try again in a minute."
    if session_hash and sum(event.session_hash == session_hash for event in events) >= MAX_JOBS_PER_VISITOR:
        return "You already have a request waiting or running; it has to finish first."
    ours = sum(address(event.request.scope, behind_spaces_proxy) == where for event in events)
    if ours >= MAX_JOBS_PER_ADDRESS:
        return f"{ours} requests from your network are already waiting or running; please wait until they finish."
    return None


class Door:
    """ASGI middleware in front of the Gradio app: joins the line one at a time within its limits, bounds uploads
    per address, and has orphaned uploads swept now and then."""

    def __init__(self, app: Any, blocks: gr.Blocks, files: VisitorFiles, behind_spaces_proxy: bool) -> None:
        self.app, self.blocks, self.files, self.behind_proxy = app, blocks, files, behind_spaces_proxy
        self.joining = asyncio.Lock()
        self.uploads: dict[str, deque[tuple[float, int]]] = {}  # address -> (time, bytes) of recent uploads
        self.last_sweep = time.monotonic()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] == "POST":
            if path.endswith("/queue/join") or "/call/" in path:
                return await self.join(scope, receive, send)
            if path.endswith("/upload"):
                return await self.upload(scope, receive, send)
        await self.app(scope, receive, send)

    async def join(self, scope: Scope, receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        try:
            session_hash = json.loads(body).get("session_hash")
        except (ValueError, AttributeError):
            session_hash = None  # Gradio answers a malformed body itself
        session_hash = session_hash if isinstance(session_hash, str) else None
        where = address(scope, self.behind_proxy)
        async with self.joining:  # the check and Gradio's push (with its validators) as one step
            reason = refusal(events_in_line(self.blocks), session_hash, where, self.behind_proxy)
            if reason:
                return await _refuse(send, reason)
            await self.app(scope, _replay(body, receive), send)

    async def upload(self, scope: Scope, receive: Any, send: Any) -> None:
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if not length.isdigit():
            return await _refuse(send, "An upload must say its size (Content-Length).", status=411)
        now, where = time.monotonic(), address(scope, self.behind_proxy)
        recent = self.uploads.setdefault(where, deque())
        while recent and now - recent[0][0] > UPLOAD_WINDOW:
            recent.popleft()
        sent = sum(size for _, size in recent)
        if sent + int(length) > UPLOAD_BYTES:
            return await _refuse(
                send,
                f"Your network uploaded {sent / 2**20:.0f} MB in the last {UPLOAD_WINDOW // 60} minutes; at most "
                f"{UPLOAD_BYTES // 2**20} MB are taken. Please wait a few minutes.",
            )
        recent.append((now, int(length)))
        if now - self.last_sweep > SWEEP_EVERY:
            self.last_sweep = now
            self.uploads = {key: times for key, times in self.uploads.items() if now - times[-1][0] < UPLOAD_WINDOW}
            await asyncio.to_thread(self.files.sweep_orphans)
        await self.app(scope, receive, send)


async def _read_body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that hands the app the body already read, then passes on what the connection says."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # a disconnect

    return replay


async def _refuse(send: Any, reason: str, status: int = 429) -> None:
    body = json.dumps({"detail": reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
