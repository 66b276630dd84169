// Helpers of the fault suite: what production does to a deployment, staged with real
// processes. Nodes run with default flags (no --node-name, default keep-alive and
// client timeout) unless a test says why; stock @microsoft/signalr clients reconnect as
// an application would configure them.
import { createConnection, createServer } from "node:net";
import { after, before } from "node:test";
import { HubConnectionBuilder, HttpTransportType, LogLevel } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import { freePort, sleep, startRedis, startServer, token } from "../e2e/helpers.mjs";

export const SECRET = "fault-secret";
export const API_KEY = "fault-key";
export const admin = (sub) => token({ sub, role: "admin" }, { secret: SECRET });

/** A node of a cluster on a fixed loopback port, so that it can be killed and started
 *  again with exactly the same flags, as a process manager does. */
/** Two nodes sharing a fresh redis-server, started before a file's tests and stopped
 *  after them with the clients the tests push to `clients`: `{ redis, a, b, clients }`,
 *  filled in once `before` ran. */
export function clusterOfTwo() {
  const cluster = { redis: null, a: null, b: null, clients: [] };
  before(async () => {
    cluster.redis = await startRedis();
    cluster.a = await clusterNode(cluster.redis.url);
    cluster.b = await clusterNode(cluster.redis.url);
  });
  after(async () => {
    await Promise.all(cluster.clients.map((c) => c.stop().catch(() => {})));
    await cluster.a?.stop();
    await cluster.b?.stop();
    await cluster.redis?.stop();
  });
  return cluster;
}

export async function clusterNode(redisUrl, { port, extra = [] } = {}) {
  const listenPort = port ?? (await freePort());
  const args = ["--redis", redisUrl, "--jwt-secret", SECRET, "--api-key", API_KEY, ...extra];
  const start = () => startServer(args, { listen: `127.0.0.1:${listenPort}` });
  const node = { port: listenPort, base: `http://127.0.0.1:${listenPort}`, server: await start() };
  node.log = () => node.server.log();
  /** SIGKILL, then the same command again (a new process: a new default node name). */
  node.crashAndRestart = async () => {
    node.server.child.kill("SIGKILL");
    await new Promise((resolve) => (node.server.child.exitCode !== null || node.server.child.signalCode !== null ? resolve() : node.server.child.on("exit", resolve)));
    node.server = await start();
    return Date.now();
  };
  /** SIGTERM (a graceful stop), then the same command again. */
  node.stopAndRestart = async () => {
    await node.server.stop();
    node.server = await start();
  };
  node.stop = () => node.server.stop();
  return node;
}

/** A stock client as an application builds it: automatic reconnect, and `setup` run on
 *  every (re)connection (an app joins its groups again in `onreconnected`). Records
 *  every `receive(value)`. */
export async function appClient(base, user, { msgpack = false, transport, setup = async () => {}, reconnectDelays = [0, 500, 1000, 2000, 2000, 2000, 2000, 2000, 2000, 2000], keepAliveMs } = {}) {
  const options = { accessTokenFactory: () => admin(user) };
  if (transport !== undefined) options.transport = transport;
  let builder = new HubConnectionBuilder()
    .withUrl(`${base}/hubs/chat`, options)
    .withAutomaticReconnect(reconnectDelays)
    .configureLogging(LogLevel.None);
  if (keepAliveMs !== undefined) builder = builder.withKeepAliveInterval(keepAliveMs);
  if (msgpack) builder = builder.withHubProtocol(new MessagePackHubProtocol());
  const connection = builder.build();
  connection.received = [];
  connection.closedWith = null;
  connection.reconnects = 0;
  connection.on("receive", (value) => connection.received.push(value));
  connection.onclose((error) => (connection.closedWith = error ?? "closed"));
  connection.onreconnected(async () => {
    connection.reconnects++;
    await setup(connection).catch(() => {});
  });
  await connection.start();
  await setup(connection);
  return connection;
}

export { HttpTransportType };

/** A REST call with the API key; resolves with status and parsed body. */
export async function rest(base, method, path, body) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(15000),
  });
  const text = await res.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = text;
  }
  return { status: res.status, body: parsed };
}

/** Waits until the async `predicate` holds; resolves with the milliseconds it took. */
export async function eventually(predicate, ms, what) {
  const started = Date.now();
  for (;;) {
    if (await predicate().catch(() => false)) return Date.now() - started;
    if (Date.now() - started > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** The status and parsed body of GET /readyz. */
export async function readiness(base) {
  const res = await fetch(`${base}/readyz`, { signal: AbortSignal.timeout(5000) });
  const text = await res.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { status: res.status, body };
}

/** A TCP proxy in front of `targets` (round-robin per connection), able to fail as
 *  networks do: `cut()` resets every connection (a restarted load balancer),
 *  `blackhole()` keeps every connection open but forwards nothing more in either
 *  direction and swallows new connections (a partition without RST, a frozen VM), and
 *  `heal()` forwards again for new connections. */
export async function tcpProxy(targets, { port } = {}) {
  const pairs = new Set();
  let next = 0;
  let holed = false;
  const parse = (base) => {
    const { hostname, port: p } = new URL(base.includes("://") ? base : `tcp://${base}`);
    return { host: hostname, port: Number(p) };
  };
  const server = createServer((client) => {
    client.on("error", () => {});
    if (holed) {
      // Accepted and never answered.
      pairs.add({ client, upstream: null, holed: true });
      client.pause();
      return;
    }
    const target = parse(targets[next++ % targets.length]);
    const upstream = createConnection(target);
    upstream.on("error", () => {});
    const pair = { client, upstream, holed: false };
    pairs.add(pair);
    const forward = (from, to) =>
      from.on("data", (chunk) => {
        if (!pair.holed) to.write(chunk);
      });
    forward(client, upstream);
    forward(upstream, client);
    const end = () => {
      if (pair.holed) return;
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    client.on("close", end);
    upstream.on("close", end);
  });
  await new Promise((resolve) => server.listen(port ?? 0, "127.0.0.1", resolve));
  const address = `127.0.0.1:${server.address().port}`;
  return {
    address,
    base: `http://${address}`,
    redisUrl: `redis://${address}`,
    setTargets(list) {
      targets = list;
    },
    cut() {
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy?.() ?? client.destroy();
        upstream?.destroy();
      }
      pairs.clear();
    },
    blackhole() {
      holed = true;
      for (const pair of pairs) pair.holed = true;
    },
    /** New connections are forwarded again; the black-holed ones stay dead until their
     *  owners give up on them (as after a real partition). */
    heal() {
      holed = false;
    },
    async close() {
      this.cut();
      for (const { client, upstream } of pairs) {
        client.destroy();
        upstream?.destroy();
      }
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

let senders = 0;
/** Sends `SendToGroup(group, "receive", "label:n")` from `client` every `everyMs` until
 *  stopped (n counts up from 0 per sender); `sent` counts what the server accepted (a
 *  Completion without error), `failed` what it did not. */
export function steadySender(client, group, everyMs = 10) {
  const state = { label: `s${senders++}`, sent: 0, failed: 0, running: true };
  state.done = (async () => {
    let n = 0;
    while (state.running) {
      try {
        await client.invoke("SendToGroup", group, "receive", [`${state.label}:${n}`]);
        state.sent++;
      } catch {
        state.failed++;
      }
      n++;
      if (everyMs > 0) await sleep(everyMs);
    }
  })();
  state.stop = async () => {
    state.running = false;
    await state.done;
  };
  return state;
}

/** The numbers of `label`'s messages that `client` received, in arrival order. */
export const numbersFrom = (client, label) =>
  client.received.filter((v) => typeof v === "string" && v.startsWith(`${label}:`)).map((v) => Number(v.slice(label.length + 1)));

/** Messages per second that `client` received over `ms`. */
export async function rateOver(client, ms) {
  const before = client.received.length;
  await sleep(ms);
  return ((client.received.length - before) * 1000) / ms;
}
