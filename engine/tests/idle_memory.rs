//! What an idle WebSocket connection keeps on the server's heap, measured exactly: a
//! counting global allocator tracks the live bytes of the process (allocated minus
//! freed) while connections open, handshake and go quiet. Resident memory per
//! connection moves by kilobytes between runs (allocator pages, see the README); this
//! figure does not, so it catches what a change adds to every idle connection.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::{start_with_shards, RawClient};

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Whether this thread's allocations count (the test's own thread does not).
    static COUNTED: Cell<bool> = const { Cell::new(true) };
}

/// Live allocations by size (the last slot counts every larger one): where the bytes go.
static LIVE_BY_SIZE: [AtomicI64; 4097] = [const { AtomicI64::new(0) }; 4097];

fn count(bytes: i64) {
    if COUNTED.with(Cell::get) {
        LIVE_BYTES.fetch_add(bytes, Relaxed);
        let size = (bytes.unsigned_abs() as usize).min(LIVE_BY_SIZE.len() - 1);
        LIVE_BY_SIZE[size].fetch_add(bytes.signum(), Relaxed);
    }
}

// SAFETY: delegates every call to the system allocator unchanged; it only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as i64);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as i64));
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as i64 - layout.size() as i64);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Connections measured (enough that the tables' growth steps average out).
const CONNECTIONS: usize = 2000;

/// The heap bytes one idle connection may keep. Measured 2026-11-30: 2,804 B (debug
/// and release alike; the README says where they go); 3,729 B with a writer task per
/// connection, before the flush pass.
const MAX_IDLE_BYTES: i64 = 3200;

#[test]
fn an_idle_connection_keeps_little_on_the_heap() {
    COUNTED.with(|counted| counted.set(false));
    let server = start_with_shards(1);
    let addr = server.local_addr();
    // Warm up: the shard's first connection sets up what every later one shares.
    let warm: Vec<RawClient> = (0..50).map(|_| RawClient::connect(addr, None)).collect();
    settle(&server, warm.len());
    let before = LIVE_BYTES.load(Relaxed);
    let by_size_before: Vec<i64> = LIVE_BY_SIZE.iter().map(|c| c.load(Relaxed)).collect();
    let clients: Vec<RawClient> = (0..CONNECTIONS)
        .map(|_| RawClient::connect(addr, None))
        .collect();
    settle(&server, warm.len() + clients.len());
    let per_connection = (LIVE_BYTES.load(Relaxed) - before) / CONNECTIONS as i64;
    eprintln!("an idle connection keeps {per_connection} bytes on the server's heap");
    // Allocations every connection (or every other) keeps, by size.
    for (size, live) in LIVE_BY_SIZE.iter().enumerate() {
        let per_100 = (live.load(Relaxed) - by_size_before[size]) * 100 / CONNECTIONS as i64;
        if per_100 >= 50 {
            eprintln!("  {size} B: {} per 100 connections", per_100);
        }
    }
    assert!(
        per_connection <= MAX_IDLE_BYTES,
        "an idle connection keeps {per_connection} bytes on the heap (at most {MAX_IDLE_BYTES})"
    );
    drop(clients);
    drop(warm);
    server.shutdown();
}

/// Waits until the server counts `connections` and their tasks have gone quiet (the
/// first read after the handshake gives back the HTTP phase's buffer).
fn settle(server: &ringhub_engine::Server, connections: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metrics().connections() < connections as i64 {
        assert!(Instant::now() < deadline, "connections did not register");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
}
