// Embedding beside tokio (engine/examples/axum_embed.rs): an axum handler in the same
// process sends to a room and asks a stock-client connection for an answer, through
// the HubContext.
import { test } from "node:test";
import { deepStrictEqual, strictEqual } from "node:assert/strict";
import { AXUM_EMBED, connect, startServer, until } from "./helpers.mjs";

test("an axum handler sends to a room and gets a connected client's answer through HubContext", { timeout: 60000 }, async () => {
  const server = await startServer(["--threads", "2", "--http-listen", "127.0.0.1:0"], { binary: AXUM_EMBED, command: [] });
  const clients = [];
  try {
    await until(() => /http_address=\S+/.test(server.log()), 10000, "axum to listen");
    const api = `http://${/http_address=(\S+)/.exec(server.log().replace(/\x1b\[[0-9;]*m/g, ""))[1]}`;
    const ann = await connect(server.base, { hub: "chat" });
    const bob = await connect(server.base, { hub: "chat", msgpack: true });
    clients.push(ann, bob);
    const heard = [];
    ann.on("message", (text) => heard.push(text));
    await ann.invoke("Join", "lobby");
    bob.on("Answer", (question) => `bob would like ${question}`);

    const posted = await fetch(`${api}/rooms/lobby/messages`, { method: "POST", body: "kettle is on" });
    strictEqual(posted.status, 202);
    await until(() => heard.length === 1, 5000, "the room's message");
    deepStrictEqual(heard, ["kettle is on"]);

    const asked = await fetch(`${api}/connections/${bob.connectionId}/ask?question=tea`);
    strictEqual(asked.status, 200);
    strictEqual(await asked.text(), "bob would like tea");
    const nobody = await fetch(`${api}/connections/nobody/ask?question=tea`);
    strictEqual(nobody.status, 404);
  } finally {
    await Promise.all(clients.map((c) => c.stop().catch(() => {})));
    await server.stop();
  }
});
