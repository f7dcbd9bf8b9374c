"""A minimal Switchyard bus client, written from docs/PROTOCOL.md alone.

Needs Python 3.8+ and the `msgpack` package (`python3 -m pip install msgpack`).
Unix only (the bus listens on a unix domain socket).
"""

import itertools
import os
import socket
import struct
import time

import msgpack

PROTOCOL = 1
MAX_FRAME = 16 * 1024 * 1024

HELLO, WELCOME, ERROR, REQUEST, REPLY, EVENT = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
SEND, PUBLISH, TOPIC, GROUP, GROUP_DELIVER, NACK = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15


class BusError(Exception):
    """The daemon answered with an error (REPLY ok=false, or a fatal ERROR frame)."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def host_id():
    """The host id Switchyard uses: /etc/machine-id, else $HOSTNAME, else "localhost"."""
    try:
        with open("/etc/machine-id") as f:
            value = f.read().strip()
            if value:
                return value
    except OSError:
        pass
    return os.environ.get("HOSTNAME") or "localhost"


class Client:
    """One connection to the bus daemon."""

    def __init__(self, path, client_id, token=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.reqs = itertools.count(1)
        self.ids = itertools.count(1)
        self.process_id = f"py-{os.getpid()}-{time.time_ns():x}"
        self.queued = []  # frames that arrived while waiting for a REPLY
        # max_frame: the largest frame this client accepts (the daemon never sends a bigger one).
        hello = {"protocol": PROTOCOL, "client_id": client_id, "watch": False, "max_frame": MAX_FRAME}
        if token is not None:
            hello["token"] = token
        self._write(HELLO, msgpack.packb(hello))
        kind, body = self._read()
        if kind == ERROR:
            err = msgpack.unpackb(body)
            raise BusError(err["code"], err["message"])
        if kind != WELCOME:
            raise BusError("handshake", f"expected WELCOME, got frame kind {kind:#x}")
        self.welcome = msgpack.unpackb(body)

    # -- framing: u32 big-endian length (kind + body), kind byte, body --

    def _write(self, kind, body):
        self.sock.sendall(struct.pack(">IB", len(body) + 1, kind) + body)

    def _read(self):
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    kind, body = self.buf[4], self.buf[5 : 4 + n]
                    self.buf = self.buf[4 + n :]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the bus daemon closed the connection")
            self.buf += chunk

    # -- registry --

    def request(self, op, **fields):
        req = next(self.reqs)
        self._write(REQUEST, msgpack.packb({"req": req, "op": op, **fields}))
        while True:
            kind, body = self._read()
            if kind == REPLY:
                reply = msgpack.unpackb(body)
                if reply["req"] != req:
                    continue
                if not reply["ok"]:
                    raise BusError(reply.get("code"), reply.get("message"))
                return reply
            if kind == ERROR:
                err = msgpack.unpackb(body)
                raise BusError(err["code"], err["message"])
            self.queued.append((kind, body))

    def register(self, machine_id, machine_type, metadata=None):
        entry = {
            "id": machine_id,
            "machine_type": machine_type,
            "host_id": host_id(),
            "process_id": self.process_id,
            "context": None,
            "version": None,
            "accepts": [],
            "metadata": metadata or {},
        }
        return self.request("register", entry=entry)["entry"]

    def discover(self, machine_type):
        return self.request("discover", type=machine_type)["entries"]

    # -- events --

    def send(self, source, to, event, payload=None, correlation_id=None, is_reply=False):
        headers = {"sent_at_us": time.time_ns() // 1000}
        if correlation_id is not None:
            headers["correlation_id"] = correlation_id
        if is_reply:
            headers["is_reply"] = True
        envelope = {
            "id": next(self.ids),
            "source": source,
            "target": {"Machine": to},
            "event": event,
            "payload": msgpack.packb(payload),
            "headers": headers,
        }
        self._write(SEND, msgpack.packb([to, envelope]))

    def reply(self, me, request, event, payload=None):
        """Answers an event; a request (it has a correlation id) gets a reply that completes it."""
        headers = request["headers"]
        to = headers.get("reply_to") or request["source"]
        cid = headers.get("correlation_id")
        self.send(me, to, event, payload, correlation_id=cid, is_reply=cid is not None)

    def next_event(self):
        """Blocks for the next SEND delivered to one of our machines: returns (machine id, envelope).

        The envelope's payload is decoded into `envelope["data"]`.
        """
        while True:
            kind, body = self.queued.pop(0) if self.queued else self._read()
            if kind == SEND:
                to, envelope = msgpack.unpackb(body)
                # Event names starting with "switchyard." belong to the transport (e.g. the loss
                # reports Rust clients send after a daemon restart): not for this client's handlers.
                if envelope["event"].startswith("switchyard."):
                    continue
                envelope["data"] = msgpack.unpackb(envelope["payload"])
                return to, envelope
            if kind == ERROR:
                err = msgpack.unpackb(body)
                raise BusError(err["code"], err["message"])
            # REPLY to nobody, EVENT, TOPIC, NACK, ACK: not used by this small client.
