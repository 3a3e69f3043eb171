"""XAPI's wire encoding: XML-RPC and JSON-RPC, with XAPI's quirks (xapi-protocol.md §1.2, §1.3).

XAPI does not emit standard XML-RPC: ints are untyped strings of digits, datetimes use the
basic ISO format with a ``Z`` suffix, and every reply is a ``Status``/``Value`` (or
``ErrorDescription``) struct, never a ``<fault>``. Responses are built by joining strings,
which is several times faster than :func:`xmlrpc.client.dumps` on large record maps.
"""

from __future__ import annotations

import datetime
import json
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any

NULL_REF = "OpaqueRef:NULL"


class DateTime(str):
    """An XAPI datetime (``20240420T12:00:00Z``): a string that XML-RPC types as a date."""

    __slots__ = ()


EPOCH = DateTime("19700101T00:00:00Z")
"""XAPI's "unset" date."""


def now() -> DateTime:
    """The current time in XAPI's datetime format."""
    return DateTime(time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime()))


class XapiError(Exception):
    """An API failure: ``[code, params...]`` as XAPI's ``ErrorDescription``."""

    def __init__(self, code: str, *params: object) -> None:
        self.code = code
        self.params = [str(p) for p in params]
        super().__init__(code, *self.params)

    @property
    def description(self) -> list[str]:
        """The wire form ``[CODE, param...]``."""
        return [self.code, *self.params]


def _escape(text: str) -> str:
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


_TRUE = "<value><boolean>1</boolean></value>"
_FALSE = "<value><boolean>0</boolean></value>"


class Int32(int):
    """An int XAPI sends typed as ``<i4>`` (only ``event.from``'s ``valid_ref_counts``)."""


def _encode(value: Any, out: list[str]) -> None:
    kind = type(value)
    if kind is str:
        out.append("<value>")
        out.append(_escape(value) if ("&" in value or "<" in value or ">" in value) else value)
        out.append("</value>")
    elif kind is dict:
        out.append("<value><struct>")
        for key, item in value.items():
            out.append("<member><name>")
            out.append(_escape(str(key)))
            out.append("</name>")
            _encode(item, out)
            out.append("</member>")
        out.append("</struct></value>")
    elif kind is list or kind is tuple:
        out.append("<value><array><data>")
        for item in value:
            _encode(item, out)
        out.append("</data></array></value>")
    elif kind is bool:
        out.append(_TRUE if value else _FALSE)
    elif kind is int:
        # XAPI's int64 is an untyped string of digits on the wire (§1.2)
        out.append(f"<value>{value}</value>")
    elif kind is float:
        out.append(f"<value><double>{value:.16g}</double></value>")
    elif kind is DateTime:
        out.append(f"<value><dateTime.iso8601>{value}</dateTime.iso8601></value>")
    elif kind is Int32:
        out.append(f"<value><i4>{int(value)}</i4></value>")
    elif value is None:
        out.append("<value></value>")
    elif isinstance(value, str):
        out.append("<value>" + _escape(str(value)) + "</value>")
    else:
        raise TypeError(f"cannot encode {kind.__name__} for XML-RPC")


def xml_value(value: Any) -> str:
    """One ``<value>`` element in XAPI's encoding."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


_RESPONSE_HEAD = (
    '<?xml version="1.0"?>\n<methodResponse><params><param><value><struct>'
    "<member><name>Status</name><value>Success</value></member>"
    "<member><name>Value</name>"
)
_RESPONSE_TAIL = "</member></struct></value></param></params></methodResponse>\n"


def xmlrpc_success(value: Any, encoded: str | None = None) -> bytes:
    """A ``Status: Success`` reply; ``encoded`` is an already encoded ``<value>``."""
    body = encoded if encoded is not None else xml_value(value)
    return (_RESPONSE_HEAD + body + _RESPONSE_TAIL).encode()


def xmlrpc_failure(description: list[str]) -> bytes:
    """A ``Status: Failure`` reply carrying ``ErrorDescription``."""
    return (
        '<?xml version="1.0"?>\n<methodResponse><params><param><value><struct>'
        "<member><name>Status</name><value>Failure</value></member>"
        "<member><name>ErrorDescription</name>" + xml_value(list(description)) + _RESPONSE_TAIL
    ).encode()


def _from_xmlrpc(value: Any) -> Any:
    if isinstance(value, xmlrpc.client.DateTime):
        text = value.value
        return DateTime(text if text.endswith("Z") else text + "Z")
    if isinstance(value, list):
        return [_from_xmlrpc(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_xmlrpc(v) for k, v in value.items()}
    return value


def parse_xmlrpc_request(body: bytes) -> tuple[str, list[Any]]:
    """Method name and parameters of an XML-RPC call; ValueError when malformed."""
    try:
        params, method = xmlrpc.client.loads(body)
    except Exception as error:  # expat and xmlrpc raise many types for garbage input
        raise ValueError(f"Xmlrpc.Parse_error: {error}") from error
    if not method:
        raise ValueError("Xmlrpc.Parse_error: no methodName")
    return method, [_from_xmlrpc(p) for p in params]


def parse_value_fragment(text: str) -> Any:
    """Decode one ``<value>`` fragment (a task result) into Python values."""
    if not text:
        return ""
    params, _ = xmlrpc.client.loads(
        "<methodResponse><params><param>" + text + "</param></params></methodResponse>"
    )
    return _from_xmlrpc(params[0])


def _json_default(value: Any) -> str:
    # Records imported from an XVA's ova.xml carry parsed datetimes: JSON-RPC sends them as
    # XAPI's datetime strings, like the DateTime values the simulator makes itself.
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y%m%dT%H:%M:%SZ")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_dumps(value: Any) -> bytes:
    """Compact JSON; :class:`DateTime` values are plain strings there (§1.3)."""
    return json.dumps(value, separators=(",", ":"), default=_json_default).encode()


def jsonrpc_reply(request: dict[str, Any], call: Callable[[str, list[Any]], Any]) -> dict[str, Any]:
    """Run one JSON-RPC request through ``call`` and build the v1 or v2 reply."""
    v2 = request.get("jsonrpc") == "2.0"
    ident = request.get("id")
    try:
        result = call(str(request.get("method", "")), list(request.get("params") or []))
    except XapiError as error:
        if v2:
            return {
                "jsonrpc": "2.0",
                "error": {"code": 1, "message": error.code, "data": error.params},
                "id": ident,
            }
        return {"result": None, "error": error.description, "id": ident}
    if v2:
        return {"jsonrpc": "2.0", "result": result, "id": ident}
    return {"result": result, "error": None, "id": ident}
