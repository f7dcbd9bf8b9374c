"""A Switchyard machine in Python over ZeroMQ (pyzmq), written from docs/PROTOCOL.md §12.

Usage: python3 zmq_peer.py SOCKET MACHINE_ID PEER_ID COUNT

- binds a ROUTER and a PUB on loopback and registers MACHINE_ID (type PyService)
  with the bus daemon at SOCKET, as if on a host of its own ("py-host"), with the
  two endpoints in its metadata;
- answers COUNT PINGs arriving on the ROUTER with PONG replies, acknowledging
  every SEND with an ACK;
- sends one HELLO event to PEER_ID (a Switchyard machine) through a DEALER
  connected to the ROUTER its registry entry names;
- subscribes its SUB to PEER_ID's PUB with the prefix "news." and prints each
  topic message it gets;
- answers HELLO, SUBS and MARK requests (it has no subscriptions to announce,
  and echoes subscription markers through its PUB).

Prints READY, then PING n / TOPIC topic event / ANSWERED n as it goes.
"""

import os
import sys
import time

import msgpack
import zmq

from switchyard_client import Client

HELLO, REPLY, SUBS, MARK, SEND, ACK = 0x01, 0x02, 0x03, 0x04, 0x10, 0x20

path, me, peer, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
router_port = router.bind_to_random_port("tcp://127.0.0.1")
pub = ctx.socket(zmq.PUB)
pub_port = pub.bind_to_random_port("tcp://127.0.0.1")

bus = Client(path, "python-zmq-peer")
entry = {
    "id": me,
    "machine_type": "PyService",
    # Another host as far as the selector can tell: Switchyard routes to us as Remote.
    "host_id": "py-host",
    "process_id": f"py-{os.getpid()}-{time.time_ns():x}",
    "context": None,
    "version": None,
    "accepts": ["PING"],
    "metadata": {
        "switchyard.zeromq.router": f"tcp://127.0.0.1:{router_port}",
        "switchyard.zeromq.pub": f"tcp://127.0.0.1:{pub_port}",
    },
}
bus.request("register", entry=entry)
peer_entry = bus.request("get", id=peer)["entry"]
peer_router = peer_entry["metadata"]["switchyard.zeromq.router"]
peer_pub = peer_entry["metadata"]["switchyard.zeromq.pub"]

dealer = ctx.socket(zmq.DEALER)
dealer.connect(peer_router)
sub = ctx.socket(zmq.SUB)
sub.connect(peer_pub)
sub.setsockopt(zmq.SUBSCRIBE, b"news.")

ids = iter(range(1, 1 << 62))


def envelope(to, event, payload, correlation_id=None, is_reply=False):
    headers = {"sent_at_us": time.time_ns() // 1000}
    if correlation_id is not None:
        headers["correlation_id"] = correlation_id
    if is_reply:
        headers["is_reply"] = True
    return msgpack.packb(
        {
            "id": next(ids),
            "source": me,
            "target": {"Machine": to},
            "event": event,
            "payload": msgpack.packb(payload),
            "headers": headers,
        }
    )


def send(to, env):
    dealer.send_multipart([bytes([SEND]), to.encode(), env])


send(peer, envelope(peer, "HELLO", "from python"))
print("READY", flush=True)

poller = zmq.Poller()
poller.register(router, zmq.POLLIN)
poller.register(sub, zmq.POLLIN)
poller.register(dealer, zmq.POLLIN)
answered = 0
topics = 0
while answered < count or topics < 1:
    for sock, _ in poller.poll(30_000):
        frames = sock.recv_multipart()
        if sock is router:
            identity, kind = frames[0], frames[1][0]
            if kind in (HELLO, SUBS, MARK):
                # This peer subscribes to nothing, so it only answers (and echoes markers:
                # a Switchyard subscriber waits for them to come back through our PUB).
                req = frames[2]
                marker = None
                if kind == SUBS:
                    marker = msgpack.unpackb(frames[3]).get("marker")
                elif kind == MARK:
                    marker = frames[3].decode()
                if marker:
                    pub.send_multipart([marker.encode(), entry["process_id"].encode()])
                router.send_multipart([identity, bytes([REPLY]), req, msgpack.packb({"ok": True})])
                continue
            if kind != SEND:
                continue
            # Acknowledge the bytes of the whole SEND message (every frame after the identity).
            size = sum(len(f) for f in frames[1:])
            router.send_multipart([identity, bytes([ACK]), size.to_bytes(8, "big")])
            for raw in frames[3:]:
                ev = msgpack.unpackb(raw)
                if ev["event"] != "PING":
                    continue
                n = msgpack.unpackb(ev["payload"])
                print(f"PING {n}", flush=True)
                h = ev["headers"]
                to = h.get("reply_to") or ev["source"]
                send(to, envelope(to, "PONG", n, h.get("correlation_id"), True))
                answered += 1
        elif sock is sub:
            topic, meta, raw = frames[0], msgpack.unpackb(frames[1]), msgpack.unpackb(frames[2])
            print(f"TOPIC {topic.decode()} {raw['event']} from {meta['host']}", flush=True)
            topics += 1
        # The DEALER gets ACKs (and NACKs) for what it sent: nothing to do with them here.
print(f"ANSWERED {answered}", flush=True)
