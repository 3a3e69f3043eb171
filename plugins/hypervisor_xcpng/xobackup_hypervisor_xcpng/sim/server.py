"""The HTTP side of a simulated host: RPC endpoints and routing to the streaming handlers.

Every host of every pool has its own listener (§1.1): POST ``/jsonrpc`` is JSON-RPC, any other
POST is XML-RPC, GET ``/export*`` and PUT ``/import*`` are the streaming handlers of
:mod:`xobackup_hypervisor_xcpng.sim.streams`. RPC replies keep the connection alive; streaming
replies close it, as XAPI's do.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from xobackup_hypervisor_xcpng.sim import control, streams
from xobackup_hypervisor_xcpng.sim.codec import (
    XapiError,
    json_dumps,
    jsonrpc_reply,
    parse_xmlrpc_request,
    xmlrpc_failure,
    xmlrpc_success,
)
from xobackup_hypervisor_xcpng.sim.xapi import DropConnection, Http500, Records

if TYPE_CHECKING:
    from xobackup_hypervisor_xcpng.sim.xapi import PoolXapi

log = logging.getLogger(__name__)

SERVER_HEADER = "xapi/24.19"
MAX_RPC_BODY = 64 * 1024 * 1024
_MAX_HEADERS = 100
_MAX_HEADER_LINE = 65536


class HostListener(ThreadingHTTPServer):
    """The HTTP server of one simulated host."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], xapi: PoolXapi, host_ref: str) -> None:
        self.xapi = xapi
        self.host_ref = host_ref
        super().__init__(address, RequestHandler)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"sim-host-{self.server_address[0]}:{self.server_address[1]}",
        )
        self.thread.start()

    def stop(self) -> None:
        """Stop accepting and close the socket."""
        self.shutdown()
        self.server_close()


class RequestHandler(BaseHTTPRequestHandler):
    """One client connection of a simulated host."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_HEADER
    sys_version = ""
    # Streaming replies send headers and body in separate writes; with Nagle's algorithm on,
    # each small answer would wait for the client's delayed ACK (about 40 ms per call).
    disable_nagle_algorithm = True
    server: HostListener

    def parse_request(self) -> bool:
        """The request line and headers of an HTTP/1.x request.

        The standard parser reads headers through the ``email`` package, a third of the
        simulator's CPU per RPC; the simulator shares the machine with the client it serves,
        so plain requests take this short path. Anything unusual (HTTP/0.9, a malformed
        line, an over-long header) goes to the standard parser, which answers the errors.
        """
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = line.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            return super().parse_request()
        self.requestline = line
        self.command, self.path, self.request_version = words
        headers = http.client.HTTPMessage()
        for _ in range(_MAX_HEADERS):
            raw = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(raw) > _MAX_HEADER_LINE:
                self.send_error(431, "Line too long")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            name, colon, value = raw.decode("iso-8859-1").partition(":")
            if not colon:
                self.send_error(400, f"Bad header line {raw[:40]!r}")
                return False
            headers[name.strip()] = value.strip()
        else:
            self.send_error(431, "Too many headers")
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive"
        )
        if headers.get("Expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log, not stderr."""
        log.debug("%s %s", self.address_string(), format % args)

    @property
    def xapi(self) -> PoolXapi:
        """The pool this host belongs to."""
        return self.server.xapi

    # -- plumbing ------------------------------------------------------------------------------
    def reply(self, status: int, content_type: str, body: bytes, **headers: str) -> None:
        """A complete response with Content-Length (connection kept alive).

        Header and body leave in one write: half the system calls of ``end_headers()`` then
        ``write(body)``, for the simulator's busiest path (it shares the CPU with its client).
        """
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.wfile.write(b"".join(self._headers_buffer) + b"\r\n" + body)
        self._headers_buffer = []

    def html_error(self, status: int, reason: str, detail: str, **headers: str) -> None:
        """XAPI's HTML error page (500 before any byte of a stream, 401, 404...)."""
        body = (
            f"<html><body><h1>HTTP {status} {reason}</h1>"
            f"<h1> Additional information </h1>{detail}</body></html>"
        ).encode()
        self.send_response(status, reason)
        self.send_header("content-type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def drop(self, reset: bool = False) -> None:
        """Close the connection without answering (RST when ``reset``)."""
        self.close_connection = True
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- RPC -----------------------------------------------------------------------------------
    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.html_error(400, "Bad Request", "chunked RPC bodies are not supported")
            return None
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_RPC_BODY:
            self.html_error(413, "Request Entity Too Large", "RPC body too large")
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:
        """RPC (XML or JSON) or the simulator's control endpoint."""
        path = urlsplit(self.path).path
        body = self._read_body()
        if body is None:
            return
        if path == "/jsonrpc" and not self.xapi.sim.jsonrpc:
            # a host older than JSON-RPC support: its XML-RPC handler answers (§1.1)
            self.reply(200, "text/xml", xmlrpc_failure(["INTERNAL_ERROR", "Xmlrpc.Parse_error"]))
        elif path == "/jsonrpc":
            self._jsonrpc(body)
        elif path.startswith("/sim/"):
            control.handle(self, body)
        else:
            self._xmlrpc(body)

    def _xmlrpc(self, body: bytes) -> None:
        try:
            method, params = parse_xmlrpc_request(body)
        except ValueError as error:
            self.html_error(500, "Internal Server Error", str(error))
            return
        try:
            value = self.xapi.call(method, params, self.server.host_ref)
            if isinstance(value, Records):
                payload = xmlrpc_success(None, value.to_xml())
            else:
                payload = xmlrpc_success(value)
        except XapiError as error:
            payload = xmlrpc_failure(error.description)
        except DropConnection as drop:
            self.drop(drop.reset)
            return
        except Http500 as error:
            self.html_error(500, "Internal Server Error", str(error))
            return
        except Exception as error:  # a simulator bug answers like XAPI's INTERNAL_ERROR
            log.exception("simulator error in %s", method)
            payload = xmlrpc_failure(["INTERNAL_ERROR", repr(error)])
        self.reply(200, "text/xml", payload)

    def _jsonrpc(self, body: bytes) -> None:
        try:
            request = json.loads(body)
            if not isinstance(request, dict) or request.get("id") is None:
                raise ValueError("not a JSON-RPC call with an id")
        except ValueError as error:
            detail = f"Jsonrpc.Malformed_method_request {error}"
            self.html_error(500, "Internal Server Error", detail)
            return

        def call(method: str, params: list[Any]) -> Any:
            value = self.xapi.call(method, params, self.server.host_ref)
            return value.to_python() if isinstance(value, Records) else value

        try:
            reply = jsonrpc_reply(request, call)
        except DropConnection as drop:
            self.drop(drop.reset)
            return
        except Http500 as error:
            self.html_error(500, "Internal Server Error", str(error))
            return
        except Exception as error:
            log.exception("simulator error in %s", request.get("method"))
            reply = jsonrpc_reply(request, _raiser(XapiError("INTERNAL_ERROR", repr(error))))
        self.reply(200, "application/json", json_dumps(reply))

    def do_OPTIONS(self) -> None:
        """CORS preflight, as XAPI answers it."""
        self.send_response(200)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "X-Requested-With, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- streams -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        """Streaming downloads."""
        path = urlsplit(self.path).path
        handler = streams.DOWNLOADS.get(path)
        if handler is None:
            self.html_error(404, "Not Found", f"no handler for {path}")
            return
        streams.run(self, path, handler)

    def do_PUT(self) -> None:
        """Streaming uploads."""
        path = urlsplit(self.path).path
        handler = streams.UPLOADS.get(path)
        if handler is None:
            self.html_error(404, "Not Found", f"no handler for {path}")
            return
        streams.run(self, path, handler)


def _raiser(error: XapiError) -> Any:
    def call(method: str, params: list[Any]) -> Any:
        raise error

    return call
