//! The ceiling peer for the fan-out benchmark: the least work possible on io_uring to
//! accept a WebSocket, take the SignalR handshake and `JoinGroup`, and write one
//! preformatted frame to every member of a group on `SendToGroup`. No validation, no
//! authorization, no limits, no timers, one thread: it marks what this machine can do,
//! not a server anyone should run.
//!
//! `ceiling-peer 127.0.0.1:5092`

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::task::Waker;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::{TcpListener, TcpStream};
use ringhub_protocol::http::accept_key;
use ringhub_protocol::ws::{self, FrameDecoder, WsEvent, WsLimits};

/// One connection's pending output, flushed in one write per turn.
#[derive(Default)]
struct Peer {
    out: RefCell<Vec<u8>>,
    waker: RefCell<Option<Waker>>,
    closed: std::cell::Cell<bool>,
}

impl Peer {
    fn push(&self, frame: &[u8]) {
        self.out.borrow_mut().extend_from_slice(frame);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

type Groups = Rc<RefCell<HashMap<String, Vec<Rc<Peer>>>>>;

/// The text between `start` and the next `"` after it.
fn quoted_after<'a>(body: &'a [u8], start: &[u8]) -> Option<&'a [u8]> {
    let at = memmem::find(body, start)? + start.len();
    let len = memchr::memchr(b'"', &body[at..])?;
    Some(&body[at..at + len])
}

fn text_frame(payload: &[u8]) -> Bytes {
    ws::encode_frame(ws::Opcode::Text, payload)
}

fn completion(id: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(b"{\"type\":3,\"invocationId\":\"");
    body.extend_from_slice(id);
    body.extend_from_slice(b"\",\"result\":null}\x1e");
    text_frame(&body)
}

async fn writer(peer: Rc<Peer>, mut socket: monoio::io::OwnedWriteHalf<TcpStream>) {
    let mut spare = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            if peer.closed.get() || !peer.out.borrow().is_empty() {
                std::task::Poll::Ready(())
            } else {
                *peer.waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
        if peer.closed.get() {
            return;
        }
        std::mem::swap(&mut *peer.out.borrow_mut(), &mut spare);
        let (result, written) = socket.write_all(std::mem::take(&mut spare)).await;
        spare = written;
        spare.clear();
        if result.is_err() {
            return;
        }
    }
}

/// Reads more of the request into `buf`; false at the end of the stream.
async fn read_more(reader: &mut impl AsyncReadRent, buf: &mut BytesMut) -> bool {
    ringhub_bench::client::read(reader, buf).await.is_ok()
}

async fn serve(stream: TcpStream, groups: Groups) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut socket) = stream.into_split();
    let mut input = BytesMut::with_capacity(4096);
    let head_end = loop {
        if let Some(end) = memmem::find(&input, b"\r\n\r\n") {
            break end;
        }
        if !read_more(&mut reader, &mut input).await {
            return;
        }
    };
    let key = memmem::find(&input[..head_end], b"ec-WebSocket-Key: ").and_then(|at| {
        let at = at + 18;
        let len = memchr::memchr(b'\r', &input[at..])?;
        Some(&input[at..at + len])
    });
    let Some(key) = key else {
        return;
    };
    let key = String::from_utf8_lossy(key).trim().to_owned();
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key.as_bytes())
    );
    let _ = input.split_to(head_end + 4);
    if socket.write_all(response.into_bytes()).await.0.is_err() {
        return;
    }
    let peer = Rc::new(Peer::default());
    monoio::spawn(writer(peer.clone(), socket));
    let mut decoder = FrameDecoder::new(WsLimits {
        max_message_bytes: 1 << 20,
    });
    let mut records = BytesMut::new();
    let mut handshaken = false;
    let mut joined: Vec<String> = Vec::new();
    'session: loop {
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(WsEvent::Data { payload, .. })) => records.extend_from_slice(&payload),
                Ok(Some(WsEvent::Close(_))) | Err(_) => break 'session,
                Ok(Some(_)) => {}
                Ok(None) => break,
            }
        }
        while let Some(end) = memchr::memchr(0x1e, &records) {
            let record = records.split_to(end + 1);
            let body = &record[..end];
            if !handshaken {
                handshaken = true;
                peer.push(&text_frame(b"{}\x1e"));
                continue;
            }
            let Some(target) = quoted_after(body, b"\"target\":\"") else {
                continue;
            };
            let group = quoted_after(body, b"\"arguments\":[\"").unwrap_or_default();
            match target {
                b"JoinGroup" => {
                    let name = String::from_utf8_lossy(group).into_owned();
                    groups
                        .borrow_mut()
                        .entry(name.clone())
                        .or_default()
                        .push(peer.clone());
                    joined.push(name);
                }
                b"SendToGroup" => {
                    // arguments: ["group","method",[args...]]: forward the inner array as is.
                    let Some(start) = memmem::find(body, b"\"arguments\":[\"") else {
                        continue;
                    };
                    let method = start + 14 + group.len() + 3;
                    let Some(method_len) = body.get(method..).and_then(|b| memchr::memchr(b'"', b))
                    else {
                        continue;
                    };
                    let args_at = method + method_len + 2;
                    let Some(args_end) = memchr::memrchr(b']', body) else {
                        continue;
                    };
                    if args_at >= args_end {
                        continue;
                    }
                    let mut message = Vec::with_capacity(64 + body.len());
                    message.extend_from_slice(b"{\"type\":1,\"target\":\"");
                    message.extend_from_slice(&body[method..method + method_len]);
                    message.extend_from_slice(b"\",\"arguments\":");
                    message.extend_from_slice(&body[args_at..args_end]);
                    message.extend_from_slice(b"}\x1e");
                    let frame = text_frame(&message);
                    if let Some(members) = groups.borrow().get(&*String::from_utf8_lossy(group)) {
                        for member in members {
                            member.push(&frame);
                        }
                    }
                }
                _ => {}
            }
            if let Some(id) = quoted_after(body, b"\"invocationId\":\"") {
                peer.push(&completion(id));
            }
        }
        if !read_more(&mut reader, &mut input).await {
            break;
        }
    }
    peer.closed.set(true);
    if let Some(waker) = peer.waker.borrow_mut().take() {
        waker.wake();
    }
    let mut groups = groups.borrow_mut();
    for name in joined {
        if let Some(members) = groups.get_mut(&name) {
            members.retain(|m| !Rc::ptr_eq(m, &peer));
        }
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5092".into());
    let mut runtime = ringhub_engine::runtime::io_uring_runtime(4096).expect("io_uring runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(&addr).expect("bind");
        eprintln!("ceiling peer on {addr}");
        let groups: Groups = Rc::default();
        while let Ok((stream, _)) = listener.accept().await {
            monoio::spawn(serve(stream, groups.clone()));
        }
    });
}
