#!/usr/bin/env python3
"""Resident memory per idle SignalR connection of a running `ringhub serve`.

Opens N WebSocket connections (upgrade + JSON handshake, then silence), reads the
server's VmRSS from /proc before and after, and prints the delta per connection.
Client sockets are spread over 127.0.0.x source addresses so ports never run short.

    ringhub serve --threads 1 --listen 127.0.0.1:5070 &
    bench/scripts/idle_rss.py --pid $! --port 5070 --connections 10000

(A stopgap until `ringhub-bench run` has its idle workload.)
"""
import argparse
import socket
import time

REQUEST = (b"GET /hubs/idle HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


HANDSHAKE = masked_text(b'{"protocol":"json","version":1}\x1e')


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=10000)
    args = ap.parse_args()
    before = rss_kib(args.pid)
    socks = []
    started = time.time()
    for i in range(args.connections):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i // 20000}", 0))
        s.connect(("127.0.0.1", args.port))
        s.sendall(REQUEST + HANDSHAKE)
        socks.append(s)
    for s in socks:  # wait for each 101 + handshake answer
        data = b""
        while not data.endswith(b"{}\x1e"):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("closed: " + data.decode("latin1"))
            data += chunk
    connect_secs = time.time() - started
    time.sleep(2)
    after = rss_kib(args.pid)
    per = (after - before) * 1024 / args.connections
    print(f"connections={args.connections} connect_secs={connect_secs:.1f} rss_before_kib={before} "
          f"rss_after_kib={after} bytes_per_connection={per:.0f}")


if __name__ == "__main__":
    main()
