//! Embedding ringhub: a server with its own hub, and a background thread that pushes
//! through a `HubContext`.
//!
//! ```sh
//! cargo run --example embed
//! ```
//! then connect a SignalR client to `http://127.0.0.1:5001/hubs/chat`, call
//! `Say("hello")` and listen for `said` and `tick`; the built-in methods (`JoinGroup`,
//! `SendToGroup`, ...) are there too, handed to the built-in hub.

use std::time::Duration;

use ringhub_engine::builtin::BuiltinHub;
use ringhub_engine::{Call, Config, Hub, HubError, LocalBoxFuture, ServerBuilder, Target, Value};

/// A hub with one method of its own and a refusal the client sees; the rest is the
/// built-in hub's.
struct Chat;

impl Hub for Chat {
    fn invoke<'a>(&'a self, call: Call<'a>) -> LocalBoxFuture<'a, Result<Value, HubError>> {
        Box::pin(async move {
            if !call.method.eq_ignore_ascii_case("Say") {
                // Everything else is the built-in hub's (JoinGroup, SendToGroup, ...).
                return BuiltinHub.invoke(call).await;
            }
            call.expect_arguments(1)?;
            let text: String = call.arg(0)?;
            if text.is_empty() {
                return Err(HubError::exception("Say something."));
            }
            let from = call
                .caller
                .user_id
                .clone()
                .unwrap_or_else(|| call.caller.connection_id.clone());
            let said = vec![from.into(), text.into()];
            call.context
                .send(&call.caller.hub, Target::All, "said", said)
                .await?;
            Ok(Value::Null)
        })
    }
}

fn main() {
    let config = Config {
        listen: "127.0.0.1:5001".parse().expect("address"),
        threads: 2,
        ..Config::default()
    };
    let server = ServerBuilder::new(config)
        .hub(|| Chat)
        .start()
        .expect("server starts");
    eprintln!("embedded ringhub on {}", server.local_addr());

    // Any thread (or runtime) can hold the context and push.
    let context = server.context();
    std::thread::spawn(move || {
        for n in 0i64.. {
            std::thread::sleep(Duration::from_secs(1));
            let pushed = futures_executor::block_on(context.send(
                "chat",
                Target::All,
                "tick",
                vec![n.into()],
            ));
            if pushed.is_err() {
                return; // shutting down
            }
        }
    });

    std::thread::sleep(Duration::from_secs(u64::MAX / 4));
}
