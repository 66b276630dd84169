//! The socketioxide peer for the fan-out benchmark: Socket.IO rooms on tokio, written
//! the way socketioxide's documentation shows. Events: `join(room)` (acknowledged) and
//! `send(room, publisher, seq, sentNs, payload)` (acknowledged), which emits
//! `receive(publisher, seq, sentNs, payload)` to the room.
//!
//! `socketio-peer 127.0.0.1:5094 [redis://...]` (single-threaded runtime, so it can be
//! pinned to a core like the other servers). With a Redis URL, the node joins the others
//! of that Redis through socketioxide's Redis adapter (`socketioxide-redis`, its fred
//! driver): the cluster workload's peer.

use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;

async fn on_connect<A: Adapter>(socket: SocketRef<A>) {
    socket.on(
        "join",
        async |socket: SocketRef<A>, Data(room): Data<String>, ack: AckSender<A>| {
            socket.join(room);
            let _ = ack.send(&());
        },
    );
    socket.on(
        "send",
        async |socket: SocketRef<A>,
               Data((room, publisher, seq, sent, payload)): Data<(
            String,
            u64,
            u64,
            u64,
            String,
        )>,
               ack: AckSender<A>| {
            // A tuple goes out as separate event arguments.
            let emitted = socket
                .within(room)
                .emit("receive", &(publisher, seq, sent, payload))
                .await;
            if let Err(e) = emitted {
                // Once: a broadcast that fails fails for every send.
                static TOLD: std::sync::Once = std::sync::Once::new();
                TOLD.call_once(|| eprintln!("socketio-peer: broadcast failed: {e}"));
            }
            let _ = ack.send(&());
        },
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5094".into());
    let app = match std::env::args().nth(2) {
        None => {
            let (layer, io) = SocketIo::new_layer();
            io.ns("/", on_connect);
            axum::Router::new().layer(layer)
        }
        Some(url) => {
            let mut config = fred::types::config::Config::from_url(&url).expect("a Redis URL");
            // The adapter publishes on its subscriber connection: RESP3 allows that.
            config.version = fred::types::RespVersion::RESP3;
            // The pub/sub buffer as large as ringhub's backplane keeps (65,536 messages;
            // fred's default of 32 loses messages under load).
            let client = fred::types::Builder::from_config(config)
                .with_performance_config(|p| p.broadcast_channel_capacity = 1 << 16)
                .build_subscriber_client()
                .expect("a Redis client");
            let adapter = socketioxide_redis::RedisAdapterCtr::new_with_fred(client.clone())
                .await
                .expect("Redis");
            let (layer, io) = SocketIo::builder()
                .with_adapter::<socketioxide_redis::FredAdapter<_>>(adapter)
                .build_layer();
            io.ns("/", on_connect).await.expect("the namespace");
            axum::Router::new().layer(layer)
        }
    };
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("socketioxide peer on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
