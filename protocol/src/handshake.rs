//! The SignalR handshake: the client's first record, always JSON ending with `0x1E`
//! (`{"protocol":"json","version":1}`), and the server's answer, `{}` plus `0x1E` or
//! `{"error":"..."}` plus `0x1E`. Error texts are the reference server's.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hub::json::RECORD_SEPARATOR;
use crate::hub::HubProtocol;

/// The success response: `{}` and the record separator.
pub const OK_RESPONSE: &[u8] = b"{}\x1e";

/// The highest hub protocol version accepted (2 = stateful reconnect capable).
pub const MAX_PROTOCOL_VERSION: u64 = 2;

/// The reference server's text for a handshake that timed out or was too large.
pub const CANCELED: &str = "Handshake was canceled.";

/// The reference server's text for a handshake it could not read.
pub const MALFORMED: &str = "An unexpected error occurred during connection handshake.";

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeRequest {
    /// The hub protocol's name (`json`, `messagepack`); see [`HubProtocol::from_name`].
    pub protocol: String,
    /// The hub protocol version; above [`MAX_PROTOCOL_VERSION`] is refused.
    pub version: u64,
}

/// Why a handshake request could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// No record separator within `limit` bytes: the server gives up rather than buffer
    /// an unbounded first message.
    #[error("handshake exceeds the maximum message size of {limit} bytes")]
    TooLarge {
        /// The limit the caller passed.
        limit: usize,
    },
    /// Not the JSON object the handshake must be; the text says what is wrong.
    #[error("malformed handshake: {0}")]
    Malformed(String),
}

impl HandshakeError {
    /// The text to send back in the error response.
    pub fn response_text(&self) -> &'static str {
        match self {
            HandshakeError::TooLarge { .. } => CANCELED,
            HandshakeError::Malformed(_) => MALFORMED,
        }
    }
}

/// Reads the handshake request at the front of `buf`: the request and the bytes it
/// took, or `Ok(None)` if the separator has not arrived yet. Bytes after it belong to
/// the hub protocol.
pub fn parse_request(
    buf: &[u8],
    max_bytes: usize,
) -> Result<Option<(HandshakeRequest, usize)>, HandshakeError> {
    let window = &buf[..buf.len().min(max_bytes.saturating_add(1))];
    let Some(end) = memchr::memchr(RECORD_SEPARATOR, window) else {
        return if buf.len() > max_bytes {
            Err(HandshakeError::TooLarge { limit: max_bytes })
        } else {
            Ok(None)
        };
    };
    let request: HandshakeRequest = serde_json::from_slice(&buf[..end])
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    Ok(Some((request, end + 1)))
}

impl HandshakeRequest {
    /// The hub protocol to use, or the error text to refuse the handshake with.
    pub fn select(&self) -> Result<HubProtocol, String> {
        let Some(protocol) = HubProtocol::from_name(&self.protocol) else {
            return Err(format!(
                "The protocol '{}' is not supported.",
                self.protocol
            ));
        };
        if self.version > MAX_PROTOCOL_VERSION {
            return Err(format!(
                "The server does not support version {} of the '{}' protocol.",
                self.version, self.protocol
            ));
        }
        Ok(protocol)
    }

    /// The request as a client writes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(RECORD_SEPARATOR);
        out
    }
}

#[derive(Serialize, Deserialize)]
struct ErrorResponse<'a> {
    #[serde(borrow)]
    error: std::borrow::Cow<'a, str>,
}

/// The error response `{"error":"..."}` plus separator.
pub fn error_response(text: &str) -> Vec<u8> {
    let mut out = serde_json::to_vec(&ErrorResponse { error: text.into() }).unwrap_or_default();
    out.push(RECORD_SEPARATOR);
    out
}

/// Reads a handshake response (client side): `Ok(Some((Ok(()), n)))` for success,
/// `Ok(Some((Err(text), n)))` for a refusal, `Ok(None)` if incomplete.
#[allow(clippy::type_complexity)]
pub fn parse_response(buf: &[u8]) -> Result<Option<(Result<(), String>, usize)>, HandshakeError> {
    let Some(end) = memchr::memchr(RECORD_SEPARATOR, buf) else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_slice(&buf[..end])
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?;
    let outcome = match value.get("error").and_then(|e| e.as_str()) {
        Some(error) => Err(error.to_owned()),
        None if value.is_object() => Ok(()),
        None => {
            return Err(HandshakeError::Malformed(
                "response is not an object".into(),
            ))
        }
    };
    Ok(Some((outcome, end + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_requests_and_keeps_following_bytes() {
        let buf = b"{\"protocol\":\"messagepack\",\"version\":1}\x1e\x02\x91\x06";
        let (request, used) = parse_request(buf, 1024).unwrap().unwrap();
        assert_eq!(request.select(), Ok(HubProtocol::MessagePack));
        assert_eq!(&buf[used..], b"\x02\x91\x06");
        assert_eq!(parse_request(b"{\"protocol\":", 1024), Ok(None));
    }

    #[test]
    fn refuses_like_the_reference_server() {
        let unknown = HandshakeRequest {
            protocol: "xml".into(),
            version: 1,
        };
        assert_eq!(
            unknown.select(),
            Err("The protocol 'xml' is not supported.".into())
        );
        let future = HandshakeRequest {
            protocol: "json".into(),
            version: 3,
        };
        assert_eq!(
            future.select(),
            Err("The server does not support version 3 of the 'json' protocol.".into())
        );
        assert!(matches!(
            parse_request(b"{\"protocol\":\"json\"}\x1e", 1024),
            Err(HandshakeError::Malformed(_))
        ));
        assert!(matches!(
            parse_request(b"nope\x1e", 1024),
            Err(HandshakeError::Malformed(_))
        ));
        assert_eq!(
            parse_request(&[b' '; 20], 10),
            Err(HandshakeError::TooLarge { limit: 10 })
        );
    }

    #[test]
    fn responses_round_trip() {
        assert_eq!(parse_response(OK_RESPONSE), Ok(Some((Ok(()), 3))));
        let refusal = error_response("The protocol 'xml' is not supported.");
        assert_eq!(
            refusal,
            b"{\"error\":\"The protocol 'xml' is not supported.\"}\x1e"
        );
        assert_eq!(
            parse_response(&refusal),
            Ok(Some((
                Err("The protocol 'xml' is not supported.".into()),
                refusal.len()
            )))
        );
    }
}
