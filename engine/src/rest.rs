//! The REST API (contract section 5): backends push messages and manage membership
//! without a SignalR connection. Every handler acts through the public [`HubContext`],
//! with full rights (the API key is an admin credential). Failures answer
//! `{"error": "..."}` with a fitting status; the document of this API is
//! `openapi.json` beside this file, served at `GET /api/openapi.json` and checked
//! against the server by `tests/rest.rs`.

use ringhub_protocol::http::{self, RequestHead, MAX_BODY_BYTES};
use ringhub_protocol::Value;
use serde::Deserialize;
use serde_json::json;

use crate::api::types::{check_group, check_user, ContextError};
use crate::api::{valid_hub_name, HubContext, Target};

/// The OpenAPI 3 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// A request already read: head and body.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    pub body: &'a [u8],
}

/// A handled request, before it is written.
struct Reply {
    status: u16,
    body: Option<String>,
    allow: Option<&'static str>,
}

impl Reply {
    fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            body: Some(body.to_string()),
            allow: None,
        }
    }

    fn empty(status: u16) -> Reply {
        Reply {
            status,
            body: None,
            allow: None,
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, json!({ "error": message.into() }))
    }

    fn render(self, keep_alive: bool) -> Vec<u8> {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if self.status == 401 {
            headers.push(("WWW-Authenticate", "Bearer"));
        }
        if let Some(allow) = self.allow {
            headers.push(("Allow", allow));
        }
        match self.body {
            Some(body) => http::response(
                self.status,
                "application/json",
                &headers,
                body.as_bytes(),
                keep_alive,
            ),
            None => http::response(self.status, "application/json", &headers, b"", keep_alive),
        }
    }
}

/// The answer to a body over [`MAX_BODY_BYTES`] (the body is not read).
pub fn too_large() -> Vec<u8> {
    Reply::error(
        413,
        format!("The request body is larger than the limit of {MAX_BODY_BYTES} bytes."),
    )
    .render(false)
}

/// Handles one request under `/api/`; returns the complete response.
pub async fn handle(context: &HubContext, api_key: Option<&str>, request: Request<'_>) -> Vec<u8> {
    let keep_alive = request.head.keep_alive();
    route(context, api_key, request).await.render(keep_alive)
}

/// What each path accepts, for 405 answers.
const MESSAGES: &str = "POST";
const CONNECTION_IN_GROUP: &str = "PUT, DELETE";
const GROUP: &str = "GET";
const USER: &str = "GET";
const CONNECTION: &str = "DELETE";

async fn route(context: &HubContext, api_key: Option<&str>, request: Request<'_>) -> Reply {
    let head = request.head;
    let Some(segments) = head.path_segments() else {
        return Reply::error(400, "The path is not valid UTF-8.");
    };
    let segments: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
    let method = head.method.as_str();
    if let ["api", "openapi.json"] = segments.as_slice() {
        return match method {
            // As written (paths in the order of the contract); a unit test checks it parses.
            "GET" => Reply {
                status: 200,
                body: Some(OPENAPI.to_owned()),
                allow: None,
            },
            _ => method_not_allowed("GET"),
        };
    }
    if let Err(refused) = check_key(api_key, head) {
        return refused;
    }
    let ["api", "hubs", hub, rest @ ..] = segments.as_slice() else {
        return Reply::error(404, "Not found.");
    };
    if !valid_hub_name(hub) {
        return Reply::error(400, "The hub name must match [A-Za-z0-9_-]{1,64}.");
    }
    // No REST endpoint takes query parameters: one given is a mistake to report (a
    // backend meaning `?excluded=` would otherwise reach the connection it excluded).
    if let Some((name, _)) = head.query_pairs().first() {
        return Reply::error(
            400,
            format!("Unknown query parameter '{name}': this API takes none (use the JSON body)."),
        );
    }
    // Group names and user ids in the path are held to the contract's limits.
    let named = match rest {
        ["groups", group, ..] => check_group(group),
        ["users", user, ..] => check_user(user),
        _ => Ok(()),
    };
    let named = named.and_then(|()| match rest {
        ["groups", _, "users", user] => check_user(user),
        _ => Ok(()),
    });
    if let Err(e) = named {
        return refused(e);
    }
    let body = request.body;
    match (rest, method) {
        (["messages"], "POST") => {
            send(context, hub, body, |except| {
                Ok(match except {
                    Some(ids) => Target::AllExcept(ids),
                    None => Target::All,
                })
            })
            .await
        }
        (["groups", group, "messages"], "POST") => {
            send(context, hub, body, |except| {
                Ok(match except {
                    Some(ids) => Target::GroupExcept(group.to_string(), ids),
                    None => Target::Group(group.to_string()),
                })
            })
            .await
        }
        (["users", user, "messages"], "POST") => {
            send(context, hub, body, |except| {
                Ok(match except {
                    Some(ids) => Target::UserExcept(user.to_string(), ids),
                    None => Target::User(user.to_string()),
                })
            })
            .await
        }
        (["connections", id, "messages"], "POST") => {
            if !context.is_connected(hub, id) {
                return unknown_connection(id);
            }
            send(context, hub, body, only(Target::Connection(id.to_string()))).await
        }
        (["groups", group, "connections", id], "PUT" | "DELETE") => {
            let done = if method == "PUT" {
                context.add_to_group(hub, id, group).await
            } else {
                context.remove_from_group(hub, id, group).await
            };
            match done {
                Ok(true) => Reply::empty(204),
                Ok(false) => unknown_connection(id),
                Err(e) => refused(e),
            }
        }
        (["groups", group, "users", user], "PUT" | "DELETE") => {
            let done = if method == "PUT" {
                context.add_user_to_group(hub, user, group).await
            } else {
                context.remove_user_from_group(hub, user, group).await
            };
            match done {
                Ok(()) => Reply::empty(204),
                Err(e) => refused(e),
            }
        }
        (["groups", group], "GET") => {
            let presence = context.group_presence(hub, group);
            Reply::json(
                200,
                json!({
                    "connections": presence.connections,
                    "users": presence.users(),
                    "userIds": presence.user_ids,
                }),
            )
        }
        (["users", user], "GET") => match context.user_groups(hub, user).await {
            Ok(groups) => {
                let connection_ids = context.user_connections(hub, user);
                Reply::json(
                    200,
                    json!({
                        "online": !connection_ids.is_empty(),
                        "connectionIds": connection_ids,
                        "groups": groups,
                    }),
                )
            }
            Err(e) => refused(e),
        },
        (["connections", id], "DELETE") => match context.close_connection(hub, id).await {
            Ok(true) => Reply::empty(204),
            Ok(false) => unknown_connection(id),
            Err(e) => refused(e),
        },
        (["messages"], _)
        | (["groups", _, "messages"], _)
        | (["users", _, "messages"], _)
        | (["connections", _, "messages"], _) => method_not_allowed(MESSAGES),
        (["groups", _, "connections", _], _) | (["groups", _, "users", _], _) => {
            method_not_allowed(CONNECTION_IN_GROUP)
        }
        (["groups", _], _) => method_not_allowed(GROUP),
        (["users", _], _) => method_not_allowed(USER),
        (["connections", _], _) => method_not_allowed(CONNECTION),
        _ => Reply::error(404, "Not found."),
    }
}

/// A target that takes no `"except"` list.
fn only(target: Target) -> impl FnOnce(Option<Vec<String>>) -> Result<Target, Reply> {
    move |except| match except {
        None => Ok(target),
        Some(_) => Err(Reply::error(
            400,
            "\"except\" does not apply to a message for one connection.",
        )),
    }
}

/// A context error as an answer.
fn refused(error: ContextError) -> Reply {
    Reply::error(status_of(&error), error.to_string())
}

/// The status of a context error in any REST API: what the contract refuses is the
/// caller's mistake (400, 413 for a message too large), anything else the node's
/// trouble (503).
pub(crate) fn status_of(error: &ContextError) -> u16 {
    match error {
        ContextError::MessageTooLarge { .. } => 413,
        e if e.is_refusal() => 400,
        _ => 503,
    }
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut reply = Reply::error(405, format!("This path accepts {allow}."));
    reply.allow = Some(allow);
    reply
}

fn unknown_connection(id: &str) -> Reply {
    Reply::error(404, format!("No connection with the id '{id}'."))
}

/// Whether the request carries the API key (and the API is enabled).
fn check_key(api_key: Option<&str>, head: &RequestHead) -> Result<(), Reply> {
    let Some(expected) = api_key else {
        return Err(Reply::error(
            404,
            "The REST API is disabled: start ringhub with --api-key.",
        ));
    };
    if !key_matches(head.bearer_token(), expected) {
        return Err(Reply::error(
            401,
            "A valid API key is required (Authorization: Bearer <key>).",
        ));
    }
    Ok(())
}

/// The answer to a request under `/api/` that is refused whatever its body holds (no
/// key, or the API disabled), so that its body need not be read: the connection closes
/// after it.
pub fn refused_before_body(api_key: Option<&str>, head: &RequestHead) -> Option<Vec<u8>> {
    if head.path == "/api/openapi.json" {
        return None;
    }
    check_key(api_key, head)
        .err()
        .map(|reply| reply.render(false))
}

/// Compares in time independent of where the first difference is.
fn key_matches(given: Option<&str>, expected: &str) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// A message body: `{"target": "...", "arguments": [...]}`, and for sends to all, a
/// group or a user an optional `"except": [connectionIds]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    target: String,
    #[serde(default)]
    arguments: Vec<Value>,
    #[serde(default)]
    except: Option<Vec<String>>,
}

async fn send(
    context: &HubContext,
    hub: &str,
    body: &[u8],
    target: impl FnOnce(Option<Vec<String>>) -> Result<Target, Reply>,
) -> Reply {
    if body.is_empty() {
        return Reply::error(
            400,
            "A JSON body {\"target\": ..., \"arguments\": [...]} is required.",
        );
    }
    let limit = context.message_limit();
    if body.len() > limit {
        return Reply::error(
            413,
            format!(
                "The message is larger than the limit of {limit} bytes (half of --max-buffered-bytes)."
            ),
        );
    }
    let message: MessageBody = match serde_json::from_slice(body) {
        Ok(m) => m,
        Err(e) => return Reply::error(400, format!("The body is not a valid message: {e}.")),
    };
    if message.target.is_empty() {
        return Reply::error(400, "\"target\" must not be empty.");
    }
    let target = match target(message.except) {
        Ok(t) => t,
        Err(reply) => return reply,
    };
    let given_up = context.node.config.rest_timeout;
    match context
        .send_unless(
            hub,
            target,
            &message.target,
            message.arguments,
            monoio::time::sleep(given_up),
        )
        .await
    {
        Ok(()) => Reply::empty(202),
        Err(e) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(key_matches(Some("s3cret"), "s3cret"));
        assert!(!key_matches(Some("s3cre"), "s3cret"));
        assert!(!key_matches(Some("s3creT"), "s3cret"));
        assert!(!key_matches(None, "s3cret"));
    }

    #[test]
    fn the_openapi_document_is_json() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(document["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    }
}
