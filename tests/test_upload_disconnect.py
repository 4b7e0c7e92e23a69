"""A client that hangs up while still sending its body is a client disconnect: the chat request gets its one
record (`client_disconnected`), an admin request changes nothing, and neither logs an error or a traceback."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

from gateway.store.request_log import read_records
from tests.conftest import ADMIN_TOKEN, CLIENT_TOKEN, GatewayFactory, RunningGateway


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record)


@contextlib.contextmanager
def logged_errors() -> Iterator[list[logging.LogRecord]]:
    """ERROR records of the gateway and of uvicorn, whose loggers do not propagate to the root. Enter it once
    the gateway has started: uvicorn's logging set-up replaces the handlers of its loggers."""
    handler = _Errors()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.seen
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def hang_up_mid_upload(gw: RunningGateway, path: str, token: str) -> None:
    """Announce 100,000 bytes of body, send 1,000, then close the connection."""
    url = urlsplit(gw.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: 100000\r\n\r\n".encode()
            + b'{"model": "crm-assistant", "messages": ['
            + b" " * 1000
        )
        time.sleep(0.3)  # the gateway is now reading the body, waiting for the rest


def test_a_chat_client_that_hangs_up_mid_upload_gets_one_disconnect_record(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway()
    with logged_errors() as errors:
        hang_up_mid_upload(gw, "/v1/chat/completions", CLIENT_TOKEN)
        gw.stop()  # waits for the request to finish and flushes the request log
    (rec,) = read_records(gw.settings.records_db)
    assert (rec.outcome, rec.status, rec.error_code) == ("client_disconnected", 499, "client_disconnected")
    assert [r.getMessage() for r in errors] == []


def test_an_admin_client_that_hangs_up_mid_upload_changes_nothing_and_logs_no_error(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway()
    with logged_errors() as errors:
        hang_up_mid_upload(gw, "/admin/kill-all", ADMIN_TOKEN)
        assert gw.admin("GET", "/admin/status").json()["switches"]["global_kill"] is False
        gw.stop()
    assert gw.app.components.live.view.switches.global_kill is False
    assert [r.getMessage() for r in errors] == []
