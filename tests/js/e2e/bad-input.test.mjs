// Bad input closes only the offending connection, with a clear error; the server keeps
// serving everyone else.
import { after, before, test } from "node:test";
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";
import { createConnection } from "node:net";
import { bodyOf, clientFrame, connect, raw, serverFrames, sleep, startServer, statusOf, until, upgradeRequest } from "./helpers.mjs";

let server;
const RS = "\u001e";

before(async () => {
  server = await startServer(["--threads", "2", "--max-message-bytes", "1000", "--max-buffered-bytes", "65536"]);
});
after(async () => {
  await server.stop();
});

async function stillServes() {
  const c = await connect(server.base);
  strictEqual(await c.invoke("Echo", "alive"), "alive");
  await c.stop();
}

/** Upgrades, sends `frames` after the handshake (if any) and returns the server frames. */
async function session(frames, { handshake = `{"protocol":"json","version":1}${RS}`, ms = 500 } = {}) {
  const parts = [Buffer.from(upgradeRequest("/hubs/chat"))];
  if (handshake !== null) parts.push(clientFrame(handshake));
  parts.push(...frames);
  const response = await raw(server.base, Buffer.concat(parts), ms);
  strictEqual(statusOf(response), 101);
  return serverFrames(bodyOf(response));
}

test("garbage HTTP gets 400 and the connection is closed", async () => {
  const response = await raw(server.base, "\x00\x01\x02 nonsense\r\n\r\n");
  strictEqual(statusOf(response), 400);
  const huge = await raw(server.base, `GET / HTTP/1.1\r\nX: ${"a".repeat(20000)}\r\n\r\n`);
  strictEqual(statusOf(huge), 431);
  await stillServes();
});

test("a bad handshake is answered with the reference error", async () => {
  const frames = await session([], { handshake: `{"protocol":"xml","version":1}${RS}` });
  strictEqual(frames[0].text, `{"error":"The protocol 'xml' is not supported."}${RS}`);
  strictEqual(frames[1].opcode, 8, "then a close frame");
  const malformed = await session([], { handshake: `not json${RS}` });
  strictEqual(malformed[0].text, `{"error":"An unexpected error occurred during connection handshake."}${RS}`);
  await stillServes();
});

/** The status code of the WebSocket close frame among `frames`. */
const closeCode = (frames) => frames.find((f) => f.opcode === 8)?.code;

test("invalid JSON closes with a Close message saying why, then close code 1007", async () => {
  const frames = await session([clientFrame(`{"type":1,"target":${RS}`)]);
  strictEqual(frames[0].text, `{}${RS}`, "handshake accepted first");
  const close = JSON.parse(frames.find((f) => f.text.includes('"type":7')).text.slice(0, -1));
  ok(close.error.startsWith("Connection closed with an error. invalid JSON hub message"), close.error);
  strictEqual(closeCode(frames), 1007, "invalid payload data");
  await stillServes();
});

test("a message over --max-message-bytes closes with an error naming the limit", async () => {
  const big = JSON.stringify({ type: 1, target: "Echo", arguments: ["x".repeat(2000)] }) + RS;
  const frames = await session([clientFrame(big)]);
  const close = JSON.parse(frames.find((f) => f.text.includes('"type":7')).text.slice(0, -1));
  ok(close.error.includes("1000"), close.error);
  strictEqual(closeCode(frames), 1009, "message too big");
  await stillServes();
});

test("an unmasked frame closes the connection", async () => {
  const unmasked = Buffer.concat([Buffer.from([0x81, 0x05]), Buffer.from("hello")]);
  const frames = await session([unmasked]);
  const close = JSON.parse(frames.find((f) => f.text.includes('"type":7')).text.slice(0, -1));
  ok(close.error.includes("not masked"), close.error);
  strictEqual(closeCode(frames), 1002, "protocol error");
  await stillServes();
});

test("invalid UTF-8 in a text frame closes with 1007; a client's own close is answered with 1000", async () => {
  const frames = await session([clientFrame(Buffer.from([0x7b, 0xff, 0xfe, 0x7d, 0x1e]))]);
  strictEqual(closeCode(frames), 1007);
  const normal = await session([clientFrame(Buffer.from([0x03, 0xe8]), { opcode: 8 })]);
  strictEqual(closeCode(normal), 1000);
  await stillServes();
});

test("an abrupt socket close in the middle of a message harms nobody", async () => {
  const socket = createConnection({ host: new URL(server.base).hostname, port: Number(new URL(server.base).port) });
  await new Promise((resolve) => socket.on("connect", resolve));
  socket.write(upgradeRequest("/hubs/chat"));
  socket.write(clientFrame(`{"protocol":"json","version":1}${RS}`));
  socket.write(clientFrame(`{"type":1,"target":"Echo","argu`).subarray(0, 10));
  await sleep(50);
  socket.destroy();
  await stillServes();
});

// The slow-consumer test is in engine/tests/e2e.rs: it needs a client socket with a
// small receive buffer, which Node cannot set, or loopback buffers tens of MB first.
