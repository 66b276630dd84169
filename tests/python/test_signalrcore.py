"""End to end with the stock Python client `signalrcore` (PyPI): every transport it has
(WebSockets, Server-Sent Events, long polling) with JSON, and MessagePack where the
transport carries binary, against a real `ringhub serve` with JWT authentication.

signalrcore 1.0.2's long polling is limited on the client side, so it is tested apart,
for what the client can do: it sends no Authorization header on its polls (an
authenticated server answers them 401, as ASP.NET Core would), it takes one record per
poll answer and keeps the rest until another answer arrives (servers batch what is
queued into one answer, ASP.NET Core too), and it splits MessagePack on 0x1E. So its
test runs against a server without `--jwt-secret`, with JSON, one message in flight.

Run: RINGHUB_BIN=target/debug/ringhub python3 -m unittest tests/python/test_signalrcore.py
"""

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import unittest

from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.protocol.messagepack_protocol import MessagePackHubProtocol
from signalrcore.types import HttpTransportType

SECRET = "python-secret"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("RINGHUB_BIN", os.path.join(ROOT, "target", "debug", "ringhub"))
# The contract's typed hub (engine/examples/typed_hub.rs), for streams.
TYPED_HUB = os.environ.get("RINGHUB_TYPED_HUB_BIN",
                           os.path.join(ROOT, "target", "debug", "examples", "typed_hub"))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict) -> str:
    """An HS256 token, as a backend would sign it."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"exp": int(time.time()) + 3600, **claims}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def wait_for(predicate, seconds=10.0, what="condition"):
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Server:
    """`ringhub serve` on a free loopback port, two shards."""

    def __init__(self, authenticated=True, command=(BINARY, "serve")):
        self.authenticated = authenticated
        self.data = tempfile.mkdtemp(prefix="ringhub-py-")
        secret = ["--jwt-secret", SECRET] if authenticated else []
        # A ping every second: signalrcore's stop() closes its socket and then waits for
        # its receiving thread, which wakes only when something arrives.
        self.process = subprocess.Popen(
            [*command, "--listen", "127.0.0.1:0", "--threads", "2",
             "--keepalive-secs", "1", "--client-timeout-secs", "5",
             "--data", self.data, *secret],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
        )
        self.log = []
        found = threading.Event()

        def read():
            for line in self.process.stderr:
                self.log.append(line)
                match = re.search(r"address=(\S+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
                if match and not found.is_set():
                    self.address = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(20):
            self.process.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self.base = f"http://{self.address}"

    def stop(self):
        self.process.terminate()
        return self.process.wait(10)


class Client:
    """A connected signalrcore client that records what `receive` brings."""

    def __init__(self, server, user, transport, msgpack=False, hub="chat"):
        options = {"transport": transport}
        if server.authenticated:
            token = jwt({"sub": user, "groups": ["*"]})
            options["access_token_factory"] = lambda: token
        builder = HubConnectionBuilder().with_url(f"{server.base}/hubs/{hub}", options=options)
        if msgpack:
            builder = builder.with_hub_protocol(MessagePackHubProtocol())
        self.connection = builder.build()
        self.received = []
        self.connection.on("receive", lambda args: self.received.append(args))
        opened = threading.Event()
        self.connection.on_open(opened.set)
        self.connection.start()
        if not opened.wait(10):
            raise AssertionError(f"{transport} did not open")

    def invoke(self, method, arguments):
        """Invokes and waits for the Completion; returns its result."""
        done = threading.Event()
        outcome = {}

        def completed(message):
            outcome["message"] = message
            done.set()

        self.connection.send(method, arguments, on_invocation=completed)
        if not done.wait(10):
            raise AssertionError(f"no completion for {method}")
        message = outcome["message"]
        error = getattr(message, "error", None)
        if error:
            raise AssertionError(f"{method} failed: {error}")
        return getattr(message, "result", None)

    def stop(self):
        self.connection.stop()


COMBINATIONS = [
    (HttpTransportType.web_sockets, False),
    (HttpTransportType.web_sockets, True),
    # MessagePack needs a binary transport: not Server-Sent Events.
    (HttpTransportType.server_sent_events, False),
]


class SignalrcoreTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.secured = Server()
        cls.open = Server(authenticated=False)

    @classmethod
    def tearDownClass(cls):
        assert cls.secured.stop() == 0
        assert cls.open.stop() == 0


    def test_echo_groups_and_users_over_every_transport(self):
        for transport, msgpack in COMBINATIONS:
            with self.subTest(transport=transport.value, msgpack=msgpack):
                room = f"py-{transport.value}-{msgpack}"
                server = self.secured
                ann = Client(server, "ann", transport, msgpack)
                bob = Client(server, "bob", transport, msgpack)
                try:
                    self.assertEqual(ann.invoke("Echo", [{"n": 1, "s": "héllo"}]), {"n": 1, "s": "héllo"})
                    ann.invoke("JoinGroup", [room])
                    bob.invoke("JoinGroup", [room])
                    for i in range(20):
                        ann.invoke("SendToGroup", [room, "receive", [i, transport.value]])
                    wait_for(lambda: len(bob.received) >= 20 and len(ann.received) >= 20, what="20 group messages")
                    self.assertEqual([m[0] for m in bob.received], list(range(20)))
                    self.assertEqual([m[0] for m in ann.received], list(range(20)))
                    self.assertEqual(bob.invoke("GroupCount", [room]), {"connections": 2, "users": 2})
                finally:
                    ann.stop()
                    bob.stop()

    def test_a_mixed_group_of_python_clients(self):
        members = [Client(self.secured, f"m{i}", transport, msgpack)
                   for i, (transport, msgpack) in enumerate(COMBINATIONS)]
        try:
            for member in members:
                member.invoke("JoinGroup", ["py-mixed"])
            members[0].invoke("SendToGroup", ["py-mixed", "receive", ["to all"]])
            wait_for(lambda: all(m.received for m in members), what="every member")
            time.sleep(0.2)
            for member in members:
                self.assertEqual(member.received, [["to all"]])
        finally:
            for member in members:
                member.stop()


    def test_a_stream_from_the_typed_hub_over_every_transport(self):
        """The typed hub's Counter stream (StreamItems then a Completion), as signalrcore's
        stream() takes it. (Its client-to-server Subject is sent as a non-blocking
        invocation, so a method's result over an upload cannot be read back with it: the
        JS client's test covers uploads.)"""
        typed = Server(authenticated=False, command=(TYPED_HUB,))
        try:
            for transport, msgpack in COMBINATIONS:
                with self.subTest(transport=transport.value, msgpack=msgpack):
                    client = Client(typed, "anonymous", transport, msgpack, hub="typed")
                    try:
                        self.assertEqual(client.invoke("Add", [40, 2]), 42)
                        items, ended, errors = [], threading.Event(), []
                        client.connection.stream("Counter", [5, 100]).subscribe({
                            "next": items.append,
                            "complete": lambda *_: ended.set(),
                            "error": lambda error: (errors.append(error), ended.set()),
                        })
                        self.assertTrue(ended.wait(10), f"the stream ended ({items})")
                        self.assertEqual(errors, [])
                        self.assertEqual(items, [0, 1, 2, 3, 4])
                    finally:
                        client.stop()
        finally:
            assert typed.stop() == 0

    def test_long_polling_round_trips(self):
        client = Client(self.open, "anonymous", HttpTransportType.long_polling)
        try:
            for value in ["first", 2, {"three": [3]}]:
                self.assertEqual(client.invoke("Echo", [value]), value)
            client.invoke("JoinGroup", ["py-polling"])
            self.assertEqual(client.invoke("GroupCount", ["py-polling"]), {"connections": 1, "users": 0})
        finally:
            client.stop()


if __name__ == "__main__":
    unittest.main()
