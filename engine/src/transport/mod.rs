//! The transports that carry sessions, and the HTTP around them: `http` routes
//! requests (CORS, health, metrics, REST, negotiate, transports) and hands requests for
//! another shard's token to that shard; `negotiate` hands out connection tokens;
//! `websocket`, `sse` and `long_polling` carry a session each their way; `channel`
//! is what SSE and long polling share (POST sends, the handshake, disposal); `flush`
//! writes the streaming transports' sockets, once per loop turn; `io` holds the socket
//! reads and writes. Helpers used by several of them live here.

pub mod channel;
pub mod flush;
pub mod http;
pub mod io;
pub mod long_polling;
pub mod negotiate;
pub mod sse;
pub mod websocket;

use base64::Engine;
use ringhub_protocol::http::{self as wire, RequestHead};

use std::borrow::Cow;

use crate::api::types::HubRoutes;
use crate::auth::{Audience, Claims};
use crate::node::Node;

/// A `text/plain` answer.
pub fn text_response(status: u16, body: &str, keep_alive: bool) -> Vec<u8> {
    wire::response(
        status,
        "text/plain; charset=utf-8",
        &[],
        body.as_bytes(),
        keep_alive,
    )
}

/// The client's address for the connection logs, looked up only while they are on (it
/// costs a system call).
pub fn remote_for_logs(
    reader: &monoio::io::OwnedReadHalf<monoio::net::TcpStream>,
) -> Option<std::net::SocketAddr> {
    if tracing::enabled!(tracing::Level::DEBUG) {
        reader.peer_addr().ok()
    } else {
        None
    }
}

/// A random URL-safe id (connection ids and tokens: 16 random bytes, as ASP.NET Core).
pub fn random_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// Where a transport request goes: a hub's path, `/hubs/{hub}` (and `/negotiate` under
/// it), or Azure SignalR Service's client endpoint, `/client/?hub={hub}` (and
/// `/client/negotiate?hub=`), where hub names are case-insensitive (lower-cased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoint<'a> {
    pub hub: Cow<'a, str>,
    pub negotiate: bool,
    /// Azure's client endpoint: clients show tokens signed with an access key.
    pub azure: bool,
}

impl HubEndpoint<'_> {
    /// The endpoint of a request's path, if it is one of a served hub: a hub's path
    /// (`/hubs/{name}`, or one mapped to it) or Azure's client endpoint
    /// (`/client/?hub=`, hub names lower-cased as Azure does).
    pub fn of<'a>(routes: &'a HubRoutes, head: &'a RequestHead) -> Option<HubEndpoint<'a>> {
        let path = head.path.as_str();
        if is_client_endpoint(path) {
            let negotiate = match path {
                "/client" | "/client/" => false,
                "/client/negotiate" => true,
                _ => return None,
            };
            let hub = head.query_param("hub")?.to_ascii_lowercase();
            return routes.serves(&hub).then_some(HubEndpoint {
                hub: Cow::Owned(hub),
                negotiate,
                azure: true,
            });
        }
        let (hub, tail) = routes.hub_of_path(path)?;
        Some(HubEndpoint {
            hub: Cow::Borrowed(hub),
            negotiate: tail == "negotiate",
            azure: false,
        })
    }
}

/// Whether a path is Azure's client endpoint (`/client/...`).
pub fn is_client_endpoint(path: &str) -> bool {
    path == "/client" || path.starts_with("/client/")
}

/// Checks the access token (query `access_token`, else `Authorization: Bearer`) when
/// authentication is on, or on Azure's client endpoint (`/client/`) always, against the
/// access keys; `Err` is the 401 answer.
pub fn authenticate(node: &Node, head: &RequestHead) -> Result<Option<Claims>, Vec<u8>> {
    let query_token = head.query_param("access_token");
    let token = query_token.as_deref().or_else(|| head.bearer_token());
    let azure_hub = is_client_endpoint(&head.path).then(|| {
        head.query_param("hub")
            .unwrap_or_default()
            .to_ascii_lowercase()
    });
    let verified = match (&azure_hub, &node.access_keys, &node.jwt) {
        (Some(hub), Some(keys), _) => {
            let host = head.header_str("host");
            let forwarded = head
                .header_str("x-forwarded-host")
                .and_then(|hosts| hosts.split(',').next());
            let hosts: Vec<&str> = host.into_iter().chain(forwarded).collect();
            keys.verify(token, Audience::Client { hub }, &hosts)
        }
        // Routing refuses the client endpoint without access keys.
        (Some(_), None, _) | (None, _, None) => return Ok(None),
        (None, _, Some(jwt)) => jwt.verify(token),
    };
    verified.map(Some).map_err(|e| {
        node.metrics
            .auth_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(path = %head.path, "access token refused: {e}");
        wire::response(
            401,
            "text/plain; charset=utf-8",
            &[("WWW-Authenticate", "Bearer")],
            e.to_string().as_bytes(),
            head.keep_alive(),
        )
    })
}

/// The query of a connection's request, for its upstream (`X-ASRS-Client-Query`, with
/// its `?` as Azure sends it), without the access token (a credential the upstream
/// need not see); `None` unless the node has upstreams.
pub fn client_query(node: &Node, head: &RequestHead) -> Option<Box<str>> {
    node.upstream.as_ref()?;
    let kept: Vec<&str> = head
        .query
        .as_deref()?
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("access_token"))
        .collect();
    (!kept.is_empty()).then(|| format!("?{}", kept.join("&")).into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringhub_protocol::http::{parse_request_head, HttpLimits};

    fn endpoint(target: &str) -> Option<(String, bool, bool)> {
        let request = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
        let (head, _) = parse_request_head(request.as_bytes(), HttpLimits::default())
            .unwrap()
            .unwrap();
        HubEndpoint::of(&HubRoutes::default(), &head)
            .map(|e| (e.hub.into_owned(), e.negotiate, e.azure))
    }

    #[test]
    fn hub_paths_and_azures_client_endpoint_name_their_hub() {
        assert_eq!(endpoint("/hubs/Chat"), Some(("Chat".into(), false, false)));
        assert_eq!(
            endpoint("/hubs/chat/negotiate?negotiateVersion=1"),
            Some(("chat".into(), true, false))
        );
        assert_eq!(
            endpoint("/client/?hub=Chat&id=x"),
            Some(("chat".into(), false, true))
        );
        assert_eq!(
            endpoint("/client?hub=chat"),
            Some(("chat".into(), false, true))
        );
        assert_eq!(
            endpoint("/client/negotiate?hub=chat&negotiateVersion=1"),
            Some(("chat".into(), true, true))
        );
        assert_eq!(endpoint("/client/"), None, "no hub");
        assert_eq!(endpoint("/client/other?hub=chat"), None);
        assert_eq!(endpoint("/hubs/chat/other"), None);
        assert!(is_client_endpoint("/client/") && !is_client_endpoint("/clients/"));
        assert_eq!(endpoint("/api/hubs/x"), None);
    }
}
