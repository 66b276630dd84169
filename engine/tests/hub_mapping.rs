//! Hubs mapped by name and path (contract section 9): an embedder's hubs answer under
//! their names and mapped paths only; a name no hub is mapped to is `404`.

mod common;

use common::{http, RawClient};
use ringhub_engine::{hub, Config, MemoryStore, ServerBuilder};

struct Chat;

#[hub]
impl Chat {
    fn which(&self) -> &'static str {
        "chat"
    }
}

struct Orders;

#[hub]
impl Orders {
    fn which(&self) -> &'static str {
        "orders"
    }
}

#[test]
fn mapped_names_and_paths_reach_their_hubs_and_other_names_are_not_found() {
    let server = ServerBuilder::new(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        ..Config::default()
    })
    .membership_store(MemoryStore::default())
    .map_hub_at("/chatHub", "chat", || Chat)
    .map_hub("orders", || Orders)
    .start()
    .expect("server starts");
    let addr = server.local_addr();
    while !server.is_ready() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    for path in [
        "/chatHub/negotiate",
        "/hubs/chat/negotiate",
        "/hubs/orders/negotiate",
    ] {
        let (status, body) = http(addr, "POST", &format!("{path}?negotiateVersion=1"), "");
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in [
        "/hubs/test/negotiate",
        "/hubs/Chat/negotiate",
        "/chatHub2/negotiate",
    ] {
        let (status, _) = http(addr, "POST", &format!("{path}?negotiateVersion=1"), "");
        assert_eq!(status, 404, "{path}: no hub is mapped to it");
    }

    let mut chat = RawClient::connect_path(addr, None, "/chatHub");
    assert!(chat
        .invoke("1", "Which", "[]")
        .contains(r#""result":"chat""#));
    let mut orders = RawClient::connect_path(addr, None, "/hubs/orders");
    assert!(orders
        .invoke("1", "which", "[]")
        .contains(r#""result":"orders""#));
    server.shutdown();
}
