"""A faster path for SMB2 WRITE requests on unsigned, unencrypted sessions.

smbprotocol builds every request through its generic field-by-field structures, which copy a
WRITE's payload several times (about 15 ms of CPU per 8 MiB here, more than the server needs
to store it). :class:`WriteConnection` adds :meth:`~WriteConnection.send_write`, which packs
the 112 bytes of header and WRITE fields with smbprotocol's own header structure and hands
the payload to the socket as it is. It registers the request exactly as
:meth:`Connection.send` does, so responses, credits, timeouts and errors go through
smbprotocol's normal receive path.

Signed or encrypted sessions do not use it: they take the regular ``Open.write`` path.
"""

from __future__ import annotations

import struct
from typing import Any

from smbprotocol.connection import Connection, Request
from smbprotocol.exceptions import SMBException
from smbprotocol.header import Commands, SMB2HeaderRequest
from smbprotocol.open import SMB2WriteRequest

_WRITE_FIELDS = struct.Struct("<HHIQ16sIIHHI")
"""MS-SMB2 2.2.21 SMB2 WRITE Request up to its Buffer: StructureSize (49), DataOffset,
Length, Offset, FileId, Channel, RemainingBytes, WriteChannelInfoOffset/Length, Flags."""
_FRAME_LENGTH = struct.Struct(">I")
_DATA_OFFSET = 64 + _WRITE_FIELDS.size  # the payload follows the SMB2 header and the fields


class WriteConnection(Connection):
    """An smbprotocol connection that can send WRITE requests without extra copies."""

    def can_send_write(self, session: Any, tree: Any) -> bool:
        """True when requests of ``session``/``tree`` are neither signed nor encrypted."""
        return not (
            session.signing_required
            or session.encrypt_data
            or tree.encrypt_data
            or tree.is_dfs_share
        )

    def send_write(
        self,
        session_id: int,
        tree_id: int,
        file_id: bytes,
        offset: int,
        data: bytes | bytearray | memoryview,
        credit_charge: int,
        credit_request: int,
    ) -> Request:
        """Send one WRITE of ``data`` at ``offset``; returns the request to ``receive()``."""
        with self.sequence_lock:
            low, high = self.sequence_window["low"], self.sequence_window["high"]
            if credit_charge > high - low:
                raise SMBException(
                    f"Request requires {credit_charge} credits but only {high - low} "
                    "credits are available"
                )
            message_id = low
            self.sequence_window["low"] += credit_charge
        header = SMB2HeaderRequest()
        header["credit_charge"] = credit_charge
        header["command"] = Commands.SMB2_WRITE
        header["credit_request"] = credit_request
        header["message_id"] = message_id
        header["tree_id"] = tree_id
        header["session_id"] = session_id
        header["data"] = _WRITE_FIELDS.pack(
            49, _DATA_OFFSET, len(data), offset, file_id, 0, 0, 0, 0, 0
        )
        request = Request(header, SMB2WriteRequest, self, session_id=session_id)
        self.outstanding_requests[message_id] = request
        self._check_worker_running()
        self._send_frame(header.pack(), data)
        return request

    def _send_frame(self, head: bytes, data: bytes | bytearray | memoryview) -> None:
        """One Direct TCP frame (4-byte big-endian length, then the message) without joining
        the payload: the transport's own ``send`` copies it once to frame it and again for
        every partial ``socket.send``."""
        transport = self.transport
        sock = getattr(transport, "_sock", None)
        lock = getattr(transport, "_sock_lock", None)
        length = len(head) + len(data)
        if sock is None or lock is None or length > transport.MAX_SIZE:
            transport.send(b"".join((head, data)))
            return
        with lock:
            sock.sendall(_FRAME_LENGTH.pack(length) + head)
            sock.sendall(data)
