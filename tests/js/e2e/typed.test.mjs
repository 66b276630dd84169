// The typed hub of the contract (section 9, engine/examples/typed_hub.rs), driven by the
// stock @microsoft/signalr client over the run's transport, with JSON and MessagePack:
// typed methods and their argument errors, a stream to the client (and its cancel), a
// stream from the client (and its error), client results across shards and nodes,
// groups.
import { test } from "node:test";
import { deepStrictEqual, ok, rejects, strictEqual } from "node:assert/strict";
import { Subject } from "@microsoft/signalr";
import { TYPED_HUB, connect, sleep, startRedis, startServer, until } from "./helpers.mjs";

const PROTOCOLS = [false, true];
const name = (msgpack) => (msgpack ? "MessagePack" : "JSON");

async function withServer(args, run) {
  const server = await startServer(["--threads", "2", ...args], { binary: TYPED_HUB, command: [] });
  const clients = [];
  const open = async (msgpack, base = server.base) => {
    const client = await connect(base, { hub: "typed", msgpack });
    clients.push(client);
    return client;
  };
  try {
    await run(server, open);
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await server.stop();
  }
}

/** Everything a `connection.stream` yields, and how it ended. */
function collect(stream) {
  const seen = { items: [], done: false, error: null };
  seen.subscription = stream.subscribe({
    next: (item) => seen.items.push(item),
    complete: () => (seen.done = true),
    error: (e) => (seen.error = e),
  });
  return seen;
}

for (const msgpack of PROTOCOLS) {
  test(`typed methods (${name(msgpack)}): results, and a wrong argument count or type is a Completion error naming the method while the connection stays`, { timeout: 60000 }, async () => {
    await withServer([], async (server, open) => {
      const client = await open(msgpack);
      strictEqual(await client.invoke("Add", 2, 40), 42);
      strictEqual(await client.invoke("add", -5, 3), -2, "method names match case-insensitively");
      await rejects(client.invoke("Add", 1), /Failed to invoke 'Add'.*expected 2 arguments, got 1/);
      await rejects(client.invoke("Add", "one", 2), /Failed to invoke 'Add'.*argument 1/);
      await rejects(client.invoke("Nope"), /Unknown hub method 'Nope'/);
      await rejects(client.invoke("Counter", 3, 1), /streaming 'Counter' method with a non-streaming invocation/);
      strictEqual(await client.invoke("Add", 1, 1), 2, "the connection stayed");
      const elsewhere = await fetch(`${server.base}/hubs/chat/negotiate?negotiateVersion=1`, { method: "POST" });
      strictEqual(elsewhere.status, 404, "only hub typed is served");
    });
  });

  test(`a stream to the client (${name(msgpack)}): every item in order then completion; a cancel stops it and the connection goes on`, { timeout: 60000 }, async () => {
    await withServer([], async (server, open) => {
      const client = await open(msgpack);
      const counted = collect(client.stream("Counter", 5, 10));
      await until(() => counted.done || counted.error, 10000, "the stream to complete");
      strictEqual(counted.error, null);
      deepStrictEqual(counted.items, [0, 1, 2, 3, 4]);

      const endless = collect(client.stream("Counter", 100000, 20));
      await until(() => endless.items.length >= 3, 10000, "three items");
      endless.subscription.dispose();
      const atCancel = endless.items.length;
      await sleep(300);
      ok(endless.items.length <= atCancel + 1, `no more items after the cancel (${atCancel} then ${endless.items.length})`);
      // The server stopped it: a second stream and a call are served at once.
      const again = collect(client.stream("Counter", 2, 1));
      await until(() => again.done, 5000, "a new stream");
      deepStrictEqual(again.items, [0, 1]);
      await rejects(
        new Promise((resolve, reject) => client.stream("Add", 1, 2).subscribe({ next: resolve, complete: resolve, error: reject })),
        /non-streaming 'Add' method with a streaming invocation/,
      );
      strictEqual(await client.invoke("Add", 1, 2), 3);
    });
  });

  test(`a stream from the client (${name(msgpack)}): Sum of a Subject, and a client-side error reaches the method`, { timeout: 60000 }, async () => {
    await withServer([], async (server, open) => {
      const client = await open(msgpack);
      const numbers = new Subject();
      const sum = client.invoke("Sum", numbers);
      let expected = 0;
      for (let n = 1; n <= 100; n++) {
        numbers.next(n);
        expected += n;
      }
      numbers.complete();
      strictEqual(await sum, expected);

      const failing = new Subject();
      const failed = client.invoke("Sum", failing);
      failing.next(1);
      failing.error(new Error("the sensor went away"));
      await rejects(failed, /the sensor went away/);

      // An argument the method does not take beside its stream is an argument error.
      // (Two Subjects in a row would not do: the JS client's _replaceStreamingParams
      // skips the argument after each stream it takes out, sending it as an object.)
      await rejects(client.invoke("Sum", 5, new Subject()), /Failed to invoke 'Sum'.*expected 0 arguments, got 1/);
      strictEqual(await client.invoke("Add", 2, 2), 4, "the connection stayed");
    });
  });

  test(`client results (${name(msgpack)}): Ask gets another connection's answer on any shard, and fails when it has no handler, throws, or is gone`, { timeout: 60000 }, async () => {
    await withServer([], async (server, open) => {
      const asker = await open(msgpack);
      // Several answerers: negotiate spreads them over both shards.
      const answerers = [];
      for (let i = 0; i < 4; i++) {
        const answerer = await open(!msgpack);
        answerer.on("Answer", (question) => `${i} says yes to ${question}`);
        answerers.push(answerer);
      }
      for (const [i, answerer] of answerers.entries()) {
        strictEqual(await asker.invoke("Ask", answerer.connectionId, "tea?"), `${i} says yes to tea?`);
      }
      // Its own connection: answered while the Ask runs (invocations run beside reading).
      asker.on("Answer", async (question) => {
        await sleep(50);
        return `me: ${question}`;
      });
      strictEqual(await asker.invoke("Ask", asker.connectionId, "myself?"), "me: myself?");

      const silent = await open(msgpack);
      await rejects(asker.invoke("Ask", silent.connectionId, "hello?"), /Client didn't provide a result/);
      const throwing = await open(msgpack);
      throwing.on("Answer", () => {
        throw new Error("not now");
      });
      await rejects(asker.invoke("Ask", throwing.connectionId, "now?"), /not now/);
      const leaving = await open(msgpack);
      let asked = false;
      leaving.on("Answer", () => {
        asked = true;
        return new Promise(() => {});
      });
      const pending = asker.invoke("Ask", leaving.connectionId, "still there?");
      await until(() => asked, 5000, "the question to arrive");
      await leaving.stop();
      await rejects(pending, /disconnected/);
      await rejects(asker.invoke("Ask", "no-such-connection", "anyone?"), /does not exist/);
      strictEqual(await asker.invoke("Add", 3, 4), 7, "the connection stayed");
    });
  });

  test(`groups (${name(msgpack)}): Say reaches the group with the caller's connection id`, { timeout: 60000 }, async () => {
    await withServer([], async (server, open) => {
      const speaker = await open(msgpack);
      const listener = await open(!msgpack);
      const outsider = await open(msgpack);
      const heard = [];
      listener.on("said", (from, text) => heard.push([from, text]));
      const overheard = [];
      outsider.on("said", (from, text) => overheard.push([from, text]));
      await listener.invoke("JoinGroup", "tea");
      await speaker.invoke("Say", "tea", "kettle on");
      await until(() => heard.length === 1, 5000, "the group send");
      deepStrictEqual(heard, [[speaker.connectionId, "kettle on"]]);
      await sleep(100);
      deepStrictEqual(overheard, []);
    });
  });
}

test("a client result crosses nodes: Ask on one node reaches a connection on another through Redis", { timeout: 60000 }, async () => {
  const redis = await startRedis();
  const nodes = [];
  const clients = [];
  try {
    for (const name of ["typed-a", "typed-b"]) {
      nodes.push(await startServer(["--redis", redis.url, "--node-name", name, "--threads", "2"], { binary: TYPED_HUB, command: [] }));
    }
    const asker = await connect(nodes[0].base, { hub: "typed" });
    const answerer = await connect(nodes[1].base, { hub: "typed", msgpack: true });
    clients.push(asker, answerer);
    answerer.on("Answer", (question) => `from the other node: ${question}`);
    // Presence of the other node's connection reaches this one within a moment.
    let answer = null;
    const deadline = Date.now() + 10000;
    while (answer === null && Date.now() < deadline) {
      answer = await asker.invoke("Ask", answerer.connectionId, "cross?").catch(async (e) => {
        if (!/does not exist/.test(e.message)) throw e;
        await sleep(100);
        return null;
      });
    }
    strictEqual(answer, "from the other node: cross?");
    answerer.off("Answer");
    answerer.on("Answer", () => {
      throw new Error("no, from afar");
    });
    await rejects(asker.invoke("Ask", answerer.connectionId, "again?"), /no, from afar/);
    answerer.off("Answer");
    let asked = false;
    answerer.on("Answer", () => {
      asked = true;
      return new Promise(() => {});
    });
    const pending = asker.invoke("Ask", answerer.connectionId, "and now?");
    await until(() => asked, 5000, "the question to cross");
    await answerer.stop();
    await rejects(pending, /Connection '.*' disconnected/);
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await Promise.all(nodes.map((n) => n.stop()));
    await redis.stop();
  }
});
