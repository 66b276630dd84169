//! The built-in hub of the contract (section 4), written on the public embedding API,
//! and the node's upstreams (section 11): what it is not built to do (any other
//! method, and a connection's arrival and departure) goes to them. Method names match
//! case-insensitively, as in ASP.NET Core.

use ringhub_protocol::Value;

use crate::api::{Call, Caller, Hub, HubContext, HubError, LocalBoxFuture, Target};
use crate::presence::PRESENCE_CHANGED;
use crate::upstream::UpstreamCall;

/// The refusal of a join or group send without the right to the group.
pub const GROUP_NOT_AUTHORIZED: &str = "Access to this group is not authorized.";
/// The refusal of an admin-only method.
pub const ADMIN_REQUIRED: &str = "This method requires the admin role.";

/// The hub `ringhub serve` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinHub;

impl Hub for BuiltinHub {
    fn invoke<'a>(&'a self, call: Call<'a>) -> LocalBoxFuture<'a, Result<Value, HubError>> {
        Box::pin(dispatch(call))
    }

    fn on_connected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(upstream) = context.upstream() {
                upstream.connected(caller).await;
            }
        })
    }

    fn on_disconnected<'a>(
        &'a self,
        caller: &'a Caller,
        context: &'a HubContext,
    ) -> LocalBoxFuture<'a, ()> {
        if let Some(upstream) = context.upstream() {
            upstream.disconnected(caller);
        }
        Box::pin(async {})
    }
}

/// Any other method: the upstream's, if one takes it.
async fn upstream(call: Call<'_>) -> Result<Value, HubError> {
    let Some(upstream) = call.context.upstream() else {
        return Err(HubError::UnknownMethod(call.method.to_owned()));
    };
    if !call.uploads.is_empty() {
        return Err(call.invalid_arguments("upload streams do not go upstream".into()));
    }
    upstream
        .invoke(UpstreamCall {
            caller: call.caller,
            protocol: call.protocol,
            invocation_id: call.invocation_id,
            target: call.method,
            arguments: call.arguments,
        })
        .await
}

fn require_admin(call: &Call<'_>) -> Result<(), HubError> {
    match &call.caller.claims {
        Some(claims) if !claims.is_admin() => Err(HubError::exception(ADMIN_REQUIRED)),
        _ => Ok(()),
    }
}

fn require_group(call: &Call<'_>, group: &str) -> Result<(), HubError> {
    if call.context.may_join(call.caller, group) {
        Ok(())
    } else {
        Err(HubError::exception(GROUP_NOT_AUTHORIZED))
    }
}

/// A send's `target, args[]` starting at argument `at`.
fn message(call: &mut Call<'_>, at: usize) -> Result<(String, Vec<Value>), HubError> {
    call.expect_arguments(at + 2)?;
    let target: String = call.arg(at)?;
    if target.is_empty() {
        return Err(
            call.invalid_arguments(format!("argument {} (target) must not be empty", at + 1))
        );
    }
    let arguments = match call.take_arg(at + 1)? {
        Value::Array(items) => items,
        other => {
            return Err(call.invalid_arguments(format!(
                "argument {} must be an array, got {}",
                at + 2,
                other.kind()
            )))
        }
    };
    Ok((target, arguments))
}

async fn send(
    call: &Call<'_>,
    target: Target,
    method: String,
    arguments: Vec<Value>,
) -> Result<Value, HubError> {
    call.context
        .send(&call.caller.hub, target, &method, arguments)
        .await?;
    Ok(Value::Null)
}

fn me(caller: &Caller) -> Vec<String> {
    vec![caller.connection_id.clone()]
}

async fn dispatch(mut call: Call<'_>) -> Result<Value, HubError> {
    let method = call.method.to_ascii_lowercase();
    match method.as_str() {
        "echo" => {
            call.expect_arguments(1)?;
            call.take_arg(0)
        }
        "joingroup" | "leavegroup" => {
            call.expect_arguments(1)?;
            let group: String = call.arg(0)?;
            let (hub, id) = (&call.caller.hub, &call.caller.connection_id);
            let done = if method == "joingroup" {
                require_group(&call, &group)?;
                call.context.add_to_group(hub, id, &group).await
            } else {
                call.context.remove_from_group(hub, id, &group).await
            };
            done?;
            Ok(Value::Null)
        }
        "groupcount" => {
            call.expect_arguments(1)?;
            let group: String = call.arg(0)?;
            require_group(&call, &group)?;
            Ok(call
                .context
                .group_presence(&call.caller.hub, &group)
                .counts_value())
        }
        "isuseronline" => {
            call.expect_arguments(1)?;
            let user: String = call.arg(0)?;
            if call.caller.user_id.as_deref() != Some(user.as_str()) {
                require_admin(&call)?;
            }
            Ok(Value::Bool(
                call.context.is_user_online(&call.caller.hub, &user),
            ))
        }
        "watchpresence" | "unwatchpresence" => {
            call.expect_arguments(1)?;
            let group: String = call.arg(0)?;
            let (hub, id) = (&call.caller.hub, &call.caller.connection_id);
            if method == "watchpresence" {
                require_group(&call, &group)?;
                call.context.watch_presence(hub, id, &group).await?;
                // The current counts now; changes follow from the shard's notifier.
                let now = call.context.group_presence(hub, &group);
                send(
                    &call,
                    Target::Connection(id.clone()),
                    PRESENCE_CHANGED.to_owned(),
                    vec![now.changed_value(&group)],
                )
                .await
            } else {
                call.context.unwatch_presence(hub, id, &group).await?;
                Ok(Value::Null)
            }
        }
        "sendtoall" => {
            require_admin(&call)?;
            let (target, args) = message(&mut call, 0)?;
            send(&call, Target::All, target, args).await
        }
        "sendtoothers" => {
            require_admin(&call)?;
            let (target, args) = message(&mut call, 0)?;
            send(&call, Target::AllExcept(me(call.caller)), target, args).await
        }
        "sendtogroup" | "sendtoothersingroup" => {
            let (target, args) = message(&mut call, 1)?;
            let group: String = call.arg(0)?;
            require_group(&call, &group)?;
            let to = if method == "sendtogroup" {
                Target::Group(group)
            } else {
                Target::GroupExcept(group, me(call.caller))
            };
            send(&call, to, target, args).await
        }
        "sendtogroupexcept" => {
            let (target, args) = message(&mut call, 2)?;
            let group: String = call.arg(0)?;
            let except: Vec<String> = call.arg(1)?;
            require_group(&call, &group)?;
            send(&call, Target::GroupExcept(group, except), target, args).await
        }
        "sendtogroups" => {
            let (target, args) = message(&mut call, 1)?;
            let groups: Vec<String> = call.arg(0)?;
            for group in &groups {
                require_group(&call, group)?;
            }
            send(&call, Target::Groups(groups), target, args).await
        }
        "sendtouser" => {
            require_admin(&call)?;
            let (target, args) = message(&mut call, 1)?;
            let user: String = call.arg(0)?;
            send(&call, Target::User(user), target, args).await
        }
        "sendtousers" => {
            require_admin(&call)?;
            let (target, args) = message(&mut call, 1)?;
            let users: Vec<String> = call.arg(0)?;
            send(&call, Target::Users(users), target, args).await
        }
        "sendtoconnection" => {
            // Admin only, like the other direct sends (contract section 4, revised
            // 2026-12-07): connection ids are not secrets (an app may broadcast them).
            require_admin(&call)?;
            let (target, args) = message(&mut call, 1)?;
            let id: String = call.arg(0)?;
            send(&call, Target::Connection(id), target, args).await
        }
        _ => upstream(call).await,
    }
}
