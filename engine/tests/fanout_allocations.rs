//! Fan-out without per-recipient work beyond queueing, checked: the allocations and
//! encodes of one group send do not grow with the number of recipients (10 against
//! 1,000 members). Small frames are copied into each connection's send buffer, which
//! is reused, and large ones are shared; neither allocates per recipient.
//!
//! A counting global allocator counts every allocation in the process while one send
//! is in flight. The members are raw sockets nobody reads during the measurement, and
//! the sender writes a frame built beforehand, so what is counted is the server's work.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::{start_with_shards, text_frame, RawClient};
use ringhub_engine::{broadcast_encodes, Server};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates every call to the system allocator unchanged; it only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn deliveries(server: &Server) -> u64 {
    server
        .metrics()
        .shards
        .iter()
        .map(|s| s.deliveries.load(Relaxed))
        .sum()
}

/// (allocations, encodes) of one SendToGroup to `members` connections.
fn measure(members: usize) -> (u64, u64) {
    let server = start_with_shards(1);
    let addr = server.local_addr();
    let mut group = Vec::with_capacity(members);
    for _ in 0..members {
        let mut member = RawClient::connect(addr, None);
        assert!(member
            .invoke("1", "JoinGroup", r#"["room"]"#)
            .contains(r#""result":null"#));
        group.push(member);
    }
    let mut sender = RawClient::connect(addr, None);
    let send = text_frame(
        r#"{"type":1,"target":"SendToGroup","arguments":["room","receive",["0123456789012345678901234567890123456789012345678901234567890123"]]}"#,
    );
    let mut once = |counting: bool| -> (u64, u64) {
        let before = deliveries(&server);
        let encodes = broadcast_encodes();
        ALLOCATIONS.store(0, Relaxed);
        COUNTING.store(counting, Relaxed);
        sender.stream.write_all(&send).unwrap();
        // Every member's frame handed to its socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        while deliveries(&server) < before + members as u64 {
            assert!(Instant::now() < deadline, "fan-out did not finish");
            std::hint::spin_loop();
        }
        COUNTING.store(false, Relaxed);
        (ALLOCATIONS.load(Relaxed), broadcast_encodes() - encodes)
    };
    // The first sends grow each connection's queues, and the shard's lists of sessions
    // to write (and to defer after a loaded pass), to their working size; the third is
    // the steady state.
    once(false);
    once(false);
    let measured = once(true);
    drop(group);
    server.shutdown();
    measured
}

#[test]
fn one_group_send_costs_the_same_for_10_and_1000_members() {
    let (small_allocs, small_encodes) = measure(10);
    let (large_allocs, large_encodes) = measure(1000);
    eprintln!("allocations: {small_allocs} for 10 members, {large_allocs} for 1000; encodes {small_encodes} / {large_encodes}");
    assert_eq!(small_encodes, 1, "one encode for one protocol");
    assert_eq!(
        large_encodes, 1,
        "one encode for one protocol, whatever the group size"
    );
    // A handful of allocations per send (the decoded message, its one frame), never
    // one per recipient: 990 more members may not add more than a few.
    assert!(
        large_allocs <= small_allocs + 8,
        "allocations grew with recipients: {small_allocs} for 10, {large_allocs} for 1000"
    );
}
