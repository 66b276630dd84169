//! Azure SignalR Service's data-plane REST API in serverless mode (contract section
//! 11), beside ringhub's own (`rest`): an app written for Azure (the Management SDK,
//! the Functions bindings, hand-signed calls) pushes to ringhub with only its
//! connection string changed. Both path families the SDKs use are served:
//! `/api/hubs/{hub}/...?api-version=...` (2022-06-01 to 2024-12-01) and
//! `/api/v1/hubs/{hub}/...`, with the status codes of Azure's swagger for each and
//! `ErrorDetail` bodies (`{"code", "message"}`, and the `x-ms-error-code` header) on
//! failure. Calls carry `Authorization: Bearer <JWT>` signed with an access key for the
//! request's URL (`auth::AccessKeys`). Hub names are case-insensitive here (lower-cased,
//! as the SDKs send them), optionally prefixed by `?application=` as Azure does.
//!
//! Like `rest`, every handler acts through the public [`HubContext`] with full rights.

use std::time::Duration;

use ringhub_protocol::http::{self as wire, RequestHead};
use ringhub_protocol::Value;
use serde::Deserialize;
use serde_json::json;

use crate::api::types::{check_group, check_user, ContextError};
use crate::api::{valid_hub_name, HubContext, Target};
use crate::auth::{AccessKeys, Audience, AuthError};
use crate::rest::{status_of, Request};

/// Whether a request under `/api/` is for Azure's API rather than ringhub's: its
/// health path, the `/api/v1/` family, or `/api/hubs/...` with an `api-version` (which
/// ringhub's own API refuses) or an Azure action (`:send`, `:closeConnections`, ...).
pub fn is_azure_request(head: &RequestHead) -> bool {
    let path = head.path.as_str();
    if path == "/api/health" || path.starts_with("/api/v1/") || path == "/api/v1" {
        return true;
    }
    path.starts_with("/api/hubs/")
        && (head.query_param("api-version").is_some()
            || path.split('/').any(|segment| segment.starts_with(':')))
}

/// Handles one request for Azure's API; returns the complete response.
pub async fn handle(context: &HubContext, request: Request<'_>) -> Vec<u8> {
    let keep_alive = request.head.keep_alive();
    let head_only = request.head.method == "HEAD";
    let reply = match route(context, request).await {
        Ok(reply) | Err(reply) => reply,
    };
    reply.render(keep_alive, head_only)
}

/// The answer to an Azure call refused whatever its body holds (the API off, no valid
/// token), so that its body need not be read: the connection closes after it.
pub fn refused_before_body(context: &HubContext, head: &RequestHead) -> Option<Vec<u8>> {
    if is_health(head) {
        return None;
    }
    let head_only = head.method == "HEAD";
    authorize(context, head)
        .err()
        .map(|reply| reply.render(false, head_only))
}

/// A handled request, before it is written.
struct Reply {
    status: u16,
    body: Option<serde_json::Value>,
    /// `x-ms-error-code` of an error.
    error_code: Option<&'static str>,
    allow: Option<&'static str>,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            body: None,
            error_code: None,
            allow: None,
        }
    }

    fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            body: Some(body),
            ..Reply::status(status)
        }
    }

    /// An `ErrorDetail` (Azure's error body): `{"code", "message"}`.
    fn error(status: u16, code: &'static str, message: impl Into<String>) -> Reply {
        Reply {
            error_code: Some(code),
            ..Reply::json(status, json!({ "code": code, "message": message.into() }))
        }
    }

    fn bad_request(message: impl Into<String>) -> Reply {
        Reply::error(400, code::INVALID_REQUEST, message)
    }

    /// A context error: the caller's mistake or the node's trouble (`rest::status_of`).
    fn refused(error: ContextError) -> Reply {
        let code = match status_of(&error) {
            413 => code::TOO_LARGE,
            400 => code::INVALID_REQUEST,
            _ => code::UNAVAILABLE,
        };
        Reply::error(status_of(&error), code, error.to_string())
    }

    /// A `HEAD` answer has the headers of the `GET` it stands for, without the body.
    fn render(self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if self.status == 401 {
            headers.push(("WWW-Authenticate", "Bearer"));
        }
        if let Some(code) = self.error_code {
            headers.push(("x-ms-error-code", code));
        }
        if let Some(allow) = self.allow {
            headers.push(("Allow", allow));
        }
        let body = match (&self.body, head_only) {
            (Some(body), false) => body.to_string().into_bytes(),
            _ => Vec::new(),
        };
        wire::response(
            self.status,
            "application/json; charset=utf-8",
            &headers,
            &body,
            keep_alive,
        )
    }
}

/// The `code` of each `ErrorDetail` ringhub answers (also in `x-ms-error-code`),
/// after Azure's `<level>.<scope>.<kind>` codes.
mod code {
    pub const INVALID_REQUEST: &str = "Error.Request.Invalid";
    pub const UNAUTHORIZED: &str = "Error.Request.Unauthorized";
    pub const NOT_FOUND: &str = "Error.Request.NotExisted";
    pub const METHOD_NOT_ALLOWED: &str = "Error.Request.MethodNotAllowed";
    pub const TOO_LARGE: &str = "Error.Request.TooLarge";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "Error.Request.UnsupportedMediaType";
    pub const CONNECTION_NOT_EXISTED: &str = "Error.Connection.NotExisted";
    /// The client answered a client result with an error (ringhub's choice of code).
    pub const INVOCATION_FAILED: &str = "Error.Invocation.Failed";
    pub const UNAVAILABLE: &str = "Error.Service.Unavailable";
    pub const DISABLED: &str = "Error.Service.Disabled";
}

/// Which of Azure's two path families a call uses: their success codes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `/api/v1/hubs/{hub}/...`: every change answers `202`.
    V1,
    /// `/api/hubs/{hub}/...?api-version=...`.
    Versioned,
}

/// Whom a send or a close is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope<'a> {
    Hub,
    Group(&'a str),
    User(&'a str),
    Connection(&'a str),
}

/// What a call asks for, in either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation<'a> {
    Send(Scope<'a>),
    AddConnectionToGroup {
        group: &'a str,
        connection: &'a str,
    },
    RemoveConnectionFromGroup {
        group: &'a str,
        connection: &'a str,
    },
    RemoveConnectionFromAllGroups {
        connection: &'a str,
    },
    AddUserToGroup {
        group: &'a str,
        user: &'a str,
    },
    RemoveUserFromGroup {
        group: &'a str,
        user: &'a str,
    },
    RemoveUserFromAllGroups {
        user: &'a str,
    },
    /// `HEAD` (or `GET` in v1): `200` if it exists, `404` otherwise.
    Exists(Scope<'a>),
    UserInGroup {
        group: &'a str,
        user: &'a str,
    },
    ListGroupConnections {
        group: &'a str,
    },
    /// One connection (`DELETE`), or `:closeConnections` of a hub, group or user.
    Close(Scope<'a>),
    GenerateToken,
    Invoke {
        connection: &'a str,
    },
}

/// A path under `/api/` that is not Azure's, or a method it does not take.
enum Unrouted {
    NotFound,
    MethodNotAllowed(&'static str),
}

/// The operation of `method` on the path after `/api/v1/hubs/{hub}`.
fn route_v1<'a>(method: &str, rest: &[&'a str]) -> Result<Operation<'a>, Unrouted> {
    use Operation::*;
    let exists = matches!(method, "GET" | "HEAD");
    Ok(match (rest, method) {
        ([], "POST") => Send(Scope::Hub),
        ([], _) => return Err(Unrouted::MethodNotAllowed("POST")),
        (["users", user], "POST") => Send(Scope::User(user)),
        (["users", user], _) if exists => Exists(Scope::User(user)),
        (["connections", id], "POST") => Send(Scope::Connection(id)),
        (["connections", id], "DELETE") => Close(Scope::Connection(id)),
        (["connections", id], _) if exists => Exists(Scope::Connection(id)),
        (["groups", group], "POST") => Send(Scope::Group(group)),
        (["groups", group], _) if exists => Exists(Scope::Group(group)),
        (["users", _] | ["groups", _], _) => {
            return Err(Unrouted::MethodNotAllowed("POST, GET, HEAD"))
        }
        (["connections", _], _) => {
            return Err(Unrouted::MethodNotAllowed("POST, GET, HEAD, DELETE"))
        }
        (
            ["groups", group, "connections", connection]
            | ["connections", connection, "groups", group],
            method,
        ) => match method {
            "PUT" => AddConnectionToGroup { group, connection },
            "DELETE" => RemoveConnectionFromGroup { group, connection },
            _ => return Err(Unrouted::MethodNotAllowed("PUT, DELETE")),
        },
        (["groups", group, "users", user] | ["users", user, "groups", group], method) => {
            match method {
                "PUT" => AddUserToGroup { group, user },
                "DELETE" => RemoveUserFromGroup { group, user },
                "GET" | "HEAD" => UserInGroup { group, user },
                _ => return Err(Unrouted::MethodNotAllowed("PUT, DELETE, GET, HEAD")),
            }
        }
        (["users", user, "groups"], "DELETE") => RemoveUserFromAllGroups { user },
        (["users", _, "groups"], _) => return Err(Unrouted::MethodNotAllowed("DELETE")),
        _ => return Err(Unrouted::NotFound),
    })
}

/// The operation of `method` on the path after `/api/hubs/{hub}` (2024-12-01 swagger).
fn route_versioned<'a>(method: &str, rest: &[&'a str]) -> Result<Operation<'a>, Unrouted> {
    use Operation::*;
    let only = |allowed: &'static str, operation: Operation<'a>| {
        if allowed == method {
            Ok(operation)
        } else {
            Err(Unrouted::MethodNotAllowed(allowed))
        }
    };
    match rest {
        [":send"] => only("POST", Send(Scope::Hub)),
        [":closeConnections"] => only("POST", Close(Scope::Hub)),
        [":generateToken"] => only("POST", GenerateToken),
        ["users", user, ":send"] => only("POST", Send(Scope::User(user))),
        ["users", user, ":closeConnections"] => only("POST", Close(Scope::User(user))),
        ["users", user] => only("HEAD", Exists(Scope::User(user))),
        ["users", user, "groups"] => only("DELETE", RemoveUserFromAllGroups { user }),
        ["users", user, "groups", group] => match method {
            "PUT" => Ok(AddUserToGroup { group, user }),
            "DELETE" => Ok(RemoveUserFromGroup { group, user }),
            "HEAD" => Ok(UserInGroup { group, user }),
            _ => Err(Unrouted::MethodNotAllowed("PUT, DELETE, HEAD")),
        },
        ["connections", id, ":send"] => only("POST", Send(Scope::Connection(id))),
        ["connections", id, ":invoke"] => only("POST", Invoke { connection: id }),
        ["connections", id, "groups"] => {
            only("DELETE", RemoveConnectionFromAllGroups { connection: id })
        }
        ["connections", id] => match method {
            "DELETE" => Ok(Close(Scope::Connection(id))),
            "HEAD" => Ok(Exists(Scope::Connection(id))),
            _ => Err(Unrouted::MethodNotAllowed("DELETE, HEAD")),
        },
        ["groups", group, ":send"] => only("POST", Send(Scope::Group(group))),
        ["groups", group, ":closeConnections"] => only("POST", Close(Scope::Group(group))),
        ["groups", group] => only("HEAD", Exists(Scope::Group(group))),
        ["groups", group, "connections"] => only("GET", ListGroupConnections { group }),
        ["groups", group, "connections", connection] => match method {
            "PUT" => Ok(AddConnectionToGroup { group, connection }),
            "DELETE" => Ok(RemoveConnectionFromGroup { group, connection }),
            _ => Err(Unrouted::MethodNotAllowed("PUT, DELETE")),
        },
        _ => Err(Unrouted::NotFound),
    }
}

fn is_health(head: &RequestHead) -> bool {
    matches!(head.path.as_str(), "/api/health" | "/api/v1/health")
}

/// The hosts a client may have addressed this node by: `Host`, and behind a proxy
/// `X-Forwarded-Host` (its first value).
fn request_hosts(head: &RequestHead) -> Vec<&str> {
    let forwarded = head
        .header_str("x-forwarded-host")
        .and_then(|hosts| hosts.split(',').next());
    head.header_str("host")
        .into_iter()
        .chain(forwarded)
        .collect()
}

/// The access keys, or the answer that the API is off.
fn keys(context: &HubContext) -> Result<&AccessKeys, Reply> {
    context.node.access_keys.as_ref().ok_or_else(|| {
        Reply::error(
            404,
            code::DISABLED,
            "The Azure SignalR Service API is disabled: start ringhub with --access-key.",
        )
    })
}

/// Checks the call's token: signed with an access key, unexpired, for this URL.
fn authorize(context: &HubContext, head: &RequestHead) -> Result<(), Reply> {
    let keys = keys(context)?;
    let audience = Audience::Rest { path: &head.path };
    keys.verify(head.bearer_token(), audience, &request_hosts(head))
        .map(drop)
        .map_err(|e| {
            let why = match e {
                AuthError::MissingToken => {
                    "An access token is required (Authorization: Bearer <JWT signed with an access key>).".to_owned()
                }
                AuthError::InvalidToken(why) => format!("The access token is not valid: {why}."),
            };
            Reply::error(401, code::UNAUTHORIZED, why)
        })
}

/// The hub a call is for: lower-cased, after `application_` if given.
fn hub_name(hub: &str, head: &RequestHead) -> Result<String, Reply> {
    let hub = match head.query_param("application") {
        Some(application) if !application.is_empty() => format!("{application}_{hub}"),
        _ => hub.to_owned(),
    }
    .to_ascii_lowercase();
    if !valid_hub_name(&hub) {
        return Err(Reply::bad_request(
            "The hub name (with its application prefix) must match [A-Za-z0-9_-]{1,64}.",
        ));
    }
    Ok(hub)
}

async fn route(context: &HubContext, request: Request<'_>) -> Result<Reply, Reply> {
    let head = request.head;
    if is_health(head) {
        return Ok(match head.method.as_str() {
            "HEAD" | "GET" if context.node.readiness().is_ok() => Reply::status(200),
            "HEAD" | "GET" => Reply::error(503, code::UNAVAILABLE, "The node is not ready."),
            _ => method_not_allowed("HEAD, GET"),
        });
    }
    authorize(context, head)?;
    let Some(segments) = head.path_segments() else {
        return Err(Reply::bad_request("The path is not valid UTF-8."));
    };
    let segments: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
    let method = head.method.as_str();
    let (family, hub, routed) = match segments.as_slice() {
        ["api", "v1", "hubs", hub, rest @ ..] => (Family::V1, *hub, route_v1(method, rest)),
        ["api", "hubs", hub, rest @ ..] => {
            if head.query_param("api-version").is_none_or(|v| v.is_empty()) {
                return Err(Reply::bad_request(
                    "The api-version query parameter is required (api-version=2024-12-01).",
                ));
            }
            (Family::Versioned, *hub, route_versioned(method, rest))
        }
        _ => (Family::V1, "", Err(Unrouted::NotFound)),
    };
    let operation = match routed {
        Ok(operation) => operation,
        Err(Unrouted::NotFound) => return Err(Reply::error(404, code::NOT_FOUND, "No such API.")),
        Err(Unrouted::MethodNotAllowed(allow)) => return Err(method_not_allowed(allow)),
    };
    let hub = hub_name(hub, head)?;
    check_names(&operation).map_err(Reply::refused)?;
    let call = Call {
        context,
        head,
        body: request.body,
        family,
        hub: &hub,
    };
    call.run(operation).await
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut reply = Reply::error(
        405,
        code::METHOD_NOT_ALLOWED,
        format!("This path accepts {allow}."),
    );
    reply.allow = Some(allow);
    reply
}

/// Holds the group names and user ids an operation names to the contract's limits.
fn check_names(operation: &Operation<'_>) -> Result<(), ContextError> {
    use Operation::*;
    let scope = |scope: &Scope<'_>| match scope {
        Scope::Group(group) => check_group(group),
        Scope::User(user) => check_user(user),
        Scope::Hub | Scope::Connection(_) => Ok(()),
    };
    match operation {
        Send(s) | Exists(s) | Close(s) => scope(s),
        AddConnectionToGroup { group, .. }
        | RemoveConnectionFromGroup { group, .. }
        | ListGroupConnections { group } => check_group(group),
        AddUserToGroup { group, user }
        | RemoveUserFromGroup { group, user }
        | UserInGroup { group, user } => check_group(group).and_then(|()| check_user(user)),
        RemoveUserFromAllGroups { user } => check_user(user),
        RemoveConnectionFromAllGroups { .. } | GenerateToken | Invoke { .. } => Ok(()),
    }
}

/// Azure's `PayloadMessage`: `{"target": "...", "arguments": [...]}` (the v1 swagger
/// spells them `Target` and `Arguments`; .NET reads either).
#[derive(Deserialize)]
struct PayloadMessage {
    #[serde(alias = "Target")]
    target: String,
    #[serde(default, alias = "Arguments")]
    arguments: Vec<Value>,
}

/// The longest page of a group's connections (and the default).
const MAX_PAGE_SIZE: usize = 200;
/// Azure keeps a user in a group added without `ttl` for a year at most; ringhub keeps
/// it until removed, and a longer `ttl` the same way.
const LONGEST_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// One call, routed and authorized.
struct Call<'a> {
    context: &'a HubContext,
    head: &'a RequestHead,
    body: &'a [u8],
    family: Family,
    hub: &'a str,
}

impl Call<'_> {
    /// The success status of a change: v1 answers every change `202`.
    fn changed(&self, versioned: u16) -> Reply {
        Reply::status(match self.family {
            Family::V1 => 202,
            Family::Versioned => versioned,
        })
    }

    /// Every value of a repeated query parameter (`excluded=a&excluded=b`).
    fn query_all(&self, name: &str) -> Vec<String> {
        self.head
            .query_pairs()
            .into_iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// An optional numeric query parameter.
    fn query_number(&self, name: &str) -> Result<Option<i64>, Reply> {
        self.head
            .query_param(name)
            .map(|text| {
                text.parse::<i64>().map_err(|_| {
                    Reply::bad_request(format!("'{name}' must be an integer, not '{text}'."))
                })
            })
            .transpose()
    }

    async fn run(&self, operation: Operation<'_>) -> Result<Reply, Reply> {
        use Operation::*;
        let context = self.context;
        let hub = self.hub;
        match operation {
            Send(scope) => self.send(scope).await,
            AddConnectionToGroup { group, connection } => {
                match context.add_to_group(hub, connection, group).await {
                    Ok(true) => Ok(self.changed(200)),
                    Ok(false) => Err(unknown_connection(connection)),
                    Err(e) => Err(Reply::refused(e)),
                }
            }
            RemoveConnectionFromGroup { group, connection } => {
                // Not being in the group (or connected) leaves nothing to remove.
                let _ = context
                    .remove_from_group(hub, connection, group)
                    .await
                    .map_err(Reply::refused)?;
                Ok(self.changed(200))
            }
            RemoveConnectionFromAllGroups { connection } => {
                let _ = context
                    .remove_from_all_groups(hub, connection)
                    .await
                    .map_err(Reply::refused)?;
                Ok(self.changed(200))
            }
            AddUserToGroup { group, user } => self.add_user_to_group(group, user).await,
            RemoveUserFromGroup { group, user } => {
                context.node.membership_expiry.revoke(hub, user, group);
                context
                    .remove_user_from_group(hub, user, group)
                    .await
                    .map_err(Reply::refused)?;
                Ok(self.changed(204))
            }
            RemoveUserFromAllGroups { user } => {
                let durable = context
                    .user_groups(hub, user)
                    .await
                    .map_err(Reply::refused)?;
                for group in durable {
                    context.node.membership_expiry.revoke(hub, user, &group);
                    context
                        .remove_user_from_group(hub, user, &group)
                        .await
                        .map_err(Reply::refused)?;
                }
                // And the groups its connections joined one by one.
                for connection in context.user_connections(hub, user) {
                    let _ = context
                        .remove_from_all_groups(hub, &connection)
                        .await
                        .map_err(Reply::refused)?;
                }
                Ok(self.changed(204))
            }
            Exists(scope) => {
                let exists = match scope {
                    Scope::Connection(id) => context.is_connected(hub, id),
                    Scope::User(user) => context.is_user_online(hub, user),
                    Scope::Group(group) => context.group_presence(hub, group).connections > 0,
                    Scope::Hub => true,
                };
                Ok(found(exists))
            }
            UserInGroup { group, user } => {
                let durable = context
                    .user_groups(hub, user)
                    .await
                    .map_err(Reply::refused)?;
                let connected = context
                    .group_presence(hub, group)
                    .user_ids
                    .iter()
                    .any(|u| u == user);
                Ok(found(connected || durable.iter().any(|g| g == group)))
            }
            ListGroupConnections { group } => self.list_group_connections(group).await,
            Close(scope) => self.close(scope).await,
            GenerateToken => self.generate_token(),
            Invoke { connection } => self.invoke(connection).await,
        }
    }

    /// A client result (`ClientInvocationResponse`): the connection's answer as
    /// `result`. A connection no node holds, or that ends first, is `404`; the client's
    /// own error (no such handler included) `400` with its text; no answer within
    /// `--client-result-timeout-secs` `504`.
    async fn invoke(&self, connection: &str) -> Result<Reply, Reply> {
        let message = self.payload()?;
        let answer = self
            .context
            .invoke_client::<Value>(self.hub, connection, &message.target, message.arguments)
            .await;
        match answer {
            Ok(result) => Ok(Reply::json(
                200,
                json!({ "result": result, "protocol": "json" }),
            )),
            Err(e @ (ContextError::NoSuchConnection(_) | ContextError::ClientDisconnected(_))) => {
                Err(Reply::error(
                    404,
                    code::CONNECTION_NOT_EXISTED,
                    e.to_string(),
                ))
            }
            Err(e @ ContextError::ClientError(_)) => {
                Err(Reply::error(400, code::INVOCATION_FAILED, e.to_string()))
            }
            Err(e @ ContextError::ClientResultTimeout { .. }) => {
                Err(Reply::error(504, code::UNAVAILABLE, e.to_string()))
            }
            Err(e) => Err(Reply::refused(e)),
        }
    }

    /// The body of a send or an invoke: a JSON `PayloadMessage` within the message limit.
    fn payload(&self) -> Result<PayloadMessage, Reply> {
        let is_msgpack = self
            .head
            .header_str("content-type")
            .is_some_and(|t| t.contains("msgpack") || t.contains("octet-stream"));
        if is_msgpack {
            return Err(Reply::error(
                415,
                code::UNSUPPORTED_MEDIA_TYPE,
                "Only JSON payloads are taken (Content-Type: application/json).",
            ));
        }
        if self.body.is_empty() {
            return Err(Reply::bad_request(
                "A JSON body {\"target\": ..., \"arguments\": [...]} is required.",
            ));
        }
        let limit = self.context.message_limit();
        if self.body.len() > limit {
            return Err(Reply::error(
                413,
                code::TOO_LARGE,
                format!("The message is larger than the limit of {limit} bytes."),
            ));
        }
        let message: PayloadMessage = serde_json::from_slice(self.body).map_err(|e| {
            Reply::bad_request(format!("The body is not a valid payload message: {e}."))
        })?;
        if message.target.is_empty() {
            return Err(Reply::bad_request("\"target\" must not be empty."));
        }
        Ok(message)
    }

    async fn send(&self, scope: Scope<'_>) -> Result<Reply, Reply> {
        let message = self.payload()?;
        let excluded = self.query_all("excluded");
        let target = match scope {
            Scope::Hub if excluded.is_empty() => Target::All,
            Scope::Hub => Target::AllExcept(excluded),
            Scope::Group(group) if excluded.is_empty() => Target::Group(group.to_owned()),
            Scope::Group(group) => Target::GroupExcept(group.to_owned(), excluded),
            Scope::User(user) => Target::User(user.to_owned()),
            // Sent whether or not it is connected, as Azure does (it answers 202 alike).
            Scope::Connection(id) => Target::Connection(id.to_owned()),
        };
        let given_up = self.context.node.config.rest_timeout;
        self.context
            .send_unless(
                self.hub,
                target,
                &message.target,
                message.arguments,
                monoio::time::sleep(given_up),
            )
            .await
            .map_err(Reply::refused)?;
        Ok(Reply::status(202))
    }

    /// Azure's `ttl`: absent, the user is in the group durably (until removed); `0`, only
    /// its current connections join; `n`, durably for `n` seconds (the node that took the
    /// call removes it then, unless a later call changed it).
    async fn add_user_to_group(&self, group: &str, user: &str) -> Result<Reply, Reply> {
        let (context, hub) = (self.context, self.hub);
        let ttl = match self.query_number("ttl")? {
            Some(seconds) if seconds < 0 => {
                return Err(Reply::bad_request("'ttl' must not be negative."))
            }
            Some(seconds) => Some(Duration::from_secs(seconds as u64)),
            None => None,
        };
        if ttl == Some(Duration::ZERO) {
            for connection in context.user_connections(hub, user) {
                context
                    .add_to_group(hub, &connection, group)
                    .await
                    .map_err(Reply::refused)?;
            }
            return Ok(self.changed(200));
        }
        let expiry = &context.node.membership_expiry;
        let expiring = ttl.filter(|ttl| *ttl < LONGEST_TTL);
        let grant = match expiring {
            Some(_) => expiry.grant(hub, user, group),
            None => {
                expiry.revoke(hub, user, group);
                0
            }
        };
        context
            .add_user_to_group(hub, user, group)
            .await
            .map_err(Reply::refused)?;
        if let Some(ttl) = expiring {
            let context = context.clone();
            let (hub, user, group) = (hub.to_owned(), user.to_owned(), group.to_owned());
            monoio::spawn(async move {
                monoio::time::sleep(ttl).await;
                if context
                    .node
                    .membership_expiry
                    .expire(&hub, &user, &group, grant)
                {
                    if let Err(e) = context.remove_user_from_group(&hub, &user, &group).await {
                        tracing::warn!(%hub, %user, %group, "an expired group membership could not be removed: {e}");
                    }
                }
            });
        }
        Ok(self.changed(200))
    }

    /// A page of the group's connections (this node's), by connection id:
    /// `continuationToken` is the last id of the previous page, `nextLink` the URL of the
    /// next page while there is one.
    async fn list_group_connections(&self, group: &str) -> Result<Reply, Reply> {
        let page_size = match self.query_number("maxpagesize")? {
            None => MAX_PAGE_SIZE,
            Some(n) if (1..=MAX_PAGE_SIZE as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(Reply::bad_request(format!(
                    "'maxpagesize' must be between 1 and {MAX_PAGE_SIZE}, not {n}."
                )))
            }
        };
        let top = match self.query_number("top")? {
            None => None,
            Some(n) if n >= 1 => Some(n as usize),
            Some(n) => {
                return Err(Reply::bad_request(format!(
                    "'top' must be at least 1, not {n}."
                )))
            }
        };
        let after = self.head.query_param("continuationToken");
        let members = self
            .context
            .group_members(self.hub, group)
            .await
            .map_err(Reply::refused)?;
        let start = match &after {
            Some(last) => members.partition_point(|(id, _)| id <= last),
            None => 0,
        };
        let take = top.map_or(page_size, |top| top.min(page_size));
        let page = &members[start..(start + take).min(members.len())];
        let value: Vec<serde_json::Value> = page
            .iter()
            .map(|(connection, user)| match user {
                Some(user) => json!({ "connectionId": connection, "userId": user }),
                None => json!({ "connectionId": connection }),
            })
            .collect();
        let remaining_top = top.map(|top| top - page.len());
        let more = start + page.len() < members.len() && remaining_top != Some(0);
        let mut body = json!({ "value": value });
        if let (true, Some((last, _))) = (more, page.last()) {
            body["nextLink"] = json!(self.next_link(last, page_size, remaining_top));
        }
        Ok(Reply::json(200, body))
    }

    /// The absolute URL of the page after `last`.
    fn next_link(&self, last: &str, page_size: usize, top: Option<usize>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in self.head.query_pairs() {
            if !matches!(name.as_str(), "continuationToken" | "top" | "maxpagesize") {
                query.append_pair(&name, &value);
            }
        }
        query.append_pair("maxpagesize", &page_size.to_string());
        if let Some(top) = top {
            query.append_pair("top", &top.to_string());
        }
        query.append_pair("continuationToken", last);
        format!("{}{}?{}", self.origin(), self.head.path, query.finish())
    }

    /// `scheme://host` as the client reached this node (`X-Forwarded-Proto` and
    /// `X-Forwarded-Host` behind a proxy).
    fn origin(&self) -> String {
        let scheme = self
            .head
            .header_str("x-forwarded-proto")
            .and_then(|p| p.split(',').next())
            .map(str::trim)
            .filter(|p| matches!(*p, "http" | "https"))
            .unwrap_or("http");
        let host = request_hosts(self.head)
            .last()
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| self.context.node.config.listen.to_string());
        format!("{scheme}://{host}")
    }

    async fn close(&self, scope: Scope<'_>) -> Result<Reply, Reply> {
        let (context, hub) = (self.context, self.hub);
        let reason = self.head.query_param("reason").filter(|r| !r.is_empty());
        let connections = match scope {
            Scope::Connection(id) => {
                // Closing a connection that is gone already leaves nothing to do.
                let _ = context
                    .close_connection_because(hub, id, reason.as_deref())
                    .await
                    .map_err(Reply::refused)?;
                return Ok(self.changed(200));
            }
            Scope::Hub => context.hub_connections(hub),
            Scope::User(user) => context.user_connections(hub, user),
            Scope::Group(group) => context
                .group_members(hub, group)
                .await
                .map_err(Reply::refused)?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        };
        let excluded = self.query_all("excluded");
        for id in connections.iter().filter(|id| !excluded.contains(id)) {
            let _ = context
                .close_connection_because(hub, id, reason.as_deref())
                .await
                .map_err(Reply::refused)?;
        }
        Ok(self.changed(204))
    }

    /// `{"token": ...}`: a client token for this hub's client endpoint, for `userId` (in
    /// `nameid`), valid `minutesToExpire` minutes (default 60), signed with the primary
    /// key.
    fn generate_token(&self) -> Result<Reply, Reply> {
        let minutes = match self.query_number("minutesToExpire")? {
            None => 60,
            Some(n) if (1..=i64::from(i32::MAX)).contains(&n) => n as u64,
            Some(n) => {
                return Err(Reply::bad_request(format!(
                    "'minutesToExpire' must be at least 1, not {n}."
                )))
            }
        };
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = json!({
            "aud": format!("{}/client/?hub={}", self.origin(), self.hub),
            "iat": now,
            "nbf": now,
            "exp": now + minutes * 60,
        });
        if let Some(user) = self.head.query_param("userId").filter(|u| !u.is_empty()) {
            check_user(&user).map_err(Reply::refused)?;
            claims["nameid"] = json!(user);
        }
        let keys = keys(self.context)?;
        Ok(Reply::json(200, json!({ "token": keys.sign(&claims) })))
    }
}

/// `200` if it exists, `404` otherwise (bodiless: these answer `HEAD`).
fn found(exists: bool) -> Reply {
    Reply::status(if exists { 200 } else { 404 })
}

fn unknown_connection(id: &str) -> Reply {
    Reply::error(
        404,
        code::CONNECTION_NOT_EXISTED,
        format!("Connection '{id}' does not exist."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::*;

    #[test]
    fn both_families_route_every_operation() {
        fn v1<'a>(method: &str, path: &'a str) -> Option<Operation<'a>> {
            let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            route_v1(method, &rest).ok()
        }
        assert_eq!(v1("POST", ""), Some(Send(Scope::Hub)));
        assert_eq!(v1("POST", "users/ann"), Some(Send(Scope::User("ann"))));
        assert_eq!(v1("GET", "users/ann"), Some(Exists(Scope::User("ann"))));
        assert_eq!(
            v1("DELETE", "connections/c"),
            Some(Close(Scope::Connection("c")))
        );
        assert_eq!(v1("HEAD", "groups/g"), Some(Exists(Scope::Group("g"))));
        for path in ["groups/g/connections/c", "connections/c/groups/g"] {
            assert_eq!(
                v1("PUT", path),
                Some(AddConnectionToGroup {
                    group: "g",
                    connection: "c"
                })
            );
        }
        for path in ["groups/g/users/u", "users/u/groups/g"] {
            assert_eq!(
                v1("GET", path),
                Some(UserInGroup {
                    group: "g",
                    user: "u"
                })
            );
        }
        assert_eq!(
            v1("DELETE", "users/u/groups"),
            Some(RemoveUserFromAllGroups { user: "u" })
        );
        assert_eq!(v1("PATCH", "users/u"), None);
        assert_eq!(v1("POST", "nothing/here"), None);

        fn versioned<'a>(method: &str, path: &'a str) -> Option<Operation<'a>> {
            let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            route_versioned(method, &rest).ok()
        }
        assert_eq!(versioned("POST", ":send"), Some(Send(Scope::Hub)));
        assert_eq!(
            versioned("POST", ":closeConnections"),
            Some(Close(Scope::Hub))
        );
        assert_eq!(versioned("POST", ":generateToken"), Some(GenerateToken));
        assert_eq!(
            versioned("POST", "groups/g/:send"),
            Some(Send(Scope::Group("g")))
        );
        assert_eq!(
            versioned("GET", "groups/g/connections"),
            Some(ListGroupConnections { group: "g" })
        );
        assert_eq!(
            versioned("HEAD", "users/u/groups/g"),
            Some(UserInGroup {
                group: "g",
                user: "u"
            })
        );
        assert_eq!(
            versioned("DELETE", "connections/c/groups"),
            Some(RemoveConnectionFromAllGroups { connection: "c" })
        );
        assert_eq!(
            versioned("POST", "connections/c/:invoke"),
            Some(Invoke { connection: "c" })
        );
        assert_eq!(versioned("GET", ":send"), None);
        assert_eq!(versioned("POST", "groups/g"), None);
        assert!(matches!(
            route_versioned("GET", &["users", "u"]),
            Err(Unrouted::MethodNotAllowed("HEAD"))
        ));
    }

    fn head(text: &str) -> RequestHead {
        let request = format!("{text} HTTP/1.1\r\nHost: h\r\n\r\n");
        wire::parse_request_head(request.as_bytes(), wire::HttpLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn azure_calls_are_told_apart_from_ringhubs_own() {
        assert!(is_azure_request(&head("POST /api/v1/hubs/chat")));
        assert!(is_azure_request(&head(
            "HEAD /api/health?api-version=2024-12-01"
        )));
        assert!(is_azure_request(&head(
            "POST /api/hubs/chat/:send?api-version=2024-12-01"
        )));
        assert!(is_azure_request(&head(
            "PUT /api/hubs/chat/groups/g/connections/c?api-version=2022-06-01"
        )));
        assert!(is_azure_request(&head("POST /api/hubs/chat/:send")));
        assert!(!is_azure_request(&head(
            "PUT /api/hubs/chat/groups/g/connections/c"
        )));
        assert!(!is_azure_request(&head("POST /api/hubs/chat/messages")));
        assert!(!is_azure_request(&head("GET /api/openapi.json")));
    }

    #[test]
    fn hub_names_are_lower_cased_after_their_application() {
        assert_eq!(
            hub_name("Chat", &head("GET /x")).ok().as_deref(),
            Some("chat")
        );
        assert_eq!(
            hub_name("Chat", &head("GET /x?application=MyApp"))
                .ok()
                .as_deref(),
            Some("myapp_chat")
        );
        assert!(hub_name("no.dots", &head("GET /x")).is_err());
    }
}
