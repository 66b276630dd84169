//! ringhub beside tokio: an axum HTTP API and a ringhub server in one process. An axum
//! handler sends to a room (a group) and asks a connected client for an answer (a
//! client result), both through the `HubContext`, which works from any runtime.
//!
//! ```sh
//! cargo run --example axum_embed -- --listen 127.0.0.1:5000 --http-listen 127.0.0.1:8080
//! curl -X POST -d 'hello' http://127.0.0.1:8080/rooms/lobby/messages
//! curl 'http://127.0.0.1:8080/connections/<connection id>/ask?question=tea'
//! ```
//! SignalR clients connect to `http://127.0.0.1:5000/hubs/chat`, call `Join("lobby")`,
//! listen for `message` and answer `Answer(question)`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use ringhub_engine::{hub, Caller, ContextError, HubContext, HubError, ServeArgs, Target};

const HUB: &str = "chat";

#[derive(Parser)]
#[command(name = "axum_embed")]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    /// Where the axum HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: std::net::SocketAddr,
}

struct Chat;

#[hub]
impl Chat {
    async fn join(
        &self,
        caller: &Caller,
        context: &HubContext,
        room: String,
    ) -> Result<(), HubError> {
        context
            .add_to_group(&caller.hub, &caller.connection_id, &room)
            .await?;
        Ok(())
    }
}

/// `POST /rooms/{room}/messages`: the body goes to the room as `message(text)`.
async fn post_message(
    State(context): State<HubContext>,
    Path(room): Path<String>,
    text: String,
) -> (StatusCode, String) {
    match context
        .send(HUB, Target::Group(room), "message", vec![text.into()])
        .await
    {
        Ok(()) => (StatusCode::ACCEPTED, String::new()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct Question {
    question: String,
}

/// `GET /connections/{id}/ask?question=...`: the client's `Answer(question)`.
async fn ask(
    State(context): State<HubContext>,
    Path(connection_id): Path<String>,
    Query(Question { question }): Query<Question>,
) -> (StatusCode, String) {
    let answer = context
        .invoke_client::<String>(HUB, &connection_id, "Answer", vec![question.into()])
        .await;
    match answer {
        Ok(answer) => (StatusCode::OK, answer),
        Err(e @ (ContextError::NoSuchConnection(_) | ContextError::ClientDisconnected(_))) => {
            (StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ ContextError::ClientResultTimeout { .. }) => {
            (StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

fn main() -> std::process::ExitCode {
    ringhub_engine::cli::init_logging();
    let cli = Cli::parse();
    let http_listen = cli.http_listen;
    let started = move |server: &ringhub_engine::Server| {
        let context = server.context();
        // axum on a tokio runtime of its own thread; ringhub's shards keep theirs.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            let served = runtime.block_on(async move {
                let app = Router::new()
                    .route("/rooms/{room}/messages", post(post_message))
                    .route("/connections/{id}/ask", get(ask))
                    .with_state(context);
                let listener = tokio::net::TcpListener::bind(http_listen).await?;
                tracing::info!(http_address = %listener.local_addr()?, "axum listening");
                axum::serve(listener, app).await
            });
            if let Err(e) = served {
                tracing::error!("axum stopped: {e}");
            }
        });
    };
    ringhub_engine::cli::serve(
        "axum_embed",
        cli.serve,
        |b| b.map_hub(HUB, || Chat),
        started,
    )
}
