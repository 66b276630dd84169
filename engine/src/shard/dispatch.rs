//! Hub messages from a client, whatever carried them: parsed from the bytes a
//! transport collected, invoked on the shard's hub, answered with Completions.

use std::rc::Rc;

use std::task::Context;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use ringhub_protocol::hub::{Completion, CompletionOutcome, HubMessage, Invocation, StreamItem};
use ringhub_protocol::ws::close_code;
use ringhub_protocol::Value;

use crate::api::{Call, ContextError, HubContext, HubError};
use crate::client_results;
use crate::metrics::ShardMetrics;
use crate::session::calls::{Job, Upload, UploadReceiver, UploadSender, MAX_STREAMS, MAX_UPLOADS};
use crate::session::replay::Incoming;
use crate::session::Session;
use crate::shard::state::ShardState;
use crate::signal::Signal;

/// What the client's messages so far ask of its session.
#[derive(Debug, PartialEq, Eq)]
pub enum Dispatched {
    /// Keep reading.
    More,
    /// The client sent a Close message.
    ClientClosed,
    /// The bytes are not a valid hub message: the session ends with this error.
    BadInput(BadInput),
}

/// Input a session cannot take: what its Close message says, and the WebSocket close
/// code (RFC 6455) that follows it on a WebSocket.
#[derive(Debug, PartialEq, Eq)]
pub struct BadInput {
    pub message: String,
    pub close_code: u16,
}

impl BadInput {
    pub fn new(error: impl std::fmt::Display, close_code: u16) -> BadInput {
        BadInput {
            message: format!("Connection closed with an error. {error}"),
            close_code,
        }
    }

    fn hub(error: ringhub_protocol::hub::MessageError) -> BadInput {
        let close_code = error.close_code();
        BadInput::new(error, close_code)
    }
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
            Err(e) => return Dispatched::BadInput(BadInput::hub(e)),
        };
        hub_bytes.advance(used);
        match message {
            Ok(Some(message)) => {
                match session.client_message(&message) {
                    Incoming::Process => {}
                    // Sent again after a resume, or before the client's Sequence.
                    Incoming::Ignore => continue,
                    Incoming::Invalid => {
                        return Dispatched::BadInput(BadInput::new(
                            "Sequence ID greater than amount of messages we've received.",
                            close_code::PROTOCOL_ERROR,
                        ))
                    }
                }
                // A client that does not read what it is sent gets nothing more handled
                // (its Completions would pile up) until its queue came down.
                session.uncongested().await;
                // Boxed: a connection waits in its read far longer than it handles
                // messages, so the task is sized for the read and this is allocated
                // per message instead (idle connections hold less memory).
                if Box::pin(handle_message(state, session, message)).await {
                    return Dispatched::ClientClosed;
                }
            }
            Ok(None) => {}
            Err(e) => return Dispatched::BadInput(BadInput::hub(e)),
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
        HubMessage::Invocation(invocation) => start_invocation(state, session, invocation).await,
        HubMessage::StreamInvocation(invocation) => start_stream(state, session, invocation),
        HubMessage::StreamItem(item) => {
            let sender = session.calls().upload(&item.invocation_id, false);
            // An item of a stream that is not open (ended, or never opened) is dropped, as
            // ASP.NET Core does.
            if let Some(sender) = sender {
                upload(session, sender, Upload::Item(item.item)).await;
            }
        }
        HubMessage::Completion(completion) => completed(state, session, completion).await,
        HubMessage::CancelInvocation(cancel) => {
            session.calls().cancel_stream(&cancel.invocation_id)
        }
        HubMessage::Close(_) => return true,
        HubMessage::Ack { sequence_id } => session.acknowledged(sequence_id),
        // Pings only reset the timeout; a Sequence was handled as the session's input.
        HubMessage::Ping | HubMessage::Sequence { .. } => {}
    }
    false
}

/// Opens the upload streams an invocation names; `None` (after answering the
/// invocation with an error) if one of their ids is already open.
fn open_uploads(
    state: &ShardState,
    session: &Session,
    invocation: &Invocation,
) -> Option<Vec<Option<UploadReceiver>>> {
    if invocation.stream_ids.is_empty() {
        return Some(Vec::new());
    }
    let opened = session.calls().open_uploads(&invocation.stream_ids);
    if opened.is_none() {
        if let Some(id) = invocation.invocation_id.clone() {
            let error = format!(
                "An upload stream id is already in use on this connection, or it would have more than {MAX_UPLOADS} upload streams."
            );
            complete(state, session, id, CompletionOutcome::Error(error));
        }
    }
    Some(opened?.into_iter().map(Some).collect())
}

/// Runs an invocation after the connection's earlier ones (see `session::calls`): at
/// once when none is running and it finishes at its first poll (a send with room, a
/// join: most do), else in the connection's invoker task. Waits while the queue is full.
async fn start_invocation(state: &Rc<ShardState>, session: &Rc<Session>, invocation: Invocation) {
    let Some(uploads) = open_uploads(state, session, &invocation) else {
        return;
    };
    let job: Job = Box::pin(invoke(state.clone(), session.clone(), invocation, uploads));
    let first = session.calls().run_or_queue(job);
    match first {
        Some(mut job) => {
            let proxy = session.calls().job_waker();
            let waker = futures_util::task::waker(proxy);
            if job
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
            {
                session.calls().finished_at_once();
            } else {
                monoio::spawn(invoker(session.clone(), job));
            }
        }
        None => {
            session
                .unless_ending(std::future::poll_fn(|cx| session.calls().poll_room(cx)))
                .await;
        }
    }
}

/// Runs a connection's invocations one after another, until none waits. It polls them
/// with the connection's job waker, which it has wake itself.
async fn invoker(session: Rc<Session>, mut job: Job) {
    let proxy = session.calls().job_waker();
    let waker = futures_util::task::waker(proxy.clone());
    loop {
        std::future::poll_fn(|cx| {
            proxy.register(cx.waker());
            job.as_mut().poll(&mut Context::from_waker(&waker))
        })
        .await;
        let next = session.calls().next_job();
        match next {
            Some(next) => job = next,
            None => return,
        }
    }
}

async fn invoke(
    state: Rc<ShardState>,
    session: Rc<Session>,
    invocation: Invocation,
    uploads: Vec<Option<UploadReceiver>>,
) {
    let Invocation {
        invocation_id,
        target,
        arguments,
        ..
    } = invocation;
    let context = state.context_of(&session);
    let call = call_of(
        &session,
        &context,
        &target,
        arguments,
        uploads,
        invocation_id.as_deref(),
    );
    let result = match state.hub(&session.caller.hub) {
        Some(hub) => hub.invoke(call).await,
        None => Err(HubError::UnknownMethod(target.clone())),
    };
    // What the method sent went to every shard's inbox, this one's too: queue it for
    // this shard's recipients (the caller among them) before the Completion.
    state.drain_inbox();
    if let Some(id) = invocation_id {
        let outcome = match result {
            Ok(value) => CompletionOutcome::Result(value),
            Err(e) => CompletionOutcome::Error(e.client_message()),
        };
        complete(&state, &session, id, outcome);
    }
}

/// What a hub method of `session` is handed.
fn call_of<'a>(
    session: &'a Session,
    context: &'a HubContext,
    method: &'a str,
    arguments: Vec<Value>,
    uploads: Vec<Option<UploadReceiver>>,
    invocation_id: Option<&'a str>,
) -> Call<'a> {
    Call {
        caller: &session.caller,
        method,
        arguments,
        context,
        uploads,
        invocation_id,
        protocol: session.protocol(),
    }
}

/// Starts a streaming invocation in a task of its own (a stream runs beside the
/// connection's other invocations, as in ASP.NET Core).
fn start_stream(state: &Rc<ShardState>, session: &Rc<Session>, invocation: Invocation) {
    let Some(id) = invocation.invocation_id.clone() else {
        return;
    };
    let Some(stop) = session.calls().start_stream(&id) else {
        let error = format!(
            "Too many streams on this connection (limit {MAX_STREAMS}), or one with the id '{id}' already."
        );
        complete(state, session, id, CompletionOutcome::Error(error));
        return;
    };
    let Some(uploads) = open_uploads(state, session, &invocation) else {
        session.calls().stream_ended(&id);
        return;
    };
    monoio::spawn(stream(
        state.clone(),
        session.clone(),
        invocation,
        uploads,
        stop,
    ));
}

/// Sends a streaming method's items as StreamItem messages, each once the caller's
/// queue has room (a slow reader slows its stream, as any publisher), then a
/// Completion: without a result when the stream ends or the client cancels it, with
/// the error when it fails.
async fn stream(
    state: Rc<ShardState>,
    session: Rc<Session>,
    invocation: Invocation,
    uploads: Vec<Option<UploadReceiver>>,
    stop: Signal,
) {
    let Invocation {
        invocation_id,
        target,
        arguments,
        ..
    } = invocation;
    let id = invocation_id.unwrap_or_default();
    let context = state.context_of(&session);
    let call = call_of(&session, &context, &target, arguments, uploads, Some(&id));
    let streamed = match state.hub(&session.caller.hub) {
        Some(hub) => hub.stream(call).await,
        None => Err(HubError::UnknownMethod(target.clone())),
    };
    let outcome = match streamed {
        Err(e) => CompletionOutcome::Error(e.client_message()),
        Ok(mut items) => {
            state.drain_inbox();
            let limit = state.node.config.message_limit();
            let watch = stop.watch();
            loop {
                session.uncongested().await;
                if session.closing_since().is_some() {
                    break CompletionOutcome::Void;
                }
                let Some(next) = watch.run(items.next()).await else {
                    // Cancelled by the client.
                    break CompletionOutcome::Void;
                };
                let item = match next {
                    None => break CompletionOutcome::Void,
                    Some(Err(e)) => break CompletionOutcome::Error(e.client_message()),
                    Some(Ok(item)) => item,
                };
                state.drain_inbox();
                let frame = session.encode(&HubMessage::StreamItem(StreamItem {
                    headers: Default::default(),
                    invocation_id: id.clone(),
                    item,
                }));
                if frame.len() > limit {
                    break CompletionOutcome::Error(format!(
                        "A stream item is too large (limit {limit} bytes once encoded)."
                    ));
                }
                if !session.enqueue(&frame, None) {
                    // Closing, or too far behind: the stream ends with the connection.
                    break CompletionOutcome::Void;
                }
            }
        }
    };
    session.calls().stream_ended(&id);
    // A copy: the call borrowed the id for as long as its stream lives.
    complete(&state, &session, id.clone(), outcome);
}

/// Hands an upload stream's item (or its end) to the method reading it, once its
/// buffer has room: until then the connection is not read.
async fn upload(session: &Session, sender: UploadSender, upload: Upload) {
    let room = std::future::poll_fn(|cx| sender.poll_room(cx));
    // Not wanted when the method stopped reading (it returned), nor when the session ends.
    if let Some(true) = session.unless_ending(room).await {
        sender.push(upload);
    }
}

/// A Completion from the client: the end of an upload stream, or the answer to a
/// client result (anything else is ignored).
async fn completed(state: &ShardState, session: &Session, completion: Completion) {
    let Completion {
        invocation_id,
        outcome,
        ..
    } = completion;
    let sender = session.calls().upload(&invocation_id, true);
    if let Some(sender) = sender {
        let end = match outcome {
            CompletionOutcome::Error(error) => Upload::Failed(error),
            _ => Upload::Completed,
        };
        upload(session, sender, end).await;
        return;
    }
    let Some(result_id) = client_results::parse_invocation_id(&invocation_id) else {
        return;
    };
    // Only the connection asked may answer.
    if !session.calls().answered(result_id) {
        return;
    }
    let answer = match outcome {
        CompletionOutcome::Result(value) => Ok(value),
        CompletionOutcome::Void => Ok(Value::Null),
        CompletionOutcome::Error(error) => Err(ContextError::ClientError(error)),
    };
    state.node.client_results.answer(result_id, answer);
}

/// Queues a Completion; a result too large for the session's queue becomes an error.
fn complete(
    state: &ShardState,
    session: &Session,
    invocation_id: String,
    outcome: CompletionOutcome,
) {
    let limit = state.node.config.message_limit();
    let mut frame = session.encode(&HubMessage::completion(invocation_id.clone(), outcome));
    if frame.len() > limit {
        let error = format!("The result is too large (limit {limit} bytes once encoded).");
        let completion = HubMessage::completion(invocation_id, CompletionOutcome::Error(error));
        frame = session.encode(&completion);
    }
    session.enqueue(&frame, None);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ringhub_protocol::frame::Framing;
    use ringhub_protocol::HubProtocol;

    use super::*;
    use crate::api::Caller;
    use crate::auth::{ClaimPatterns, SubClaimUserId};
    use crate::builtin::BuiltinHub;
    use crate::config::Config;
    use crate::fanout::FrameKind;
    use crate::node::Node;
    use crate::store::MemoryStore;

    /// A one-shard node with the built-in hub, and its shard's state: no listener, no
    /// sockets; the inbox is served by a task, as on a running shard.
    fn shard() -> Rc<ShardState> {
        let config = Config {
            threads: 1,
            ..Config::default()
        };
        let (store_jobs, _) = std::sync::mpsc::channel();
        let node = Arc::new(Node::new(
            config,
            Arc::new(SubClaimUserId),
            Arc::new(ClaimPatterns),
            Arc::new(MemoryStore::default()),
            store_jobs,
            None,
        ));
        let hubs = crate::api::hub::HubFactories {
            named: Vec::new(),
            any: Some(Arc::new(|| Box::new(BuiltinHub))),
        };
        let state = Rc::new(ShardState::new(0, node, hubs.make()));
        let inbox_state = state.clone();
        monoio::spawn(async move {
            let node = inbox_state.node.clone();
            node.inboxes[0].run(|c| inbox_state.handle(c)).await;
        });
        state
    }

    fn connect(state: &ShardState, id: &str) -> Rc<Session> {
        let caller = Rc::new(Caller {
            connection_id: id.into(),
            hub: "h".into(),
            user_id: None,
            claims: None,
            client_query: None,
        });
        let kind = FrameKind {
            protocol: HubProtocol::Json,
            framing: Framing::Raw,
        };
        let session = state.new_session(caller, kind, None, None);
        futures_executor::block_on(state.register(session.clone()));
        session
    }

    /// Everything queued for the session, as text (long-polling framing: bare records),
    /// once the invocations it made are done (they run beside its reading).
    async fn queued(session: &Session) -> String {
        while session.calls().is_running() {
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        if session.queued_bytes() == 0 {
            return String::new();
        }
        let (mut copied, mut batch) = (Vec::new(), Vec::new());
        session.next_batch(&mut copied, &mut batch).await;
        String::from_utf8(if batch.is_empty() {
            copied
        } else {
            batch.concat()
        })
        .unwrap()
    }

    fn records(text: &str) -> BytesMut {
        BytesMut::from(text.replace('|', "\u{1e}").as_bytes())
    }

    fn run(test: impl std::future::Future<Output = ()>) {
        let mut runtime = crate::runtime::io_uring_runtime(64).expect("io_uring");
        runtime.block_on(test);
    }

    #[test]
    fn messages_are_handled_in_order_and_a_send_precedes_its_completion() {
        run(async {
            let state = shard();
            let ann = connect(&state, "ann");
            let bob = connect(&state, "bob");
            let mut input = records(concat!(
                r#"{"type":1,"invocationId":"1","target":"JoinGroup","arguments":["g"]}|"#,
                r#"{"type":6}|"#,
                r#"{"type":1,"invocationId":"2","target":"SendToGroup","arguments":["g","m",[7]]}|"#,
                r#"{"type":1,"invocationId":"3","target":"Nope","arguments":[]}|"#,
                r#"{"type":1,"invocationId":"4","target":"Echo""#,
            ));
            assert_eq!(
                handle_records(&state, &ann, &mut input).await,
                Dispatched::More
            );
            assert_eq!(
                &input[..],
                br#"{"type":1,"invocationId":"4","target":"Echo""#,
                "a partial record waits for the rest"
            );
            assert_eq!(
                queued(&ann).await.replace('\u{1e}', "|"),
                concat!(
                    r#"{"type":3,"invocationId":"1","result":null}|"#,
                    r#"{"type":1,"target":"m","arguments":[7]}|"#,
                    r#"{"type":3,"invocationId":"2","result":null}|"#,
                    r#"{"type":3,"invocationId":"3","error":"Unknown hub method 'Nope'"}|"#,
                )
            );
            assert_eq!(queued(&bob).await, "", "bob is not in the group");
            input.extend_from_slice(b",\"arguments\":[5]}\x1e");
            assert_eq!(
                handle_records(&state, &ann, &mut input).await,
                Dispatched::More
            );
            assert_eq!(
                queued(&ann).await,
                "{\"type\":3,\"invocationId\":\"4\",\"result\":5}\u{1e}"
            );
        });
    }

    #[test]
    fn a_close_message_and_bad_input_end_the_session() {
        run(async {
            let state = shard();
            let ann = connect(&state, "ann");
            let mut close = records(r#"{"type":7}|{"type":1,"target":"Echo","arguments":[1]}|"#);
            assert_eq!(
                handle_records(&state, &ann, &mut close).await,
                Dispatched::ClientClosed
            );
            let mut bad = records(r#"{"type":"one"}|"#);
            let Dispatched::BadInput(bad) = handle_records(&state, &ann, &mut bad).await else {
                panic!("malformed input is refused");
            };
            assert!(
                bad.message.starts_with("Connection closed with an error."),
                "{bad:?}"
            );
            assert_eq!(bad.close_code, 1007, "invalid payload data");
            let mut huge = records(&format!("{}|", "x".repeat(40_000)));
            let Dispatched::BadInput(bad) = handle_records(&state, &ann, &mut huge).await else {
                panic!("an oversized message is refused");
            };
            assert!(bad.message.contains("32768"), "the limit is named: {bad:?}");
            assert_eq!(bad.close_code, 1009, "message too big");
        });
    }
}
