"""libzmq's own one-way throughput through pyzmq: the yardstick for the zeromq crate.

Usage: python3 zmq_throughput.py [BODY_BYTES] [SECONDS]

Two processes, as pyzmq's own throughput test does: a DEALER streams messages to a
ROUTER on loopback tcp for SECONDS; each message has the frames the bench's raw
zeromq row sends (`[kind, "sink", body]`, body BODY_BYTES long). The receiver
counts from its first message to the last and prints messages per second. Python's
own per-call cost is included, so this is a lower bound for libzmq.
"""

import multiprocessing
import sys
import time

import zmq


def receive(port_out, result_out):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    port_out.send(port)
    n = 0
    first = None
    while True:
        frames = router.recv_multipart()
        if first is None:
            first = time.perf_counter()
        if len(frames) == 2:  # [identity, b"stop"]
            break
        n += 1
    result_out.send((n, time.perf_counter() - first))


def main():
    body = int(sys.argv[1]) if len(sys.argv) > 1 else 170
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    port_in, port_out = multiprocessing.Pipe()
    res_in, res_out = multiprocessing.Pipe()
    rx = multiprocessing.Process(target=receive, args=(port_out, res_out))
    rx.start()
    port = port_in.recv()
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.SNDHWM, 100_000)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    frames = [b"\x10", b"sink", b"\xa5" * body]
    end = time.perf_counter() + seconds
    sent = 0
    while time.perf_counter() < end:
        for _ in range(1000):
            dealer.send_multipart(frames)
        sent += 1000
    dealer.send(b"stop")
    n, elapsed = res_in.recv()
    rx.join()
    print(
        f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}): {n} of {sent} messages "
        f"of {body} B bodies in {elapsed:.2f} s: {n / elapsed / 1000:.0f}K msg/s"
    )


if __name__ == "__main__":
    main()
