//! Hub messages from a client, whatever carried them: parsed from the bytes a
//! transport collected, invoked on the shard's hub, answered with Completions.

use std::rc::Rc;

use bytes::{Buf, BytesMut};
use ringhub_protocol::hub::{CompletionOutcome, HubMessage, Invocation};

use crate::api::Call;
use crate::metrics::ShardMetrics;
use crate::session::Session;
use crate::shard::state::ShardState;

/// What the client's messages so far ask of its session.
#[derive(Debug, PartialEq, Eq)]
pub enum Dispatched {
    /// Keep reading.
    More,
    /// The client sent a Close message.
    ClientClosed,
    /// The bytes are not a valid hub message: the session ends with this error.
    BadInput(String),
}

/// The error a session is closed with for input it cannot take.
pub fn bad_input(error: impl std::fmt::Display) -> String {
    format!("Connection closed with an error. {error}")
}

/// Handles every complete hub message in `hub_bytes` (leaving a partial one there).
pub async fn handle_records(
    state: &Rc<ShardState>,
    session: &Rc<Session>,
    hub_bytes: &mut BytesMut,
) -> Dispatched {
    let protocol = session.protocol();
    let max_message = state.node.config.max_message_bytes;
    loop {
        let (message, used) = match protocol.split_record(hub_bytes, max_message) {
            Ok(Some(record)) => (protocol.parse(record.body), record.consumed),
            Ok(None) => return Dispatched::More,
            Err(e) => return Dispatched::BadInput(bad_input(e)),
        };
        hub_bytes.advance(used);
        match message {
            Ok(Some(message)) => {
                // Boxed: a connection waits in its read far longer than it handles
                // messages, so the task is sized for the read and this is allocated
                // per message instead (idle connections hold less memory).
                if Box::pin(handle_message(state, session, message)).await {
                    return Dispatched::ClientClosed;
                }
            }
            Ok(None) => {}
            Err(e) => return Dispatched::BadInput(bad_input(e)),
        }
    }
}

/// Handles one hub message; true if it was the client's Close.
async fn handle_message(
    state: &Rc<ShardState>,
    session: &Rc<Session>,
    message: HubMessage,
) -> bool {
    ShardMetrics::add(&state.metrics().messages_received, 1);
    match message {
        HubMessage::Invocation(invocation) => {
            invoke(state, session, invocation).await;
            false
        }
        HubMessage::StreamInvocation(invocation) => {
            if let Some(id) = invocation.invocation_id {
                let error = format!(
                    "The client attempted to invoke the non-streaming '{}' method with a streaming invocation.",
                    invocation.target
                );
                complete(session, id, CompletionOutcome::Error(error));
            }
            false
        }
        HubMessage::Close(_) => true,
        // Pings only reset the timeout; client results, upload streams, cancellation and
        // stateful-reconnect acks have nothing to act on here.
        _ => false,
    }
}

async fn invoke(state: &Rc<ShardState>, session: &Rc<Session>, invocation: Invocation) {
    let Invocation {
        invocation_id,
        target,
        arguments,
        ..
    } = invocation;
    let call = Call {
        caller: &session.caller,
        method: &target,
        arguments,
        context: &state.context,
    };
    let result = state.hub.invoke(call).await;
    // What the method sent went to every shard's inbox, this one's too: queue it for
    // this shard's recipients (the caller among them) before the Completion.
    state.drain_inbox();
    if let Some(id) = invocation_id {
        let outcome = match result {
            Ok(value) => CompletionOutcome::Result(value),
            Err(e) => CompletionOutcome::Error(e.client_message()),
        };
        complete(session, id, outcome);
    }
}

fn complete(session: &Session, invocation_id: String, outcome: CompletionOutcome) {
    let completion = HubMessage::completion(invocation_id, outcome);
    session.enqueue(&session.encode(&completion));
}
