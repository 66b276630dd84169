"""End to end with the stock Python client `signalrcore` (PyPI): every transport it has
(WebSockets, Server-Sent Events, long polling) with JSON, and MessagePack where the
transport carries binary, against a real `ringhub serve` with JWT authentication.

signalrcore 1.0.2's long polling is limited on the client side, so it is tested apart,
for what the client can do: it sends no Authorization header on its polls (an
authenticated server answers them 401, as ASP.NET Core would), it takes one record per
poll answer and keeps the rest until another answer arrives (servers batch what is
queued into one answer, ASP.NET Core too), and it splits MessagePack on 0x1E. So its
test runs against a server without `--jwt-secret`, with JSON, one message in flight.

Azure SignalR Service's serverless mode (`--access-key`): signalrcore follows an app's
negotiate redirect to ringhub's client endpoint over WebSockets (AzureRedirectTest says
why not the others) and hears REST sends signed with the access key.

Run: RINGHUB_BIN=target/debug/ringhub python3 -m unittest tests/python/test_signalrcore.py
"""

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

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


def jwt(claims: dict, key: str = SECRET) -> str:
    """An HS256 token, as a backend would sign it (or an Azure app with its access key)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"exp": int(time.time()) + 3600, **claims}).encode())
    signature = hmac.new(key.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def wait_for(predicate, seconds=10.0, what="condition"):
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Server:
    """`ringhub serve` on a free loopback port, two shards."""

    def __init__(self, authenticated=True, command=(BINARY, "serve"), extra=()):
        self.authenticated = authenticated
        self.data = tempfile.mkdtemp(prefix="ringhub-py-")
        secret = ["--jwt-secret", SECRET] if authenticated else []
        # A ping every second: signalrcore's stop() closes its socket and then waits for
        # its receiving thread, which wakes only when something arrives.
        self.process = subprocess.Popen(
            [*command, "--listen", "127.0.0.1:0", "--threads", "2",
             "--keepalive-secs", "1", "--client-timeout-secs", "5",
             "--data", self.data, *secret, *extra],
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

    def __init__(self, server, user, transport, msgpack=False, hub="chat", url=None):
        options = {"transport": transport}
        if server.authenticated:
            token = jwt({"sub": user, "groups": ["*"]})
            options["access_token_factory"] = lambda: token
        builder = HubConnectionBuilder().with_url(url or f"{server.base}/hubs/{hub}", options=options)
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


ACCESS_KEY = "python-access-key-0123456789"


class App:
    """An app's negotiate endpoint, as an Azure Functions app writes it (as in
    azure.test.mjs): `POST /{hub}/negotiate?user=U` answers `{url, accessToken}`, sending
    the client to ringhub's client endpoint with a token signed with the access key (the
    user id in `nameid`).

    The token's `aud` is the client URL without its port, as Azure's SDKs write it
    (Microsoft.Azure.SignalR's ServiceEndpoint: `{scheme}://{host}/` then
    `client/?hub=...`). ringhub compares host names only: those SDKs sign without the
    port, and signalrcore's WebSocket sends `Host: 127.0.0.1` without it too (before
    ringhub ignored ports, both were refused on any port but the scheme's)."""

    def __init__(self, service, key=ACCESS_KEY):
        class Negotiate(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                url = urllib.parse.urlsplit(self.path)
                hub = url.path.split("/")[1]
                if not url.path.endswith("/negotiate"):
                    self.send_error(404)
                    return
                user = urllib.parse.parse_qs(url.query).get("user", [None])[0]
                client_url = f"{service}/client/?hub={hub}"
                audience = f"{service.rsplit(':', 1)[0]}/client/?hub={hub}"
                token = jwt({"aud": audience, **({"nameid": user} if user else {})}, key)
                body = json.dumps({"url": client_url, "accessToken": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Negotiate)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}"

    def stop(self):
        self.http.shutdown()
        self.http.server_close()


def azure_rest(server, method, path_and_query, body=None):
    """A call to Azure's REST API, signed with the access key (`aud` the request URL
    without its query); returns the status."""
    url = f"{server.base}{path_and_query}"
    token = jwt({"aud": url.split("?")[0]}, ACCESS_KEY)
    request = urllib.request.Request(
        url, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class AzureRedirectTest(unittest.TestCase):
    """signalrcore through an app's negotiate redirect to ringhub's client endpoint, as
    against Azure SignalR Service's serverless mode, and REST sends signed with the access
    key reaching it.

    signalrcore 1.0.2 follows a redirect by itself (hub/negotiation.py): on an answer with
    `url` and `accessToken` it makes no second negotiate, but opens its transport at the
    redirect URL with `Authorization: Bearer <accessToken>`. That is a connection without
    a negotiate id, which SignalR allows for WebSockets only: its Server-Sent Events GET
    the URL without `id` (ringhub answers 400, "Connection ID required", as ASP.NET Core
    does), and its long polling polls with the access token as the `id` and without the
    Authorization header (401). Neither can connect through a redirect, to Azure or
    ringhub alike, so only WebSockets are tested here (JSON and MessagePack)."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server(authenticated=False, extra=("--access-key", ACCESS_KEY))
        cls.app = App(cls.server.base)

    @classmethod
    def tearDownClass(cls):
        cls.app.stop()
        assert cls.server.stop() == 0

    def test_websockets_through_the_redirect_hear_rest_sends_and_echo(self):
        for msgpack in (False, True):
            with self.subTest(msgpack=msgpack):
                ann = Client(self.server, "ann", HttpTransportType.web_sockets, msgpack,
                             url=f"{self.app.base}/chat?user=ann")
                bob = Client(self.server, "bob", HttpTransportType.web_sockets, msgpack,
                             url=f"{self.app.base}/chat?user=bob")
                try:
                    self.assertEqual(ann.invoke("Echo", [{"n": 1, "s": "héllo"}]), {"n": 1, "s": "héllo"})
                    status = azure_rest(self.server, "POST", "/api/hubs/chat/users/ann/:send?api-version=2024-12-01",
                                        {"target": "receive", "arguments": ["to ann", msgpack]})
                    self.assertEqual(status, 202)
                    wait_for(lambda: ann.received, what="the send to ann")
                    self.assertEqual(azure_rest(self.server, "POST", "/api/v1/hubs/chat/users/bob",
                                                {"target": "receive", "arguments": ["to bob"]}), 202)
                    wait_for(lambda: bob.received, what="the send to bob")
                    time.sleep(0.2)
                    # Each connection's user is its token's `nameid`: each send reached one.
                    self.assertEqual(ann.received, [["to ann", msgpack]])
                    self.assertEqual(bob.received, [["to bob"]])
                    self.assertEqual(bob.invoke("Echo", ["back"]), "back")
                finally:
                    ann.stop()
                    bob.stop()

    def test_a_client_or_rest_call_without_the_access_key_is_refused(self):
        """The redirect's token is what lets the client in, and the access key what signs
        a REST call: signed with another key, both are refused."""
        forger = App(self.server.base, key="not-the-key")
        try:
            with self.assertRaisesRegex(Exception, "401"):
                Client(self.server, "eve", HttpTransportType.web_sockets, url=f"{forger.base}/chat?user=eve")
        finally:
            forger.stop()
        url = f"{self.server.base}/api/hubs/chat/users/ann/:send?api-version=2024-12-01"
        forged = jwt({"aud": url.split("?")[0]}, "not-the-key")
        request = urllib.request.Request(url, method="POST", data=b'{"target":"receive","arguments":[]}',
                                         headers={"Authorization": f"Bearer {forged}", "Content-Type": "application/json"})
        with self.assertRaises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        self.assertEqual(refused.exception.code, 401)

if __name__ == "__main__":
    unittest.main()
