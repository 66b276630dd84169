//! The typed hub of the contract (section 9): `#[hub]` methods with serde arguments, a
//! stream to the client, a stream from the client, a client result, and groups.
//!
//! ```sh
//! cargo run --release --example typed_hub -- --listen 127.0.0.1:5000
//! ```
//! then connect a SignalR client to `http://127.0.0.1:5000/hubs/typed` (the same flags
//! as `ringhub serve`).

use std::time::Duration;

use clap::Parser;
use futures_util::stream;
use ringhub_engine::{hub, Caller, ClientStream, HubContext, HubError, ServeArgs, Stream, Target};

#[derive(Parser)]
#[command(name = "typed_hub")]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

struct Typed;

#[hub]
impl Typed {
    fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    /// `0..count`, one every `delay_ms` (the first after `delay_ms` too: a client that
    /// subscribes only once its call is sent, as signalrcore does, misses nothing).
    fn counter(&self, count: u32, delay_ms: u32) -> impl Stream<Item = u32> {
        let delay = Duration::from_millis(u64::from(delay_ms));
        stream::unfold(0, move |n| async move {
            if n >= count {
                return None;
            }
            ringhub_engine::runtime::sleep(delay).await;
            Some((n, n + 1))
        })
    }

    async fn sum(&self, mut numbers: ClientStream<i64>) -> Result<i64, HubError> {
        let mut total = 0i64;
        while let Some(number) = numbers.next().await {
            total = total.saturating_add(number?);
        }
        Ok(total)
    }

    /// Asks connection `connection_id` (on any shard or node) to `Answer(question)`.
    async fn ask(
        &self,
        caller: &Caller,
        context: &HubContext,
        connection_id: String,
        question: String,
    ) -> Result<String, HubError> {
        let answer = context
            .invoke_client(&caller.hub, &connection_id, "Answer", vec![question.into()])
            .await?;
        Ok(answer)
    }

    async fn join_group(
        &self,
        caller: &Caller,
        context: &HubContext,
        group: String,
    ) -> Result<(), HubError> {
        context
            .add_to_group(&caller.hub, &caller.connection_id, &group)
            .await?;
        Ok(())
    }

    async fn say(
        &self,
        caller: &Caller,
        context: &HubContext,
        group: String,
        text: String,
    ) -> Result<(), HubError> {
        let from = caller.connection_id.clone();
        let said = vec![from.into(), text.into()];
        context
            .send(&caller.hub, Target::Group(group), "said", said)
            .await?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    ringhub_engine::cli::init_logging();
    let serve = Cli::parse().serve;
    ringhub_engine::cli::serve("typed_hub", serve, |b| b.map_hub("typed", || Typed), |_| {})
}
