//! The io_uring runtime every ringhub thread runs on (shards, and the benchmark's
//! load generator and ceiling peer, so that all of them are set up alike).

/// A monoio io_uring runtime with a timer.
pub type Runtime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

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
