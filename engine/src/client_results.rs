//! Client results waiting for their answers, node-wide: whichever shard reads the
//! client's Completion (or sees its connection end) answers the waiter, on whatever
//! thread or runtime that waits (`HubContext::invoke_client`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;
use hashbrown::HashMap;
use ringhub_protocol::hub::msgpack;
use ringhub_protocol::{CompletionOutcome, HubMessage, Value};

use crate::api::types::ContextError;

/// What a client result comes to.
pub type Answer = Result<Value, ContextError>;

struct Waiting {
    reply: oneshot::Sender<Answer>,
    deadline: Instant,
    timeout: Duration,
}

#[derive(Default)]
pub struct ClientResults {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
}

/// The invocation id a client result's Invocation carries: its own namespace beside the
/// client's decimal ids (the server never reads an id the client chose as one of these).
pub fn invocation_id(id: u64) -> String {
    format!("r{id}")
}

/// The registry id of a client's Completion, if it answers a client result.
pub fn parse_invocation_id(invocation_id: &str) -> Option<u64> {
    invocation_id.strip_prefix('r')?.parse().ok()
}

/// What a client result came to, as the node holding the connection tells the node
/// that asked (`backplane::Answer::ClientResult`): a MessagePack Completion whose
/// invocation id names the kind of failure.
pub fn encode_answer(answer: &Answer) -> Bytes {
    let (kind, outcome) = match answer {
        Ok(value) => ("result", CompletionOutcome::Result(value.clone())),
        Err(ContextError::ClientError(text)) => ("client", CompletionOutcome::Error(text.clone())),
        Err(ContextError::ClientDisconnected(_)) => ("gone", CompletionOutcome::Void),
        Err(ContextError::ClientResultTimeout { .. }) => ("timeout", CompletionOutcome::Void),
        Err(other) => ("failed", CompletionOutcome::Error(other.to_string())),
    };
    let mut body = BytesMut::new();
    msgpack::encode_body(&HubMessage::completion(kind, outcome), &mut body);
    body.freeze()
}

/// [`encode_answer`] read back, for the connection asked and the timeout it was given.
pub fn decode_answer(body: &[u8], connection_id: &str, timeout: Duration) -> Answer {
    let malformed = || {
        Err(ContextError::Backplane(
            crate::api::types::BackplaneError::Remote("a malformed client result".into()),
        ))
    };
    let Ok(Some(HubMessage::Completion(completion))) = msgpack::parse(body) else {
        return malformed();
    };
    match (completion.invocation_id.as_str(), completion.outcome) {
        ("result", CompletionOutcome::Result(value)) => Ok(value),
        ("client", CompletionOutcome::Error(text)) => Err(ContextError::ClientError(text)),
        ("gone", _) => Err(ContextError::ClientDisconnected(connection_id.to_owned())),
        ("timeout", _) => Err(ContextError::ClientResultTimeout {
            secs: timeout.as_secs(),
        }),
        ("failed", CompletionOutcome::Error(text)) => Err(ContextError::Backplane(
            crate::api::types::BackplaneError::Remote(text),
        )),
        _ => malformed(),
    }
}

impl ClientResults {
    /// A new waiter, answered within `timeout` at the latest.
    pub fn register(&self, timeout: Duration) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            reply,
            deadline: Instant::now() + timeout,
            timeout,
        };
        self.lock().insert(id, waiting);
        (id, answer)
    }

    /// Answers waiter `id` (nothing if it was answered, timed out or given up).
    pub fn answer(&self, id: u64, answer: Answer) {
        if let Some(waiting) = self.take(id) {
            let _ = waiting.reply.send(answer);
        }
    }

    /// Gives up waiter `id` without an answer (the invocation could not be delivered).
    pub fn forget(&self, id: u64) {
        self.take(id);
    }

    /// Answers every waiter whose time is up with a timeout (once a second, by one shard:
    /// the lock is not contended).
    pub fn expire(&self, now: Instant) {
        let expired: Vec<Waiting> = {
            let mut waiting = self.lock();
            let ids: Vec<u64> = waiting
                .iter()
                .filter(|(_, w)| w.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| waiting.remove(id)).collect()
        };
        for waiting in expired {
            let secs = waiting.timeout.as_secs();
            let _ = waiting
                .reply
                .send(Err(ContextError::ClientResultTimeout { secs }));
        }
    }

    fn take(&self, id: u64) -> Option<Waiting> {
        self.lock().remove(&id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        // A panic while holding it cannot leave the map inconsistent (single calls).
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_is_answered_once_and_times_out_otherwise() {
        let results = ClientResults::default();
        let (first, answer) = results.register(Duration::from_secs(30));
        results.answer(first, Ok(Value::Int(4)));
        results.answer(first, Ok(Value::Int(5)));
        assert_eq!(
            futures_executor::block_on(answer).unwrap(),
            Ok(Value::Int(4))
        );
        let (_, late) = results.register(Duration::from_millis(10));
        results.expire(Instant::now());
        assert_eq!(results.lock().len(), 1, "not due yet");
        results.expire(Instant::now() + Duration::from_secs(1));
        assert_eq!(
            futures_executor::block_on(late).unwrap(),
            Err(ContextError::ClientResultTimeout { secs: 0 })
        );
        assert_eq!(results.lock().len(), 0);
    }

    #[test]
    fn answers_cross_nodes_whole() {
        let timeout = Duration::from_secs(30);
        for answer in [
            Ok(Value::Array(vec![Value::Int(1), Value::Str("two".into())])),
            Err(ContextError::ClientError(
                "Client didn't provide a result.".into(),
            )),
            Err(ContextError::ClientDisconnected("c1".into())),
            Err(ContextError::ClientResultTimeout { secs: 30 }),
        ] {
            let body = encode_answer(&answer);
            assert_eq!(decode_answer(&body, "c1", timeout), answer);
        }
        assert!(decode_answer(b"junk", "c1", timeout).is_err());
    }

    #[test]
    fn invocation_ids_have_their_own_namespace() {
        assert_eq!(parse_invocation_id(&invocation_id(42)), Some(42));
        assert_eq!(parse_invocation_id("42"), None, "a client's own id");
        assert_eq!(parse_invocation_id("r"), None);
    }
}
