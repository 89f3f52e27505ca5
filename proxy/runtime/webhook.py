"""Approver notifications: a JSON POST to a webhook for every new pending request.

What it is for: telling approvers (chat, paging, ticketing) that a request waits, without the
requester waiting for it: delivery runs in the background, retried with exponential backoff, each
attempt audited (``notify.webhook.delivered`` / ``notify.webhook.failed``).
What it must not do: block or fail the request, follow redirects to other hosts, or send
anything secret (the payload is the request as ``requests --json`` shows it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("jit_proxy.webhook")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "jit-proxy"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Webhook:
    def __init__(self, service: Any):
        self.service = service
        self._tasks: set[asyncio.Task] = set()

    def request_created(self, payload: dict) -> None:
        """Queue the notification for ``payload`` (a request as JSON data); returns at once."""
        settings = self.service.config.notifications
        if settings is None or settings.webhook_url is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver(settings.webhook_url, settings.webhook_attempts,
                          settings.webhook_timeout, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, attempts: int, timeout: float, payload: dict) -> None:
        body = json.dumps({"event": "access.request.created", "request": payload}).encode()
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                status = await asyncio.to_thread(_post, url, body, timeout)
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # OSError, http.client.HTTPException, bad URLs, ...
                error = f"{type(exc).__name__}: {exc}"[:300]
            if error is None:
                self.service.audit.emit("notify.webhook.delivered", "system",
                                        request=payload["id"], attempt=attempt)
                return
            self.service.audit.emit("notify.webhook.failed", "system", request=payload["id"],
                                    attempt=attempt, error=error,
                                    retry_in=delay if attempt < attempts else None)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 300)
        log.warning("webhook for request %s gave up after %d attempts", payload["id"], attempts)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
