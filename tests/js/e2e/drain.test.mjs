// A node told to stop (SIGTERM) tells its clients to reconnect spread over the first
// part of the stop (about 500 per second per shard), not all in the same moment, and
// exits within --drain-secs.
import { test } from "node:test";
import { ok, strictEqual } from "node:assert/strict";
import { ONCE, connect, startServer, until } from "./helpers.mjs";

test("SIGTERM: 400 clients of one shard are told to reconnect over ~0.8 s, and the node exits within --drain-secs", { skip: ONCE, timeout: 120000 }, async () => {
  const server = await startServer(["--threads", "1", "--drain-secs", "10"]);
  const clients = [];
  const closedAt = [];
  try {
    for (let i = 0; i < 400; i++) {
      const client = await connect(server.base);
      client.onclose(() => closedAt.push(Date.now()));
      clients.push(client);
    }
    const stopped = Date.now();
    const exited = server.stop();
    await until(() => closedAt.length === clients.length, 15000, "every client told");
    const spread = Math.max(...closedAt) - Math.min(...closedAt);
    // At once (before), a client process takes ~200 ms to read 400 closes.
    ok(spread >= 600, `closes spread over ${spread} ms (at 500 a second: ~800 ms)`);
    ok(Math.min(...closedAt) - stopped < 2000, "the first clients are told at once");
    const code = await exited;
    ok(Date.now() - stopped < 10000, "exited within --drain-secs");
    strictEqual(code, 0);
    console.log(`# 400 closes over ${spread} ms; exited ${Date.now() - stopped} ms after SIGTERM`);
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await server.stop();
  }
});
