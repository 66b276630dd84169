//! The socketioxide peer for the fan-out benchmark: Socket.IO rooms on tokio, written
//! the way socketioxide's documentation shows. Events: `join(room)` (acknowledged) and
//! `send(room, publisher, seq, sentNs, payload)` (acknowledged), which emits
//! `receive(publisher, seq, sentNs, payload)` to the room.
//!
//! `socketio-peer 127.0.0.1:5094` (single-threaded runtime, so it can be pinned to a core
//! like the other servers).

use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::SocketIo;

async fn on_connect(socket: SocketRef) {
    socket.on(
        "join",
        async |socket: SocketRef, Data(room): Data<String>, ack: AckSender| {
            socket.join(room);
            let _ = ack.send(&());
        },
    );
    socket.on(
        "send",
        async |socket: SocketRef,
               Data((room, publisher, seq, sent, payload)): Data<(
            String,
            u64,
            u64,
            u64,
            String,
        )>,
               ack: AckSender| {
            // A tuple goes out as separate event arguments.
            let _ = socket
                .within(room)
                .emit("receive", &(publisher, seq, sent, payload))
                .await;
            let _ = ack.send(&());
        },
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5094".into());
    let (layer, io) = SocketIo::new_layer();
    io.ns("/", on_connect);
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    eprintln!("socketioxide peer on {addr}");
    axum::serve(listener, app).await.expect("serve");
}
