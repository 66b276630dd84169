//! The io_uring runtime every ringhub thread runs on (shards, and the benchmark's
//! load generator and ceiling peer, so that all of them are set up alike), and the
//! epoll runtime shards fall back to where io_uring is denied.

/// Waits on the shard's own timer: what a hub method (or a stream it returns) uses to
/// pause, since it runs on a shard's runtime, not on tokio's.
pub use monoio::time::sleep;
use monoio::time::TimeDriver;
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver};

/// A monoio io_uring runtime with a timer.
pub type Runtime = monoio::Runtime<TimeDriver<IoUringDriver>>;

/// A shard's runtime: io_uring, or epoll (monoio's legacy driver).
pub type ShardRuntime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// How a node's shards do I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring: the fast path, batched submissions and no readiness round trips.
    IoUring,
    /// epoll (monoio's legacy driver): slower, for where io_uring is denied.
    Epoll,
}

/// Why this process cannot use io_uring (a container's seccomp profile, gVisor,
/// `kernel.io_uring_disabled`, an old kernel), or `None` if it can: the error of
/// setting up a small ring.
pub fn io_uring_denied() -> Option<std::io::Error> {
    io_uring::IoUring::new(2).err()
}

/// Builds a shard's runtime on `driver`, with `entries` submission slots (io_uring) or
/// events per wait (epoll).
pub fn shard_runtime(driver: IoDriver, entries: u32) -> std::io::Result<ShardRuntime> {
    match driver {
        IoDriver::IoUring => io_uring_runtime(entries).map(FusionRuntime::Uring),
        IoDriver::Epoll => monoio::RuntimeBuilder::<LegacyDriver>::new()
            .with_entries(entries)
            .enable_timer()
            .build()
            .map(FusionRuntime::Legacy),
    }
}

/// Builds a runtime whose ring has `entries` submission slots.
///
/// The ring defers completion work to the moment its thread asks for completions
/// (`IORING_SETUP_DEFER_TASKRUN`, which needs `SINGLE_ISSUER`; Linux 6.1+). Without it,
/// every packet another core delivers to one of this thread's sockets queues task work
/// with an inter-processor interrupt, and the interrupted thread then contends for the
/// socket lock with the sender: perf showed a third of a receiving thread's time in
/// that spin lock. With it, the work is batched and run when the thread waits. On
/// kernels that refuse the flags, the default setup is used.
pub fn io_uring_runtime(entries: u32) -> std::io::Result<Runtime> {
    let mut deferred = io_uring::IoUring::builder();
    deferred.setup_single_issuer().setup_defer_taskrun();
    let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(entries)
        .uring_builder(deferred)
        .enable_timer()
        .build();
    match built {
        Ok(runtime) => Ok(runtime),
        Err(error) => {
            tracing::debug!("io_uring without deferred task work ({error})");
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(entries)
                .enable_timer()
                .build()
        }
    }
}
