//! A minimal blocking SignalR-over-WebSocket client on raw sockets, for tests that need
//! control a real client library does not give (small receive buffers, not reading,
//! counting allocations).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ringhub_engine::{Config, Hub, MemoryStore, Server, ServerBuilder};
use ringhub_protocol::ws::{encode_client_frame, Opcode};

/// A server with `config` on a free loopback port and a memory store, ready to accept.
pub fn start(config: Config) -> Server {
    ready(builder(config))
}

/// A one-shard server running the embedder's `hub`, ready to accept.
#[allow(dead_code)] // not every test file has a hub of its own
pub fn start_with_hub<H: Hub>(hub: impl Fn() -> H + Send + Sync + 'static) -> Server {
    ready(
        builder(Config {
            threads: 1,
            ..Config::default()
        })
        .hub(hub),
    )
}

/// `config` on a free loopback port, durable membership in memory.
fn builder(config: Config) -> ServerBuilder {
    ServerBuilder::new(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    })
    .membership_store(MemoryStore::default())
}

fn ready(builder: ServerBuilder) -> Server {
    let server = builder.start().expect("server starts");
    wait_ready(&server);
    server
}

/// A server with `threads` shards and otherwise default settings, ready to accept.
pub fn start_with_shards(threads: usize) -> Server {
    start(Config {
        threads,
        ..Config::default()
    })
}

fn wait_ready(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.is_ready() {
        assert!(Instant::now() < deadline, "server not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP request on its own connection (`Connection: close`): (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response[response.find("\r\n\r\n").unwrap() + 4..].to_owned();
    (status, body)
}

/// Negotiates a connection on hub `test`: (token, connection id).
pub fn negotiate(addr: SocketAddr) -> (String, String) {
    let (_, body) = http(addr, "POST", "/hubs/test/negotiate?negotiateVersion=1", "");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let field = |name: &str| json[name].as_str().unwrap().to_owned();
    (field("connectionToken"), field("connectionId"))
}

pub struct RawClient {
    pub stream: TcpStream,
    pending: Vec<u8>,
}

/// A masked text frame with a JSON hub message.
pub fn text_frame(json: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_client_frame(
        Opcode::Text,
        true,
        format!("{json}\u{1e}").as_bytes(),
        [7, 7, 7, 7],
        &mut out,
    );
    out.to_vec()
}

impl RawClient {
    /// Negotiates first, so the connection id is known: `(client, connection id)`.
    pub fn connect_negotiated(addr: SocketAddr) -> (RawClient, String) {
        let (token, id) = negotiate(addr);
        (
            Self::connect_path(addr, None, &format!("/hubs/test?id={token}")),
            id,
        )
    }

    /// Upgrades, handshakes (JSON) and returns once the handshake answer arrived.
    pub fn connect(addr: SocketAddr, recv_buffer: Option<usize>) -> RawClient {
        Self::connect_path(addr, recv_buffer, "/hubs/test")
    }

    pub fn connect_path(addr: SocketAddr, recv_buffer: Option<usize>, path: &str) -> RawClient {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        socket.connect(&addr.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        stream
            .write_all(&text_frame(r#"{"protocol":"json","version":1}"#))
            .unwrap();
        let mut client = RawClient {
            stream,
            pending: Vec::new(),
        };
        let head_end = client.read_until(|p| p.windows(4).position(|w| w == b"\r\n\r\n"));
        let head: Vec<u8> = client.pending.drain(..head_end + 4).collect();
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        assert_eq!(client.next_message(), "{}", "handshake accepted");
        client
    }

    pub fn send(&mut self, json: &str) {
        self.stream.write_all(&text_frame(json)).unwrap();
    }

    fn read_some(&mut self, chunk: &mut [u8]) -> std::io::Result<usize> {
        read_some(&mut self.stream, chunk)
    }

    fn read_until(&mut self, mut found: impl FnMut(&[u8]) -> Option<usize>) -> usize {
        loop {
            if let Some(at) = found(&self.pending) {
                return at;
            }
            let mut chunk = [0u8; 65536];
            let n = self.read_some(&mut chunk).expect("read");
            assert!(n > 0, "connection closed");
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next hub message (JSON text without the separator), across frames.
    /// Panics at end of stream.
    pub fn next_message(&mut self) -> String {
        self.try_next_message()
            .expect("a message before end of stream")
    }

    /// The next hub message, or `None` at end of stream (or a close frame).
    pub fn try_next_message(&mut self) -> Option<String> {
        loop {
            // Take one whole server frame off the front, if there is one.
            if self.pending.len() >= 2 {
                let opcode = self.pending[0] & 0x0f;
                let (len, at) = match self.pending[1] & 0x7f {
                    126 if self.pending.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.pending[2], self.pending[3]])),
                        4,
                    ),
                    127 if self.pending.len() >= 10 => (
                        u64::from_be_bytes(self.pending[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n if n < 126 => (usize::from(n), 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.pending.len() >= at + len {
                    let payload: Vec<u8> = self.pending[at..at + len].to_vec();
                    self.pending.drain(..at + len);
                    if opcode == 8 {
                        return None;
                    }
                    let text = String::from_utf8(payload).unwrap();
                    // One message per frame from ringhub.
                    return Some(text.trim_end_matches('\u{1e}').to_owned());
                }
            }
            let mut chunk = [0u8; 65536];
            match self.read_some(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Invokes a method and waits for its Completion, skipping other messages.
    pub fn invoke(&mut self, id: &str, target: &str, args: &str) -> String {
        self.send(&format!(
            r#"{{"type":1,"invocationId":"{id}","target":"{target}","arguments":{args}}}"#
        ));
        loop {
            let message = self.next_message();
            if message.contains(&format!(r#""invocationId":"{id}""#)) {
                return message;
            }
        }
    }
}

/// `addr` as `/proc/net/tcp` writes it (IPv4 only, which is what the tests use).
fn proc_net_address(addr: std::net::SocketAddr) -> String {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            )
        }
        std::net::SocketAddr::V6(_) => panic!("the tests listen on IPv4"),
    }
}

/// Whether this process (where the test's server runs) still holds a descriptor of the
/// server's end of `client`'s connection. Exact whatever other tests open meanwhile: the
/// server's socket is found by its addresses, then among this process's descriptors.
pub fn server_end_open(client: &TcpStream) -> bool {
    server_end_open_between(
        client.local_addr().expect("bound"),
        client.peer_addr().expect("connected"),
    )
}

/// [`server_end_open`] for a connection from `client` to `server` (once the client's
/// socket is gone).
pub fn server_end_open_between(client: std::net::SocketAddr, server: std::net::SocketAddr) -> bool {
    let (local, remote) = (proc_net_address(server), proc_net_address(client));
    let table = std::fs::read_to_string("/proc/self/net/tcp").expect("/proc/self/net/tcp");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[2] == remote && f[9] != "0")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .any(|target| inodes.iter().any(|i| target.to_str() == Some(i)))
}

/// One read, again when a signal interrupted it (a read with a timeout set returns EINTR
/// after its process was stopped and continued, even without a handler).
pub fn read_some(stream: &mut impl Read, chunk: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match stream.read(chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
