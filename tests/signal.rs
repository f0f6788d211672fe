//! `WorkerHandle::shutdown_on_signal`: SIGTERM sent to this very process stops the worker. Its own
//! test binary, so that no other test sees the signal.
#![cfg(unix)]

mod common;

use std::time::Duration;

use common::*;
use oncely::handler_fn;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_shuts_the_worker_down() {
    let db = TestDb::new().await;
    // Once Tokio listens for SIGTERM, the signal no longer ends the process; from then on it only
    // wakes listeners, so sending it before `shutdown_on_signal` listens is harmless.
    let _keep_alive = signal(SignalKind::terminate()).unwrap();
    let h = builder(db.new_pool(3).await)
        .register(handler_fn(|_ctx, _args: Noop| async move { Ok(()) }))
        .queue("default", 1)
        .build()
        .unwrap()
        .start();
    let watcher = h.clone();
    let mut stopped = tokio::spawn(async move { watcher.shutdown_on_signal().await });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        // Resend until the listener, installed when the task first runs, has seen one.
        match tokio::time::timeout(Duration::from_millis(200), &mut stopped).await {
            Ok(r) => break r.unwrap(),
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "the worker did not stop on SIGTERM"),
        }
    }
    // Stopped: a later shutdown has nothing left to do and returns at once.
    tokio::time::timeout(Duration::from_secs(5), h.shutdown()).await.expect("already stopped");
}
