//! The event-driven report pipeline (`examples/report_events`) end to end, as the README's first
//! command runs it: the example's own binary (which `cargo test` builds with the tests), with
//! crashes injected at random step boundaries; it exits 0 only when every count is exact.

use std::path::PathBuf;
use std::time::Duration;

/// `target/<profile>/examples/report_events`, next to this test binary's `deps` directory.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    profile_dir.join("examples").join(format!("report_events{}", std::env::consts::EXE_SUFFIX))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_driven_pipeline_counts_every_report_once_under_crashes() {
    let binary = example_binary();
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples; build it with `cargo build --example report_events`",
        binary.display()
    );
    let run = tokio::process::Command::new(&binary)
        .args(["--reports", "40", "--crash-probability", "0.05"])
        .env("DATABASE_URL", oncely::testkit::server_url())
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run).await.expect("the example finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("EXACT: every count matches"), "{stdout}");
    assert!(stdout.contains("report.requested events:   40"), "{stdout}");
}
