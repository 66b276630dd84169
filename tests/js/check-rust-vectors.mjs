// (b) Decodes what ringhub's Rust encoder wrote (protocol/tests/interop.rs writes
// rust-vectors.json) with the stock client's own hub protocols and checks every field.
import { readFileSync } from "node:fs";
import { deepStrictEqual, strictEqual } from "node:assert/strict";
import { JsonHubProtocol, NullLogger } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import { messages, jsonOnly, TYPE, fromHex } from "./messages.mjs";

const path = process.env.RINGHUB_INTEROP_DIR
  ? `${process.env.RINGHUB_INTEROP_DIR}/rust-vectors.json`
  : new URL("../../target/interop/rust-vectors.json", import.meta.url);
const vectors = JSON.parse(readFileSync(path, "utf8"));
const specs = new Map([...messages, ...jsonOnly].map((m) => [m.name, m]));

// Fields a protocol leaves out or fills in on its own: absent = undefined = empty.
function normalize(message, protocol) {
  const out = {};
  for (const [key, value] of Object.entries(message)) {
    if (value === undefined || value === null && key === "error") continue;
    if (key === "headers" && Object.keys(value).length === 0) continue;
    if (key === "streamIds" && (value.length === 0 || protocol === "messagepack")) continue; // the msgpack client drops them
    if (key === "allowReconnect" && value === false) continue;
    out[key] = value;
  }
  return out;
}

const protocols = { json: new JsonHubProtocol(), messagepack: new MessagePackHubProtocol() };
let passed = 0;
let failed = 0;
for (const [protocolName, protocol] of Object.entries(protocols)) {
  const names = Object.keys(vectors[protocolName] ?? {});
  if (names.length !== specs.size) {
    console.error(`${protocolName}: expected ${specs.size} vectors, found ${names.length}`);
    failed++;
  }
  for (const name of names) {
    const spec = specs.get(name);
    try {
      if (!spec) throw new Error(`unknown vector ${name}`);
      const bytes = fromHex(vectors[protocolName][name]);
      const input = protocolName === "json" ? Buffer.from(bytes).toString("utf8") : bytes.buffer;
      const parsed = protocol.parseMessages(input, NullLogger.instance);
      // Servers never send these to clients; both client protocols drop them.
      const ignoredByClient = [TYPE.StreamInvocation, TYPE.CancelInvocation].includes(spec.message.type);
      if (ignoredByClient) {
        strictEqual(parsed.length, 0, "the client ignores this type");
      } else {
        strictEqual(parsed.length, 1, "exactly one message");
        const expected = spec.expect?.[protocolName] ?? spec.message;
        deepStrictEqual(normalize(parsed[0], protocolName), normalize(expected, protocolName));
      }
      passed++;
    } catch (e) {
      failed++;
      console.error(`FAIL ${protocolName}/${name}: ${e.message}`);
    }
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
