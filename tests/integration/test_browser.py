"""A real browser: headless Chromium loads a page from a local server through proxyd,
as a SOCKS5 proxy and as an HTTP proxy (plain forwarding for http:// URLs).

Both Chromium and the daemon run with name lookups confined to a hosts file of the
test's own: whatever Chromium tries in the background fails inside the machine.
"""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import chromium


class _Page(http.server.BaseHTTPRequestHandler):
    text = ""

    def do_GET(self) -> None:
        body = f"<html><body><p id='t'>{self.text}</p></body></html>".encode()
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def page() -> Iterator[tuple[str, str]]:
    """A local web page with a text of its own; (url, text)."""
    text = f"served to a browser {secrets.token_hex(8)}"
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Page", (_Page,), {"text": text})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", text
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("scheme", "protocol"), [("socks5", "socks5"), ("http", "http")])
def test_chromium_loads_a_page_through_the_proxy(start_daemon, tmp_path, page, scheme, protocol):
    url, text = page
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    daemon = start_daemon(hosts=hosts)
    result = chromium(
        tmp_path,
        url,
        f"--proxy-server={scheme}://127.0.0.1:{daemon.port}",
        "--proxy-bypass-list=<-loopback>",  # proxy loopback URLs too
        "--dump-dom",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert text.encode() in result.stdout
    port = url.rsplit(":", 1)[1].rstrip("/")
    line = daemon.access(lambda e: e["target"] == f"127.0.0.1:{port}" and e["status"] == "ok")
    assert line["protocol"] == protocol
    assert line["command"] == ("connect" if protocol == "socks5" else "GET")
