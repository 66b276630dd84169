//! Connection tokens, kept by the shard that owns them. A token names its owning shard
//! (its first two characters), so a request that arrives on another shard (the kernel
//! spreads connections over the `SO_REUSEPORT` listeners) is handed to the owner with
//! its socket, and no token or session is ever shared between shards or locked.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use futures_util::lock::Mutex;
use hashbrown::HashMap;

use crate::backplane::SharedToken;
use crate::quota::Share;
use crate::session::Session;
use crate::signal::Signal;

/// A new token owned by shard `shard`: its index in two hex digits, then 16 random
/// bytes (URL-safe, as the client appends it unencoded).
pub fn new_token(shard: usize, random: &str) -> String {
    format!("{shard:02x}{random}")
}

/// The shard a token names, if it names one of `shards`.
pub fn owner_of(token: &str, shards: usize) -> Option<usize> {
    let digits = token.get(..2)?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    usize::from_str_radix(digits, 16)
        .ok()
        .filter(|&shard| shard < shards)
}

/// What a token stands for.
pub enum Token {
    /// Negotiated; no transport has used it yet.
    Negotiated(Negotiated),
    /// A WebSocket carries its session.
    WebSocket,
    /// A WebSocket carries its session, and a new one may take over (stateful reconnect).
    Resumable(Rc<Resumable>),
    /// Server-Sent Events or long polling carry its session, request by request.
    Http(Rc<HttpChannel>),
}

/// A session whose WebSocket may be replaced by a new one (stateful reconnect): the
/// session's task waits here for the new socket when the old one drops, and a resume
/// request hands it over here (a newer one replaces an older one not yet taken).
pub struct Resumable {
    pub session: Rc<Session>,
    incoming: RefCell<Option<Attach>>,
}

/// A new WebSocket for a resumable session, upgraded and answered: the socket, the
/// bytes read after the upgrade request, and the claims of the token it came with.
pub struct Attach {
    pub reader: monoio::io::OwnedReadHalf<monoio::net::TcpStream>,
    pub writer: crate::transport::io::Writer,
    pub input: bytes::BytesMut,
    pub claims: Option<crate::auth::Claims>,
}

impl Resumable {
    pub fn new(session: Rc<Session>) -> Resumable {
        Resumable {
            session,
            incoming: RefCell::new(None),
        }
    }

    /// Hands a new WebSocket to the session: the old transport, if it still runs (its
    /// socket may not have looked dead yet), is told to let go.
    pub fn offer(&self, attach: Attach) {
        self.incoming.replace(Some(attach));
        self.session.end_transport();
        self.session.wake_resume_waiter();
    }

    /// The next WebSocket offered, or `None` once the session cannot be resumed (its
    /// replay buffer overflowed, it was stopped). The caller bounds the wait.
    pub async fn next_transport(&self) -> Option<Attach> {
        std::future::poll_fn(|cx| {
            if let Some(attach) = self.incoming.borrow_mut().take() {
                return std::task::Poll::Ready(Some(attach));
            }
            if !self.session.can_resume() || self.session.stop.is_fired() {
                return std::task::Poll::Ready(None);
            }
            self.session.wake_on_resume_change(cx.waker());
            std::task::Poll::Pending
        })
        .await
    }
}

pub struct Negotiated {
    pub hub: String,
    pub connection_id: String,
    /// Who negotiated (the user-id provider's answer): only they may use the token.
    pub user_id: Option<String>,
    pub created: Instant,
    /// Bytes POSTed before the first receive request (some clients send the handshake
    /// first; ASP.NET Core keeps them for the transport too), and their share of the
    /// node's budget for them.
    pub early_input: bytes::BytesMut,
    pub early_share: Option<Share>,
    /// The client asked for stateful reconnect, and negotiate offered it.
    pub stateful_reconnect: bool,
    /// Its place among the node's pending negotiations (given back when the token is
    /// used or expires).
    _slot: Share,
}

impl Negotiated {
    /// A token negotiated now (here, or on another node of the cluster).
    pub fn new(shared: SharedToken, slot: Share) -> Negotiated {
        Negotiated {
            hub: shared.hub,
            connection_id: shared.connection_id,
            user_id: shared.user_id,
            created: Instant::now(),
            early_input: bytes::BytesMut::new(),
            early_share: None,
            stateful_reconnect: shared.stateful_reconnect,
            _slot: slot,
        }
    }
}

/// The transport side of a session carried by HTTP requests: one receive request at a
/// time (an SSE stream or a long poll), sends by POST.
pub struct HttpChannel {
    pub token: String,
    pub session: Rc<Session>,
    pub long_polling: bool,
    /// Bytes POSTed and not yet handled; the lock keeps concurrent POSTs in order.
    pub input: Mutex<bytes::BytesMut>,
    /// The handshake was answered and the session registered.
    pub connected: Cell<bool>,
    /// Since when no receive request has been open (`None` while one is).
    pub receive_gone_since: Cell<Option<Instant>>,
    /// Fired to end the pending long poll when a newer one arrives.
    pub pending_poll: RefCell<Option<Signal>>,
    pub created: Instant,
    /// Set once the channel ended and its session left its groups.
    pub disposed: Cell<bool>,
}

impl HttpChannel {
    pub fn new(
        token: String,
        session: Rc<Session>,
        long_polling: bool,
        early_input: bytes::BytesMut,
    ) -> HttpChannel {
        let now = Instant::now();
        HttpChannel {
            token,
            session,
            long_polling,
            input: Mutex::new(early_input),
            connected: Cell::new(false),
            receive_gone_since: Cell::new(Some(now)),
            pending_poll: RefCell::new(None),
            created: now,
            disposed: Cell::new(false),
        }
    }
}

/// One shard's tokens.
#[derive(Default)]
pub struct Tokens {
    map: RefCell<HashMap<String, Token>>,
}

impl Tokens {
    pub fn insert(&self, token: String, state: Token) {
        self.map.borrow_mut().insert(token, state);
    }

    pub fn remove(&self, token: &str) -> Option<Token> {
        self.map.borrow_mut().remove(token)
    }

    /// The channel of an SSE or long-polling token.
    pub fn channel(&self, token: &str) -> Option<Rc<HttpChannel>> {
        match self.map.borrow().get(token) {
            Some(Token::Http(channel)) => Some(channel.clone()),
            _ => None,
        }
    }

    /// Runs `f` on the token's entry (`None` if unknown); `f` may replace it.
    pub fn with<R>(&self, token: &str, f: impl FnOnce(Option<&mut Token>) -> R) -> R {
        f(self.map.borrow_mut().get_mut(token))
    }

    /// Drops negotiated tokens older than `ttl` (never used by a transport).
    pub fn purge_negotiated(&self, now: Instant, ttl: std::time::Duration) {
        self.map.borrow_mut().retain(|_, state| match state {
            Token::Negotiated(n) => now - n.created < ttl,
            _ => true,
        });
    }

    pub fn is_websocket(&self, token: &str) -> bool {
        matches!(
            self.map.borrow().get(token),
            Some(Token::WebSocket | Token::Resumable(_))
        )
    }

    pub fn channels(&self) -> Vec<Rc<HttpChannel>> {
        self.map
            .borrow()
            .values()
            .filter_map(|state| match state {
                Token::Http(channel) => Some(channel.clone()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Quota;

    #[test]
    fn a_token_names_its_shard() {
        let token = new_token(3, "abcdefghijklmnopqrstuv");
        assert_eq!(owner_of(&token, 4), Some(3));
        assert_eq!(owner_of(&token, 3), None, "a shard the node does not have");
        assert_eq!(owner_of("zz-abc", 4), None);
        assert_eq!(owner_of("", 4), None);
        assert_eq!(owner_of("é", 4), None);
    }

    #[test]
    fn negotiated_tokens_expire_and_others_stay() {
        let tokens = Tokens::default();
        let old = Instant::now();
        let pending = Quota::new(1);
        let shared = SharedToken {
            hub: "h".into(),
            connection_id: "c".into(),
            user_id: None,
            stateful_reconnect: false,
        };
        let mut negotiated = Negotiated::new(shared, pending.try_take(1).unwrap());
        negotiated.created = old;
        tokens.insert("00a".into(), Token::Negotiated(negotiated));
        tokens.insert("00b".into(), Token::WebSocket);
        let ttl = std::time::Duration::from_secs(15);
        let known = |token: &str| tokens.with(token, |entry| entry.is_some());
        tokens.purge_negotiated(old + std::time::Duration::from_secs(1), ttl);
        assert!(known("00a") && known("00b"));
        tokens.purge_negotiated(old + ttl, ttl);
        assert!(!known("00a") && known("00b"));
        assert_eq!(pending.used(), 0, "an expired token gives its place back");
        assert!(matches!(tokens.remove("00b"), Some(Token::WebSocket)));
    }
}
