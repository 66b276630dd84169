// Shared helpers of the end-to-end tests: start `ringhub serve`, make tokens, connect
// stock @microsoft/signalr clients and collect what they receive.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { HubConnectionBuilder, HttpTransportType, LogLevel } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";

export const BINARY = process.env.RINGHUB_BIN ?? new URL("../../../target/debug/ringhub", import.meta.url).pathname;
/** The ward monitor embedding example (engine/examples/ward_monitor.rs). */
/** The typed hub example of the contract (engine/examples/typed_hub.rs). */
export const TYPED_HUB = process.env.RINGHUB_TYPED_HUB_BIN ?? new URL("../../../target/debug/examples/typed_hub", import.meta.url).pathname;
/** ringhub beside axum in one process (engine/examples/axum_embed.rs). */
export const AXUM_EMBED = process.env.RINGHUB_AXUM_EMBED_BIN ?? new URL("../../../target/debug/examples/axum_embed", import.meta.url).pathname;
export const WARD_MONITOR = process.env.RINGHUB_WARD_MONITOR_BIN ?? new URL("../../../target/debug/examples/ward_monitor", import.meta.url).pathname;

/** A fresh directory for a server's `--data`. */
export function tempDataDir() {
  return mkdtempSync(join(tmpdir(), "ringhub-e2e-"));
}

/** Starts a server on a free port; resolves once /healthz answers 200. Unless `args`
 *  name a `--data` directory, the server gets a fresh one. */
export async function startServer(args = [], { binary = BINARY, command = ["serve"], listen = "127.0.0.1:0", env = {} } = {}) {
  const data = args.includes("--data") ? [] : ["--data", tempDataDir()];
  const child = spawn(binary, [...command, "--listen", listen, ...data, ...args], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  const address = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`server did not start:\n${log}`));
    }, 20000);
    child.stderr.on("data", (chunk) => {
      log += chunk;
      // Colour codes (a logger writing to a terminal) would split `address=`.
      const match = /address=(\S+)/.exec(log.replace(/\x1b\[[0-9;]*m/g, ""));
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    child.on("exit", (code) => reject(new Error(`server exited with ${code}:\n${log}`)));
  });
  const base = `http://${address}`;
  for (let i = 0; i < 100; i++) {
    const res = await fetch(`${base}/healthz`).catch(() => null);
    if (res?.status === 200) break;
    await sleep(50);
  }
  return {
    base,
    child,
    log: () => log,
    async stop() {
      // Exited already (a test may kill it with a signal: then there is no exit code).
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode ?? child.signalCode;
      const exited = new Promise((resolve) => child.on("exit", resolve));
      child.kill("SIGTERM");
      return exited;
    },
  };
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const b64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT (or a tampered one, with `alg` and `secret` overrides). */
export function token(claims, { secret = "test-secret", alg = "HS256", expiresIn = 3600 } = {}) {
  const header = b64url(JSON.stringify({ alg, typ: "JWT" }));
  const body = b64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + expiresIn, ...claims }));
  if (alg === "none") return `${header}.${body}.`;
  const signature = createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${signature}`;
}

/** The transport every client of this run is held to: `RINGHUB_TRANSPORT` is
 *  `WebSockets`, `ServerSentEvents` or `LongPolling` (scripts/test.sh runs the suite once
 *  per transport); unset, the client picks (WebSockets first). */
export const TRANSPORT = process.env.RINGHUB_TRANSPORT;

/** For tests that use no client transport (raw HTTP, process limits): they run once,
 *  in the WebSockets run (or a run without RINGHUB_TRANSPORT), and are skipped with this
 *  reason in the others. */
export const ONCE = TRANSPORT && TRANSPORT !== "WebSockets" ? "independent of the transport: runs in the WebSockets run" : false;

/** The client's transport option for `msgpack` clients of this run. The JS client never
 *  sends MessagePack over Server-Sent Events (SSE carries text only), so in the SSE run
 *  MessagePack clients use WebSockets: a test that mixes protocols then also mixes
 *  transports, and no test is left out. */
function transportFor(msgpack) {
  if (!TRANSPORT) return undefined;
  if (msgpack && TRANSPORT === "ServerSentEvents") return HttpTransportType.WebSockets;
  return HttpTransportType[TRANSPORT];
}

/** A connected client that records every `receive(tag, ...)` it gets. */
export async function connect(base, { hub = "chat", msgpack = false, accessToken, skipNegotiation = false, transport } = {}) {
  const options = {};
  if (accessToken !== undefined) options.accessTokenFactory = () => accessToken;
  const forced = transport ?? transportFor(msgpack);
  if (forced !== undefined) options.transport = forced;
  if (skipNegotiation) {
    options.skipNegotiation = true;
    options.transport = HttpTransportType.WebSockets;
  }
  let builder = new HubConnectionBuilder().withUrl(`${base}/hubs/${hub}`, options).configureLogging(LogLevel.None);
  if (msgpack) builder = builder.withHubProtocol(new MessagePackHubProtocol());
  const connection = builder.build();
  const received = [];
  connection.on("receive", (...args) => {
    received.push(args);
  });
  await connection.start();
  connection.received = received;
  return connection;
}

/** Waits until `predicate()` holds (or fails after `ms`). */
export async function until(predicate, ms = 5000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** A counter or gauge from /metrics, summed over its labels (NaN if absent). */
export async function metric(base, name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const values = [...text.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\d+)$`, "gm"))].map((m) => Number(m[1]));
  return values.length ? values.reduce((sum, v) => sum + v, 0) : NaN;
}

/** Connections per shard, from /metrics. */
export async function connectionsPerShard(base) {
  const text = await (await fetch(`${base}/metrics`)).text();
  return [...text.matchAll(/^ringhub_connections\{shard="(\d+)"\} (\d+)$/gm)].map((m) => Number(m[2]));
}

/** Sends raw bytes to the server and resolves with what it answers until it closes
 *  the connection or `ms` pass. */
export async function raw(base, bytes, ms = 1000) {
  const { createConnection } = await import("node:net");
  const { hostname, port } = new URL(base);
  return new Promise((resolve, reject) => {
    const socket = createConnection({ host: hostname, port: Number(port) });
    const chunks = [];
    const done = () => {
      socket.destroy();
      resolve(Buffer.concat(chunks));
    };
    const timer = setTimeout(done, ms);
    socket.on("data", (chunk) => chunks.push(chunk));
    socket.on("end", () => {
      clearTimeout(timer);
      done();
    });
    socket.on("error", (e) => {
      clearTimeout(timer);
      if (e.code === "ECONNRESET") done();
      else reject(e);
    });
    socket.write(bytes);
  });
}

/** The text of a WebSocket upgrade request for `path`. */
export function upgradeRequest(path, headers = {}) {
  const lines = [
    `GET ${path} HTTP/1.1`,
    "Host: localhost",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`),
  ];
  return lines.join("\r\n") + "\r\n\r\n";
}

/** The status code of an HTTP response. */
export const statusOf = (response) => Number(/^HTTP\/1\.1 (\d{3})/.exec(response.toString("latin1"))?.[1]);

/** A masked client WebSocket frame (text by default). */
export function clientFrame(payload, { opcode = 1, fin = true } = {}) {
  const data = Buffer.from(payload);
  const mask = Buffer.from([0x12, 0x34, 0x56, 0x78]);
  let header;
  if (data.length < 126) {
    header = Buffer.from([(fin ? 0x80 : 0) | opcode, 0x80 | data.length]);
  } else if (data.length < 65536) {
    header = Buffer.alloc(4);
    header[0] = (fin ? 0x80 : 0) | opcode;
    header[1] = 0x80 | 126;
    header.writeUInt16BE(data.length, 2);
  } else {
    header = Buffer.alloc(10);
    header[0] = (fin ? 0x80 : 0) | opcode;
    header[1] = 0x80 | 127;
    header.writeBigUInt64BE(BigInt(data.length), 2);
  }
  const masked = Buffer.from(data.map((b, i) => b ^ mask[i % 4]));
  return Buffer.concat([header, mask, masked]);
}

/** The server frames in `bytes` (unmasked): opcode, payload as a string, and a close
 *  frame's status code. */
export function serverFrames(bytes) {
  const frames = [];
  let at = 0;
  while (at + 2 <= bytes.length) {
    const opcode = bytes[at] & 0x0f;
    let len = bytes[at + 1] & 0x7f;
    let start = at + 2;
    if (len === 126) {
      len = bytes.readUInt16BE(at + 2);
      start = at + 4;
    } else if (len === 127) {
      len = Number(bytes.readBigUInt64BE(at + 2));
      start = at + 10;
    }
    if (start + len > bytes.length) break;
    const payload = bytes.subarray(start, start + len);
    // A close frame's payload starts with its status code (RFC 6455), if it has one.
    const code = opcode === 8 && len >= 2 ? payload.readUInt16BE(0) : undefined;
    frames.push({ opcode, text: payload.toString("utf8"), code });
    at = start + len;
  }
  return frames;
}

/** The body of a raw HTTP response (after the head). */
export const bodyOf = (response) => response.subarray(response.indexOf("\r\n\r\n") + 4);

/** A free loopback TCP port (below 32768 is not guaranteed; the kernel picks). */
export async function freePort() {
  const { createServer } = await import("node:net");
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Starts Debian's `redis-server` (installed by .ci/run) on a free loopback port (or
 *  `port`); resolves once it answers PING. Without persistence by default: `restart()`
 *  kills it (data lost, as a Redis without persistence loses it) and starts it again on
 *  the same port. `persistent: true` keeps an append-only file synced on every write in
 *  a fresh directory, so that a killed Redis comes back with its data. `start()`
 *  starts it when it is not running; `pause()` and `resume()` stop and continue the
 *  process (SIGSTOP, SIGCONT: it keeps its connections and answers nothing). */
export async function startRedis({ persistent = false, port: fixedPort, started = true } = {}) {
  const port = fixedPort ?? (await freePort());
  const url = `redis://127.0.0.1:${port}`;
  const persistence = persistent
    ? ["--dir", tempDataDir(), "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    : ["--save", "", "--appendonly", "no"];
  const launch = () => spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", ...persistence], { stdio: "ignore" });
  const ping = async () => {
    const { createConnection } = await import("node:net");
    return new Promise((resolve) => {
      const socket = createConnection({ host: "127.0.0.1", port });
      socket.on("data", (d) => {
        socket.destroy();
        resolve(d.toString().startsWith("+PONG"));
      });
      socket.on("error", () => resolve(false));
      socket.write("PING\r\n");
    });
  };
  const ready = async () => {
    for (let i = 0; i < 200; i++) {
      if (await ping()) return;
      await sleep(25);
    }
    throw new Error("redis-server did not start (is it installed? .ci/run installs it)");
  };
  let child = null;
  const running = () => child !== null && child.exitCode === null && child.signalCode === null;
  const start = async () => {
    if (running()) return;
    child = launch();
    await ready();
  };
  if (started) await start();
  const kill = async () => {
    if (!running()) return;
    const exited = new Promise((resolve) => child.on("exit", resolve));
    child.kill("SIGCONT");
    child.kill("SIGKILL");
    await exited;
  };
  return {
    url,
    port,
    kill,
    start,
    async restart() {
      await kill();
      await start();
    },
    pause: () => child.kill("SIGSTOP"),
    resume: () => child.kill("SIGCONT"),
    stop: kill,
  };
}

/** A TCP load balancer in front of two nodes that sends every connection whose first
 *  request is a negotiate to `negotiateBase` and every other one to `otherBase`: the
 *  WebSocket of a client lands on another node than its negotiate. */
export async function splitProxy(negotiateBase, otherBase) {
  const { createServer, createConnection } = await import("node:net");
  const target = (base) => {
    const { hostname, port } = new URL(base);
    return { host: hostname, port: Number(port) };
  };
  const routed = { negotiate: 0, other: 0 };
  const sockets = new Set();
  const server = createServer((client) => {
    sockets.add(client);
    client.once("data", (first) => {
      const negotiate = first.toString("latin1").split("\r\n")[0].includes("/negotiate");
      routed[negotiate ? "negotiate" : "other"]++;
      const upstream = createConnection(target(negotiate ? negotiateBase : otherBase));
      sockets.add(upstream);
      upstream.write(first);
      client.pipe(upstream).pipe(client);
      const end = () => {
        client.destroy();
        upstream.destroy();
      };
      client.on("error", end);
      upstream.on("error", end);
      client.on("close", end);
      upstream.on("close", end);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    routed,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Runs `tests/js/e2e/trickle_reader.py` (a raw client with a 4 KiB receive buffer that
 *  takes `chunk` bytes every `everyMs`; 0: it stops reading once joined) in a process
 *  of its own, at its own pace. */
export function trickleReader(base, group, chunk = 81920, everyMs = 1500) {
  const { hostname, port } = new URL(base);
  const script = new URL("./trickle_reader.py", import.meta.url).pathname;
  const child = spawn("python3", [script, hostname, port, group, String(chunk), String(everyMs)], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", (chunk) => (out += chunk));
  return {
    child,
    joined: () => out.includes("joined"),
    taken: () => Number([...out.matchAll(/taken (\d+)/g)].pop()?.[1] ?? 0),
    closedAfter: () => {
      const m = /closed (-?\d+)/.exec(out);
      return m ? Number(m[1]) : null;
    },
    stop: () => child.kill("SIGKILL"),
  };
}

/** Notes when this test process itself did not run: every gap of at least `ms` between
 *  20 ms ticks (a busy or starved client process reads none of its sockets meanwhile,
 *  so a server may rightly see its readers stop). */
export function stallWatch(ms = 1000) {
  const stalls = [];
  let last = Date.now();
  const timer = setInterval(() => {
    const now = Date.now();
    if (now - last >= ms) stalls.push({ endedAt: now, lasted: now - last });
    last = now;
  }, 20);
  return {
    stalls,
    /** The longest stall that ended at most `withinMs` before `at`. */
    longestBefore: (at, withinMs) => Math.max(0, ...stalls.filter((s) => s.endedAt <= at && at - s.endedAt <= withinMs).map((s) => s.lasted)),
    stop: () => clearInterval(timer),
  };
}
