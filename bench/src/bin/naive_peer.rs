//! The typical approach, as a peer for the fan-out benchmark: tokio + tokio-tungstenite,
//! a SignalR subset (JSON protocol: handshake, JoinGroup, SendToGroup, Completion),
//! one locked group map, and each message serialized once per recipient. Written as a
//! competent engineer would with these libraries, without ringhub's tricks.
//!
//! `naive-peer 127.0.0.1:5091` (single-threaded runtime, so it can be pinned to a core).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Members = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<Message>)>>>>;

fn record(value: &Value) -> Message {
    let mut text = value.to_string();
    text.push('\u{1e}');
    Message::Text(text)
}

async fn serve(stream: TcpStream, id: u64, groups: Members) {
    let _ = stream.set_nodelay(true);
    let ws = match tokio_tungstenite::accept_async(stream).await {
        Ok(ws) => ws,
        Err(error) => {
            eprintln!("accept failed: {error}");
            return;
        }
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut handshaken = false;
    while let Some(message) = source.next().await {
        let message = match message {
            Ok(message) => message,
            Err(_) => break,
        };
        let Message::Text(text) = message else {
            continue;
        };
        for part in text.split('\u{1e}').filter(|p| !p.is_empty()) {
            let Ok(value) = serde_json::from_str::<Value>(part) else {
                return;
            };
            if !handshaken {
                handshaken = true;
                let _ = tx.send(Message::Text("{}\u{1e}".into()));
                continue;
            }
            let args = value["arguments"].as_array().cloned().unwrap_or_default();
            match value["target"].as_str() {
                Some("JoinGroup") => {
                    let group = args
                        .first()
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    groups
                        .lock()
                        .unwrap()
                        .entry(group)
                        .or_default()
                        .push((id, tx.clone()));
                }
                Some("SendToGroup") => {
                    let group = args.first().and_then(Value::as_str).unwrap_or("");
                    let target = args.get(1).cloned().unwrap_or(Value::Null);
                    let payload = args.get(2).cloned().unwrap_or(json!([]));
                    let members = groups
                        .lock()
                        .unwrap()
                        .get(group)
                        .cloned()
                        .unwrap_or_default();
                    for (_, member) in members {
                        // Serialized per recipient: the usual way with a message per channel.
                        let _ = member.send(record(
                            &json!({"type": 1, "target": target, "arguments": payload}),
                        ));
                    }
                }
                _ => {}
            }
            if let Some(invocation_id) = value["invocationId"].as_str() {
                let _ = tx.send(record(
                    &json!({"type": 3, "invocationId": invocation_id, "result": null}),
                ));
            }
        }
    }
    for members in groups.lock().unwrap().values_mut() {
        members.retain(|(member, _)| *member != id);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5091".into());
    let listener = TcpListener::bind(&addr).await.expect("bind");
    eprintln!("naive peer on {addr}");
    let groups: Members = Arc::default();
    let mut next = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        next += 1;
        tokio::spawn(serve(stream, next, groups.clone()));
    }
}
