// (a) Encodes every interop message with the stock client's own hub protocols and
// writes vectors/js-vectors.json for the Rust tests to decode.
import { writeFileSync } from "node:fs";
import { JsonHubProtocol } from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";
import { messages, jsonOnly, toHex } from "./messages.mjs";

const json = new JsonHubProtocol();
const msgpack = new MessagePackHubProtocol();
const out = { json: {}, messagepack: {} };
for (const { name, message } of [...messages, ...jsonOnly]) {
  out.json[name] = toHex(Buffer.from(json.writeMessage(message), "utf8"));
}
for (const { name, message } of messages) {
  out.messagepack[name] = toHex(new Uint8Array(msgpack.writeMessage(message)));
}
const path = new URL("./vectors/js-vectors.json", import.meta.url);
writeFileSync(path, JSON.stringify(out, null, 1) + "\n");
console.log(`wrote ${Object.keys(out.json).length} JSON and ${Object.keys(out.messagepack).length} MessagePack vectors`);
