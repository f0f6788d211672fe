//! The listener: LISTEN for `oncely_jobs` notifications and wake the fetcher of the named queue
//! (every fetcher for the payload `*`, with a full claim next: a resumed kind's jobs may lie
//! behind the claim windows).
//!
//! Notifications are hints. They are lost while the connection is down and do not pass through
//! PgBouncer in transaction mode, so fetchers poll as well; after every reconnect all fetchers are
//! woken, since anything may have been missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oncely_core::pooler::Pooler;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::worker::Shared;

/// The channel the enqueue statements notify, with the queue name as payload.
pub const CHANNEL: &str = oncely_core::JOBS_CHANNEL;
/// The payload that wakes every fetcher (sent when a paused job kind is resumed: its jobs may be on
/// any queue). No queue can be named `*` usefully, since it would be woken by every such hint too.
pub const WAKE_ALL: &str = "*";
const RECONNECT_MAX: Duration = Duration::from_secs(5);

pub(crate) async fn run(shared: Arc<Shared>, wakers: HashMap<String, Arc<Notify>>, stop: CancellationToken) {
    // Every fetcher, with a full claim next: jobs a claim window has moved past (a resumed kind's)
    // may be due.
    let wake_all = || {
        shared.read_all.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        wakers.values().for_each(|w| w.notify_one());
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut l = match (shared.config.pooler, &shared.config.listen_url) {
                (Pooler::Transaction, Some(url)) => PgListener::connect(url).await?,
                _ => PgListener::connect_with(&shared.pool).await?,
            };
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            l = connected => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "LISTEN failed; polling meanwhile");
                    tokio::select! { _ = tokio::time::sleep(delay) => {}, _ = stop.cancelled() => return }
                    delay = (delay * 2).min(RECONNECT_MAX);
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        delay = Duration::from_millis(100);
        wake_all();
        loop {
            let n = tokio::select! {
                n = listener.try_recv() => n,
                _ = stop.cancelled() => return,
            };
            match n {
                Ok(Some(n)) => {
                    if n.payload() == WAKE_ALL {
                        wake_all();
                    } else if let Some(w) = wakers.get(n.payload()) {
                        w.notify_one();
                    }
                }
                // The connection dropped; the next try_recv reconnects. Wake everyone meanwhile.
                Ok(None) => {
                    tracing::debug!("LISTEN connection lost; reconnecting");
                    wake_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    wake_all();
                    break;
                }
            }
        }
    }
}
