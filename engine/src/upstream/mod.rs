//! Upstream webhooks (contract section 11), as Azure SignalR Service sends them in
//! serverless mode: a connection's `connected` and `disconnected` events (category
//! `connections`) and each invocation of a method the node does not have itself
//! (category `messages`, the event is its target) are POSTed to the first matching
//! upstream ([`rules`]), with the `X-ASRS-*` headers. An invocation's HTTP answer is
//! its Completion. The shard that holds the connection sends its events, so a cluster
//! sends each once; the HTTP work runs on the upstream thread (`client`).
//!
//! The protocol (Azure's documentation "Upstream endpoints", its emulator and the
//! Functions extension that reads it): an invocation's body is the client's
//! Invocation message in the client's protocol without its framing (`application/json`
//! or `application/x-msgpack`); the answer is a Completion message in that protocol
//! (framed or not), a `204` or an empty body is a `null` result, and any other status
//! fails the invocation with `Invocation failed, status code N`. Connection events
//! carry `{"type":10}` and `{"type":11}` (JSON).

mod client;
pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringhub_protocol::hub::{
    json, msgpack, CompletionOutcome, HubMessage, HubProtocol, Invocation,
};
use ringhub_protocol::Value;

use crate::api::types::{Caller, HubError};
use crate::metrics::Metrics;
pub use client::MAX_IN_FLIGHT;
use client::{Link, Request};
pub use rules::{Category, UpstreamRule};

/// How long a new connection waits for its `connected` event's first attempt before
/// its messages are read (so that the upstream hears of it before its invocations,
/// as from Azure), at most: the client's pings must be read well within its timeout.
const CONNECTED_WAIT: Duration = Duration::from_secs(5);

const JSON: &str = "application/json";
const MESSAGEPACK: &str = "application/x-msgpack";

/// A node's upstreams: the rules, the access keys that sign, the upstream thread.
#[derive(Debug)]
pub(crate) struct Upstream {
    rules: Vec<UpstreamRule>,
    keys: Vec<String>,
    link: Link,
}

/// What an invocation sends upstream.
pub(crate) struct UpstreamCall<'a> {
    pub caller: &'a Caller,
    pub protocol: HubProtocol,
    /// `None`: a `send`, nothing is answered.
    pub invocation_id: Option<&'a str>,
    pub target: &'a str,
    pub arguments: Vec<Value>,
}

impl Upstream {
    /// Starts the upstream thread (`None` without rules). `keys` sign the requests;
    /// an answer larger than `max_answer` bytes fails its invocation.
    pub(crate) fn start(
        rules: Vec<UpstreamRule>,
        keys: Vec<String>,
        retry_for: Duration,
        max_answer: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Option<Upstream>> {
        if rules.is_empty() {
            return Ok(None);
        }
        let link = client::start(rules.len(), metrics, retry_for, max_answer)?;
        Ok(Some(Upstream { rules, keys, link }))
    }

    /// Tells the upstream that a connection is here; waits (at most [`CONNECTED_WAIT`])
    /// for the first attempt, the retries go on alone.
    pub async fn connected(&self, caller: &Caller) {
        let Some(request) = self.event(caller, "connected", Bytes::from_static(b"{\"type\":10}"))
        else {
            return;
        };
        let first_attempt = self.link.event(request);
        let waited = futures_util::future::select(
            first_attempt,
            Box::pin(crate::runtime::sleep(CONNECTED_WAIT)),
        );
        waited.await;
    }

    /// Tells the upstream that a connection left (nobody waits for it).
    pub fn disconnected(&self, caller: &Caller) {
        if let Some(request) =
            self.event(caller, "disconnected", Bytes::from_static(b"{\"type\":11}"))
        {
            drop(self.link.event(request));
        }
    }

    fn event(&self, caller: &Caller, event: &str, body: Bytes) -> Option<Request> {
        let (upstream, url) = rules::route(&self.rules, &caller.hub, Category::Connections, event)?;
        Some(Request {
            upstream,
            url,
            headers: self.headers(caller, Category::Connections, event, None),
            content_type: JSON,
            body,
        })
    }

    /// Sends an invocation upstream and makes its Completion of the answer (a `send`
    /// waits for the upstream too, so that a slow upstream slows its client).
    /// `UnknownMethod` when no upstream takes it.
    pub async fn invoke(&self, call: UpstreamCall<'_>) -> Result<Value, HubError> {
        let caller = call.caller;
        let Some((upstream, url)) =
            rules::route(&self.rules, &caller.hub, Category::Messages, call.target)
        else {
            return Err(HubError::UnknownMethod(call.target.to_owned()));
        };
        let request = Request {
            upstream,
            url,
            headers: self.headers(caller, Category::Messages, call.target, call.invocation_id),
            content_type: match call.protocol {
                HubProtocol::Json => JSON,
                HubProtocol::MessagePack => MESSAGEPACK,
            },
            body: invocation_body(
                call.protocol,
                call.invocation_id,
                call.target,
                call.arguments,
            ),
        };
        match self.link.call(request).await {
            Ok(answer) => completion(call.protocol, answer.status, &answer.body),
            Err(e) => {
                tracing::debug!(target = call.target, "upstream invocation failed: {e}");
                Err(HubError::exception(format!("Invocation failed, {e}.")))
            }
        }
    }

    fn headers(
        &self,
        caller: &Caller,
        category: Category,
        event: &str,
        invocation_id: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("X-ASRS-Connection-Id", caller.connection_id.clone()),
            ("X-ASRS-Hub", caller.hub.clone()),
            ("X-ASRS-Category", category.name().to_owned()),
            ("X-ASRS-Event", header_text(event)),
        ];
        if let Some(signature) = rules::signature(&self.keys, &caller.connection_id) {
            headers.push(("X-ASRS-Signature", signature));
        }
        if let Some(user) = &caller.user_id {
            headers.push(("X-ASRS-User-Id", header_text(user)));
        }
        if let Some(claims) = caller.claims.as_ref().and_then(claims_header) {
            headers.push(("X-ASRS-User-Claims", claims));
        }
        if let Some(query) = &caller.client_query {
            headers.push(("X-ASRS-Client-Query", header_text(query)));
        }
        if let Some(id) = invocation_id {
            headers.push(("X-ASRS-Invocation-Id", header_text(id)));
        }
        headers
    }
}

/// A text as a header value: control characters (a header's end) become spaces.
fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `X-ASRS-User-Claims`: each claim as `type: value` (.NET's `Claim.ToString()`),
/// comma-separated as a repeated header is; a list claim gives one per item.
fn claims_header(claims: &crate::auth::Claims) -> Option<String> {
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    if let Some(sub) = &claims.sub {
        pairs.push(("sub".into(), sub.clone()));
    }
    if let Some(role) = &claims.role {
        pairs.push(("role".into(), role.clone()));
    }
    for group in &claims.groups {
        pairs.push(("groups".into(), group.clone()));
    }
    for (name, value) in &claims.other {
        match value {
            serde_json::Value::Array(items) => {
                pairs.extend(items.iter().map(|item| (name.clone(), text(item))))
            }
            other => pairs.push((name.clone(), text(other))),
        }
    }
    if pairs.is_empty() {
        return None;
    }
    let joined: Vec<String> = pairs
        .into_iter()
        .map(|(name, value)| format!("{name}: {value}"))
        .collect();
    Some(header_text(&joined.join(", ")))
}

/// The client's Invocation in its protocol, without framing.
fn invocation_body(
    protocol: HubProtocol,
    invocation_id: Option<&str>,
    target: &str,
    arguments: Vec<Value>,
) -> Bytes {
    let message = HubMessage::Invocation(Invocation {
        invocation_id: invocation_id.map(str::to_owned),
        target: target.to_owned(),
        arguments,
        ..Invocation::default()
    });
    let mut out = BytesMut::new();
    match protocol {
        HubProtocol::Json => {
            json::encode(&message, &mut out);
            out.truncate(out.len().saturating_sub(1));
        }
        HubProtocol::MessagePack => msgpack::encode_body(&message, &mut out),
    }
    out.freeze()
}

/// An invocation's outcome from its upstream's answer: a Completion message in the
/// client's protocol (its framing optional), or nothing for `null`; anything else is
/// the invocation's error.
fn completion(protocol: HubProtocol, status: u16, body: &[u8]) -> Result<Value, HubError> {
    if !(200..300).contains(&status) {
        return Err(HubError::exception(format!(
            "Invocation failed, status code {status}"
        )));
    }
    if status == 204 || body.is_empty() {
        return Ok(Value::Null);
    }
    let parsed = match protocol {
        HubProtocol::Json => json::parse(body.strip_suffix(&[0x1E]).unwrap_or(body)),
        HubProtocol::MessagePack => match protocol.split_record(body, body.len()) {
            Ok(Some(record)) if record.consumed == body.len() => msgpack::parse(record.body),
            _ => msgpack::parse(body),
        },
    };
    match parsed {
        Ok(Some(HubMessage::Completion(completion))) => match completion.outcome {
            CompletionOutcome::Void => Ok(Value::Null),
            CompletionOutcome::Result(value) => Ok(value),
            CompletionOutcome::Error(error) => Err(HubError::Exception(error)),
        },
        Ok(_) => Err(HubError::exception(
            "Invocation failed, the upstream's answer is not a Completion message.",
        )),
        Err(e) => Err(HubError::exception(format!(
            "Invocation failed, the upstream's answer cannot be read: {e}."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(protocol: HubProtocol, message: &HubMessage) -> Vec<u8> {
        let mut out = BytesMut::new();
        protocol.encode(message, &mut out);
        out.to_vec()
    }

    #[test]
    fn an_invocation_goes_up_in_the_clients_protocol_without_framing() {
        let body = invocation_body(HubProtocol::Json, Some("7"), "add", vec![Value::Int(2)]);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"type":1,"invocationId":"7","target":"add","arguments":[2]}"#
        );
        let body = invocation_body(HubProtocol::MessagePack, None, "add", vec![Value::Int(2)]);
        let Ok(Some(HubMessage::Invocation(invocation))) = msgpack::parse(&body) else {
            panic!("not an unframed MessagePack invocation: {body:?}");
        };
        assert_eq!(
            (invocation.invocation_id, invocation.target),
            (None, "add".into())
        );
    }

    #[test]
    fn the_answer_is_the_completion_and_anything_else_an_error() {
        let result = HubMessage::completion("1", CompletionOutcome::Result(Value::Int(5)));
        let error = HubMessage::completion("1", CompletionOutcome::Error("no".into()));
        for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
            let answer = framed(protocol, &result);
            assert!(matches!(
                completion(protocol, 200, &answer),
                Ok(Value::Int(5))
            ));
            let failed = completion(protocol, 200, &framed(protocol, &error));
            assert_eq!(failed.unwrap_err().client_message(), "no");
        }
        // Unframed, as a hand-written upstream answers.
        let answer = br#"{"type":3,"invocationId":"1","result":"x"}"#;
        assert!(
            matches!(completion(HubProtocol::Json, 200, answer), Ok(Value::Str(s)) if s == "x")
        );
        let mut unframed = BytesMut::new();
        msgpack::encode_body(&result, &mut unframed);
        assert!(matches!(
            completion(HubProtocol::MessagePack, 200, &unframed),
            Ok(Value::Int(5))
        ));
        assert!(matches!(
            completion(HubProtocol::Json, 204, b""),
            Ok(Value::Null)
        ));
        assert!(matches!(
            completion(HubProtocol::Json, 200, b""),
            Ok(Value::Null)
        ));
        let refused = completion(HubProtocol::Json, 500, b"{}").unwrap_err();
        assert_eq!(
            refused.client_message(),
            "Invocation failed, status code 500"
        );
        for malformed in [
            &b"not json"[..],
            b"{\"type\":1,\"target\":\"x\",\"arguments\":[]}",
            b"\xff\x00",
        ] {
            for protocol in [HubProtocol::Json, HubProtocol::MessagePack] {
                let error = completion(protocol, 200, malformed).unwrap_err();
                assert!(
                    error.client_message().starts_with("Invocation failed"),
                    "{error}"
                );
            }
        }
    }

    #[test]
    fn claims_are_type_colon_value_pairs() {
        let claims: crate::auth::Claims = serde_json::from_value(serde_json::json!({
            "sub": "u1", "groups": ["a", "b"], "exp": 5, "name": "Ann\nB"
        }))
        .unwrap();
        assert_eq!(
            claims_header(&claims).unwrap(),
            "sub: u1, groups: a, groups: b, exp: 5, name: Ann B"
        );
    }
}
