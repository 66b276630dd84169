//! End-to-end tests over real sockets that need raw control of the client.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{server_end_open, server_end_open_between, start, start_with_shards, RawClient};
use ringhub_engine::{Config, Target};

#[test]
fn a_reader_that_stops_is_closed_and_its_group_gets_everything() {
    let server = start(Config {
        threads: 1,
        max_buffered_bytes: 256 * 1024,
        ..Config::default()
    });
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
    let server = start_with_shards(2);
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

#[test]
fn a_hub_context_on_another_thread_sends_and_manages_groups() {
    let server = start_with_shards(2);
    let context = server.context();
    let mut members: Vec<(RawClient, String)> = (0..6)
        .map(|_| RawClient::connect_negotiated(server.local_addr()))
        .collect();
    // Join three of them from this (non-shard) thread; they may live on either shard.
    for (_, id) in members.iter().take(3) {
        assert!(futures_executor::block_on(context.add_to_group("test", id, "g")).unwrap());
    }
    futures_executor::block_on(context.send(
        "test",
        Target::Group("g".into()),
        "receive",
        vec!["to g".into()],
    ))
    .unwrap();
    futures_executor::block_on(context.send("test", Target::All, "receive", vec!["to all".into()]))
        .unwrap();
    // Messages from one sender arrive in order: group members see "to g" first.
    for (i, (member, _)) in members.iter_mut().enumerate() {
        let first = member.next_message();
        if i < 3 {
            assert_eq!(
                first,
                r#"{"type":1,"target":"receive","arguments":["to g"]}"#
            );
            assert_eq!(
                member.next_message(),
                r#"{"type":1,"target":"receive","arguments":["to all"]}"#
            );
        } else {
            assert_eq!(
                first,
                r#"{"type":1,"target":"receive","arguments":["to all"]}"#
            );
        }
    }
    let (_, left) = &members[0];
    assert!(futures_executor::block_on(context.remove_from_group("test", left, "g")).unwrap());
    // Unknown connections are a no-op that reports false.
    assert!(
        !futures_executor::block_on(context.add_to_group("test", "no-such-connection", "g"))
            .unwrap()
    );
    server.shutdown();
    let after = futures_executor::block_on(context.send("test", Target::All, "receive", vec![]));
    assert!(after.is_err(), "a stopped server refuses sends");
}

/// Open descriptors of this process (the server runs in it).
#[test]
fn clients_that_vanish_leave_no_descriptor_behind() {
    let server = start_with_shards(2);
    let clients: Vec<RawClient> = (0..20)
        .map(|_| RawClient::connect(server.local_addr(), None))
        .collect();
    assert!(
        clients.iter().all(|c| server_end_open(&c.stream)),
        "the server holds an end of each"
    );
    let ends: Vec<_> = clients
        .iter()
        .map(|c| (c.stream.local_addr().unwrap(), server.local_addr()))
        .collect();
    // Dropped without a close frame: the server sees the end of the stream.
    drop(clients);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let left = || {
        ends.iter()
            .filter(|(client, server)| server_end_open_between(*client, *server))
            .count()
    };
    while left() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(left(), 0, "descriptors left open by the server");
    server.shutdown();
}

#[test]
fn a_second_node_on_the_same_address_stops_at_startup_naming_the_flag() {
    let first = start_with_shards(2);
    let taken = first.local_addr();
    let second = ringhub_engine::ServerBuilder::new(Config {
        listen: taken,
        threads: 2,
        ..Config::default()
    })
    .membership_store(ringhub_engine::MemoryStore::default())
    .start();
    let Err(error) = second else {
        panic!("a second node started on {taken}");
    };
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("--listen {taken}")),
        "{message}"
    );
    // The first node's own shards share the port: it keeps serving.
    let mut client = RawClient::connect(taken, None);
    assert!(client.invoke("1", "Echo", "[1]").contains(r#""result":1"#));
    first.shutdown();
}

#[test]
fn the_embedding_api_refuses_what_the_contract_refuses_with_a_clear_error() {
    use ringhub_engine::ContextError;
    let server = start(Config {
        threads: 2,
        max_groups_per_connection: 2,
        ..Config::default()
    });
    let context = server.context();
    let (_client, id) = RawClient::connect_negotiated(server.local_addr());
    use futures_executor::block_on;
    let long = "g".repeat(257);
    assert_eq!(
        block_on(context.add_to_group("test", &id, &long)),
        Err(ContextError::GroupNameTooLong)
    );
    assert_eq!(
        block_on(context.send("test", Target::Group(long), "m", vec![])),
        Err(ContextError::GroupNameTooLong)
    );
    assert_eq!(
        block_on(context.send("test", Target::User("u".repeat(257)), "m", vec![])),
        Err(ContextError::UserIdTooLong)
    );
    assert_eq!(block_on(context.add_to_group("test", &id, "a")), Ok(true));
    assert_eq!(block_on(context.add_to_group("test", &id, "b")), Ok(true));
    let refused = block_on(context.add_to_group("test", &id, "c"));
    assert_eq!(refused, Err(ContextError::TooManyGroups { limit: 2 }));
    assert_eq!(
        refused.unwrap_err().to_string(),
        "Too many groups for this connection (limit 2)."
    );
    assert_eq!(context.group_presence("test", "c").connections, 0);
    server.shutdown();
}

#[test]
fn a_message_whose_frame_could_not_fit_half_a_queue_is_refused_where_it_enters() {
    use ringhub_engine::{ContextError, Value};
    let server = start(Config {
        threads: 2,
        max_message_bytes: 512 * 1024,
        ..Config::default()
    });
    let context = server.context();
    let limit = 512 * 1024;
    let text = |n: usize| vec![Value::Str("t".repeat(n))];
    use futures_executor::block_on;
    assert_eq!(
        block_on(context.send("test", Target::All, "m", text(100_000))),
        Ok(())
    );
    let refused = block_on(context.send("test", Target::All, "m", text(600_000)));
    assert_eq!(refused, Err(ContextError::MessageTooLarge { limit }));
    assert!(refused.unwrap_err().to_string().contains("524288"));
    // 240 KB of JSON, but every 1.5 is 9 bytes in MessagePack: over the limit for a
    // MessagePack recipient, so refused for all.
    let floats = || format!("[{}]", vec!["1.5"; 60_000].join(","));
    let floats_value = Value::Array(vec![Value::Float(1.5); 60_000]);
    assert_eq!(
        block_on(context.send("test", Target::All, "m", vec![floats_value])),
        Err(ContextError::MessageTooLarge { limit })
    );
    // The same from a client: a Completion error, and the connection stays.
    let mut client = RawClient::connect(server.local_addr(), None);
    let answer = client.invoke("1", "SendToAll", &format!(r#"["m",[{}]]"#, floats()));
    assert!(
        answer.contains(r#""error":"The message is too large (limit 524288 bytes once encoded).""#),
        "{answer}"
    );
    assert!(client.invoke("2", "Echo", "[3]").contains(r#""result":3"#));
    server.shutdown();
}

#[test]
fn a_slow_consumer_that_never_reads_again_gets_its_socket_closed_within_the_grace() {
    let server = start(Config {
        threads: 1,
        max_buffered_bytes: 64 * 1024,
        ..Config::default()
    });
    let addr = server.local_addr();
    let mut sender = RawClient::connect(addr, None);
    // Joins, then never reads nor closes: its kernel buffers fill, then the server's queue.
    let mut slow = RawClient::connect(addr, Some(4096));
    assert!(slow.invoke("1", "JoinGroup", r#"["g"]"#).contains("null"));
    assert!(server_end_open(&slow.stream));
    let payload = "p".repeat(8000);
    let closes = || -> u64 {
        server
            .metrics()
            .shards
            .iter()
            .map(|s| s.slow_consumer_closes.load(Relaxed))
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while closes() == 0 {
        assert!(std::time::Instant::now() < deadline, "never closed as slow");
        sender.send(&format!(
            r#"{{"type":1,"target":"SendToGroup","arguments":["g","receive",["{payload}"]]}}"#
        ));
    }
    // The close grace (3 s) and a tick later the server's end is gone; ours stays open.
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while server_end_open(&slow.stream) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !server_end_open(&slow.stream),
        "the server closed its descriptor"
    );
    drop(slow);
    server.shutdown();
}

#[test]
fn a_receiver_above_half_its_bound_for_slow_consumer_secs_is_closed_and_no_one_else() {
    let server = start(Config {
        threads: 1,
        max_buffered_bytes: 16 << 20,
        slow_consumer: Duration::from_secs(1),
        ..Config::default()
    });
    let addr = server.local_addr();
    let mut slow = RawClient::connect(addr, Some(4096));
    assert!(slow.invoke("1", "JoinGroup", r#"["g"]"#).contains("null"));
    let mut fast = RawClient::connect(addr, None);
    assert!(fast.invoke("1", "JoinGroup", r#"["g"]"#).contains("null"));
    let mut sender = RawClient::connect(addr, None);
    // ~14 MB: the kernel's buffers take a few MB, the rest waits in the slow member's
    // queue, above half of its 16 MiB bound and below the bound itself.
    let total = 3500;
    let reader = std::thread::spawn(move || {
        let mut count = 0;
        while count < total {
            if fast.next_message().contains(r#""target":"receive""#) {
                count += 1;
            }
        }
        count
    });
    let payload = "p".repeat(4000);
    for seq in 0..total {
        sender.send(&format!(
            r#"{{"type":1,"target":"SendToGroup","arguments":["g","receive",[{seq},"{payload}"]]}}"#
        ));
    }
    assert_eq!(
        reader.join().unwrap(),
        total,
        "the reading member got everything"
    );
    let closes = || -> u64 {
        server
            .metrics()
            .shards
            .iter()
            .map(|s| s.slow_consumer_closes.load(Relaxed))
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    while closes() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        closes(),
        1,
        "the member that stopped reading, after about a second"
    );
    server.shutdown();
}
