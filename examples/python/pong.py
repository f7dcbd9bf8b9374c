"""Registers a PongService machine with the bus daemon and answers PING with PONG.

Usage: python3 pong.py SOCKET [MACHINE_ID] [COUNT]
Prints READY once registered and ANSWERED n when it has answered COUNT pings.
"""

import sys

from switchyard_client import Client

path = sys.argv[1]
me = sys.argv[2] if len(sys.argv) > 2 else "py-pong"
count = int(sys.argv[3]) if len(sys.argv) > 3 else 5

client = Client(path, "python-pong")
client.register(me, "PongService")
print("READY", flush=True)
answered = 0
while answered < count:
    to, ev = client.next_event()
    if ev["event"] == "PING":
        client.reply(me, ev, "PONG", ev["data"])
        answered += 1
print(f"ANSWERED {answered}", flush=True)
