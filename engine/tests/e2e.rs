//! End-to-end tests over real sockets that need raw control of the client.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{start, wait_ready, RawClient};
use ringhub_engine::Config;

#[test]
fn a_reader_that_stops_is_closed_and_its_group_gets_everything() {
    let server = start(Config {
        threads: 1,
        max_buffered_bytes: 256 * 1024,
        ..Config::default()
    });
    wait_ready(&server);
    let addr = server.local_addr();
    // A 4 KiB receive buffer turns off the kernel's autotuning: the server's queue
    // fills after a few MB instead of tens.
    let mut slow = RawClient::connect(addr, Some(4096));
    assert!(slow
        .invoke("1", "JoinGroup", r#"["g"]"#)
        .contains(r#""result":null"#));
    let mut fast = RawClient::connect(addr, None);
    assert!(fast
        .invoke("1", "JoinGroup", r#"["g"]"#)
        .contains(r#""result":null"#));
    let mut sender = RawClient::connect(addr, None);

    let total = 3000;
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::with_capacity(total);
        while seen.len() < total {
            let message = fast.next_message();
            if let Some(rest) =
                message.strip_prefix(r#"{"type":1,"target":"receive","arguments":["#)
            {
                let seq: usize = rest.split(',').next().unwrap().parse().unwrap();
                seen.push(seq);
            }
        }
        seen
    });
    let payload = "p".repeat(4000);
    for seq in 0..total {
        // Non-blocking sends: no completions to read back.
        sender.send(&format!(
            r#"{{"type":1,"target":"SendToGroup","arguments":["g","receive",[{seq},"{payload}"]]}}"#
        ));
    }
    let seen = reader.join().unwrap();
    assert_eq!(
        seen,
        (0..total).collect::<Vec<_>>(),
        "the reading member got every message in order"
    );
    let closes: u64 = server
        .metrics()
        .shards
        .iter()
        .map(|s| s.slow_consumer_closes.load(Relaxed))
        .sum();
    assert_eq!(closes, 1, "exactly the slow reader was closed");
    // When it reads again it finds the Close message with the contract's sentence.
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut close = None;
    while let Some(message) = slow.try_next_message() {
        if message.starts_with(r#"{"type":7"#) {
            close = Some(message);
        }
    }
    assert_eq!(
        close.as_deref(),
        Some(r#"{"type":7,"error":"Connection closed: client too slow."}"#)
    );
    server.shutdown();
}

#[test]
fn shutdown_tells_every_client_with_reconnect_allowed() {
    let server = start(Config {
        threads: 2,
        ..Config::default()
    });
    wait_ready(&server);
    let mut clients: Vec<RawClient> = (0..4)
        .map(|_| RawClient::connect(server.local_addr(), None))
        .collect();
    for c in &mut clients {
        assert!(c.invoke("1", "Echo", "[1]").contains(r#""result":1"#));
    }
    let started = std::time::Instant::now();
    server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown within a few seconds"
    );
    for c in &mut clients {
        assert_eq!(
            c.try_next_message().as_deref(),
            Some(r#"{"type":7,"allowReconnect":true}"#)
        );
    }
}
