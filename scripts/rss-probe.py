#!/usr/bin/env python3
"""Measures the bus daemon's resident memory across many short connections.

Usage: scripts/rss-probe.py SOCKET PID [N] [WARMUP] [AT_ONCE]
Opens WARMUP (default 2000) then N (default 10000) connections, AT_ONCE (default 1)
open at a time, each saying HELLO and reading WELCOME before the batch closes, and
prints the daemon's VmRSS
(from /proc/PID/status) before, after the warm-up and after the N connections.
With gdb installed it then calls malloc_trim(0) inside the daemon and prints VmRSS
again: memory that comes back then was free but held by the allocator
(fragmentation); memory that stays is live (a leak). Standard library only.
"""
import os
import socket
import struct
import subprocess
import sys
import time

# docs/PROTOCOL.md's example HELLO from client "py".
HELLO = bytes.fromhex(
    "000000200183a870726f746f636f6c01a9636c69656e745f6964a27079a57761746368c2"
)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def batch(path, n, at_once):
    done = 0
    while done < n:
        k = min(at_once, n - done)
        socks = [one(path) for _ in range(k)]
        for s in socks:
            s.close()
        done += k


def one(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(HELLO)
    head = b""
    while len(head) < 5:
        chunk = s.recv(5 - len(head))
        if not chunk:
            raise ConnectionError("closed before WELCOME")
        head += chunk
    (n,) = struct.unpack(">I", head[:4])
    rest = n - 1
    while rest > 0:
        chunk = s.recv(rest)
        if not chunk:
            raise ConnectionError("closed inside WELCOME")
        rest -= len(chunk)
    if head[4] != 0x02:
        raise RuntimeError(f"expected WELCOME, got kind {head[4]:#x}")
    return s


def main():
    path, pid = sys.argv[1], int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    warm = int(sys.argv[4]) if len(sys.argv) > 4 else 2_000
    at_once = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    print(f"start            {rss_kib(pid):>8} KiB")
    batch(path, warm, at_once)
    time.sleep(1)
    base = rss_kib(pid)
    print(f"after {warm:>6} warm-up {base:>8} KiB")
    batch(path, n, at_once)
    time.sleep(1)
    after = rss_kib(pid)
    print(f"after {n:>6} more   {after:>8} KiB  ({(after - base) / 1024:+.1f} MiB)")
    try:
        subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
            check=True, capture_output=True, timeout=60,
        )
        trimmed = rss_kib(pid)
        print(f"after malloc_trim(0) {trimmed:>4} KiB  ({(trimmed - base) / 1024:+.1f} MiB vs warm-up)")
    except (OSError, subprocess.SubprocessError) as e:
        print(f"(no malloc_trim measurement: {e})")


if __name__ == "__main__":
    main()
