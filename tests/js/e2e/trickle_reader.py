"""A group member that reads at its own pace, in a process of its own: a raw WebSocket
client with a 4 KiB receive buffer that joins GROUP, then takes CHUNK bytes every
EVERY_MS and lets the rest wait (a client that reads just enough, often enough, never
to look stopped). Prints "joined" once in the group, "taken <bytes>" after each chunk,
and "closed <ms>" when the server ends its connection, <ms> after it started trickling.

    python3 trickle_reader.py <host> <port> <group> [CHUNK=81920] [EVERY_MS=1500]
"""

import os
import socket
import sys
import threading
import time

host, port, group = sys.argv[1], int(sys.argv[2]), sys.argv[3]
chunk = int(sys.argv[4]) if len(sys.argv) > 4 else 81920
every = (int(sys.argv[5]) if len(sys.argv) > 5 else 1500) / 1000
RS = "\x1e"


def frame(text):
    """A masked client text frame."""
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
# Set before connecting, so that the window the server sees is small from the start.
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
sock.connect((host, port))
send_lock = threading.Lock()


def send(data):
    with send_lock:
        sock.sendall(data)


send(
    (
        "GET /hubs/chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
)
send(frame('{"protocol":"json","version":1}' + RS))
send(frame('{"type":1,"invocationId":"j","target":"JoinGroup","arguments":["%s"]}' % group + RS))
seen = b""
while b'"invocationId":"j"' not in seen:
    data = sock.recv(65536)
    if not data:
        print("closed -1", flush=True)
        sys.exit(0)
    seen += data
print("joined", flush=True)
started = time.monotonic()


def ping():
    while True:
        time.sleep(1)
        try:
            send(frame('{"type":6}' + RS))
        except OSError:
            return


threading.Thread(target=ping, daemon=True).start()
total = 0
while True:
    time.sleep(every)
    taken = 0
    while taken < chunk:
        try:
            data = sock.recv(min(65536, chunk - taken))
        except OSError:
            data = b""
        if not data:
            print("closed %d" % int((time.monotonic() - started) * 1000), flush=True)
            sys.exit(0)
        taken += len(data)
    total += taken
    print("taken %d" % total, flush=True)
