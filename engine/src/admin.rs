//! The node's own endpoints: liveness (`/healthz`), readiness (`/readyz`), metrics
//! (`/metrics`) and the REST document (`/api/openapi.json`). They are answered on
//! `--listen`, or, with `--admin-listen`, metrics and the document move to an address
//! of their own (a port not exposed to clients), served by a small thread here: admin
//! traffic is a scrape every few seconds, so plain blocking I/O serves it without
//! touching a shard.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringhub_protocol::http::{self as wire, HttpLimits};

use crate::node::Node;

/// One of the node's own endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
}

impl Endpoint {
    pub fn of(path: &str) -> Option<Endpoint> {
        Some(match path {
            "/healthz" => Endpoint::Healthz,
            "/readyz" => Endpoint::Readyz,
            "/metrics" => Endpoint::Metrics,
            "/api/openapi.json" => Endpoint::OpenApi,
            _ => return None,
        })
    }

    /// Whether it moves to `--admin-listen` when that is set.
    pub fn is_admin_only(self) -> bool {
        matches!(self, Endpoint::Metrics | Endpoint::OpenApi)
    }
}

/// The complete answer to `method` on `endpoint` (HEAD: the head only).
pub fn answer(node: &Node, endpoint: Endpoint, method: &str, keep_alive: bool) -> Vec<u8> {
    if !matches!(method, "GET" | "HEAD") {
        return wire::response(
            405,
            "text/plain",
            &[("Allow", "GET, HEAD")],
            b"method not allowed",
            keep_alive,
        );
    }
    let (status, content_type, body) = match endpoint {
        Endpoint::Healthz if node.is_ready() => (200, "text/plain", b"ok".to_vec()),
        Endpoint::Healthz => (503, "text/plain", b"starting".to_vec()),
        Endpoint::Readyz => match node.readiness() {
            Ok(()) => (200, "application/json", br#"{"status":"ready"}"#.to_vec()),
            Err(reason) => (
                503,
                "application/json",
                serde_json::json!({ "reason": reason })
                    .to_string()
                    .into_bytes(),
            ),
        },
        Endpoint::Metrics => (
            200,
            "text/plain; version=0.0.4",
            node.metrics
                .render(node.presence.nonempty_groups())
                .into_bytes(),
        ),
        Endpoint::OpenApi => (
            200,
            "application/json",
            crate::rest::OPENAPI.as_bytes().to_vec(),
        ),
    };
    let response = wire::response(status, content_type, &[], &body, keep_alive);
    if method == "HEAD" {
        head_only(response)
    } else {
        response
    }
}

/// An answer without its body (HEAD: the same head, as load balancers check it).
fn head_only(mut answer: Vec<u8>) -> Vec<u8> {
    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
        answer.truncate(end + 4);
    }
    answer
}

/// The admin listener's thread, stopped by [`AdminServer::stop`].
pub struct AdminServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl AdminServer {
    /// Binds `address` and serves the node's own endpoints there from a thread.
    pub fn start(address: SocketAddr, node: Arc<Node>) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("ringhub-admin".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let node = node.clone();
                    // A connection of its own each: a slow scraper holds up no other.
                    let _ = std::thread::Builder::new()
                        .name("ringhub-admin-request".into())
                        .spawn(move || serve(stream, &node));
                }
            })?;
        Ok(AdminServer { address, stop })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Ends the thread (a connection to itself wakes its accept).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
    }
}

/// Answers the requests of one admin connection (keep-alive), each head within 10 s.
fn serve(mut stream: TcpStream, node: &Node) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let (method, path, keep_alive, used) = loop {
            match wire::parse_request_head(&buffer, HttpLimits::default()) {
                Ok(Some((head, used))) => {
                    break (
                        head.method.clone(),
                        head.path.clone(),
                        head.keep_alive(),
                        used,
                    )
                }
                Ok(None) => {}
                Err(e) => {
                    let answer = wire::response(
                        e.status(),
                        "text/plain",
                        &[],
                        e.to_string().as_bytes(),
                        false,
                    );
                    let _ = stream.write_all(&answer);
                    return;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        buffer.drain(..used);
        let answer = match Endpoint::of(&path) {
            Some(endpoint) => self::answer(node, endpoint, &method, keep_alive),
            None => wire::response(404, "text/plain", &[], b"not found", keep_alive),
        };
        if stream.write_all(&answer).is_err() || !keep_alive {
            return;
        }
    }
}
