// The messages exchanged in the interop vectors, as the JS client models them.
// `message` is what gen-vectors.mjs hands to the client's writeMessage; the Rust test
// (protocol/tests/interop.rs) holds its own copy of every message under the same name
// and compares field by field. `expect` gives what a protocol's parseMessages must
// yield from ringhub's encoding where it differs from `message` (JSON has no binary
// or dates, so ringhub writes base64 and ISO 8601 text there).

export const TYPE = { Invocation: 1, StreamItem: 2, Completion: 3, StreamInvocation: 4, CancelInvocation: 5, Ping: 6, Close: 7, Ack: 8, Sequence: 9 };

const allKinds = ["text", 42, -7, -200, 1.5, 0.1, 2 ** 40, true, false, null, { nested: [1, "two", { three: 3 }] }, [], {}];

export const messages = [
  { name: "invocation_nonblocking", message: { type: TYPE.Invocation, target: "Send", arguments: ["ann", "hi"] } },
  { name: "invocation_blocking_all_kinds", message: { type: TYPE.Invocation, invocationId: "7", target: "Echo", arguments: allKinds } },
  { name: "invocation_with_headers", message: { type: TYPE.Invocation, invocationId: "8", target: "Echo", arguments: [1], headers: { tenant: "a", trace: "b" } } },
  { name: "invocation_with_stream_ids", message: { type: TYPE.Invocation, invocationId: "9", target: "Upload", arguments: [], streamIds: ["10", "11"] } },
  { name: "invocation_unicode", message: { type: TYPE.Invocation, target: "Say", arguments: ["héllo € 😀", "tab\tquote\"back\\slash\u001e"] } },
  {
    name: "invocation_binary_and_date",
    message: { type: TYPE.Invocation, target: "Bytes", arguments: [new Uint8Array([1, 2, 3]), new Date(Date.UTC(2024, 1, 29, 12, 34, 56, 789))] },
    expect: { json: { type: TYPE.Invocation, target: "Bytes", arguments: ["AQID", "2024-02-29T12:34:56.789Z"] } },
  },
  { name: "stream_item", message: { type: TYPE.StreamItem, invocationId: "3", item: { n: 42 } } },
  { name: "completion_result", message: { type: TYPE.Completion, invocationId: "0", result: [1, "x"] } },
  { name: "completion_null_result", message: { type: TYPE.Completion, invocationId: "1", result: null } },
  { name: "completion_void", message: { type: TYPE.Completion, invocationId: "2" } },
  { name: "completion_error", message: { type: TYPE.Completion, invocationId: "3", error: "Unknown hub method 'Foo'" } },
  { name: "stream_invocation", message: { type: TYPE.StreamInvocation, invocationId: "5", target: "Counter", arguments: [10, 500] } },
  { name: "cancel_invocation", message: { type: TYPE.CancelInvocation, invocationId: "5" } },
  { name: "ping", message: { type: TYPE.Ping } },
  { name: "close", message: { type: TYPE.Close } },
  { name: "ack", message: { type: TYPE.Ack, sequenceId: 12 } },
  { name: "sequence", message: { type: TYPE.Sequence, sequenceId: 5 } },
];

// Messages only the JSON client can write as-is (the MessagePack client always writes
// Close as [7, nil], dropping error and allowReconnect).
export const jsonOnly = [
  { name: "close_with_error", message: { type: TYPE.Close, error: "Connection closed with an error.", allowReconnect: true } },
];

export const toHex = (bytes) => Buffer.from(bytes).toString("hex");
export const fromHex = (hex) => new Uint8Array(Buffer.from(hex, "hex"));
