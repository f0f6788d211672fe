//! `oncely queues pause|resume|list`: fleet-wide pauses of queues and job kinds.

use clap::Subcommand;
use oncely_core::pause::{self, PauseTarget};
use oncely_core::JobState;
use sqlx::PgPool;

use crate::{table, Fail};

/// `oncely queues ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum QueuesCmd {
    /// Pause a queue (or, with --kind, a job kind) on every worker: running jobs finish, no new
    /// ones are claimed. Persisted until resumed.
    Pause {
        /// The queue's name (with --kind, the job kind's).
        name: String,
        /// NAME is a job kind, paused on every queue.
        #[arg(long)]
        kind: bool,
        /// Why, shown by `queues list`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused queue (or, with --kind, a job kind); workers claim again at once.
    Resume {
        /// The queue's name (with --kind, the job kind's).
        name: String,
        /// NAME is a job kind.
        #[arg(long)]
        kind: bool,
    },
    /// Queues with their job counts and pauses, and the paused kinds.
    List,
}

fn target(name: String, kind: bool) -> PauseTarget {
    if kind {
        PauseTarget::Kind(name)
    } else {
        PauseTarget::Queue(name)
    }
}

pub(crate) async fn run(pool: &PgPool, cmd: QueuesCmd) -> Result<(), Fail> {
    match cmd {
        QueuesCmd::Pause { name, kind, reason } => {
            let t = target(name, kind);
            if pause::pause(pool, &t, reason.as_deref()).await? {
                println!("paused {t}");
            } else {
                println!("{t} was already paused");
            }
        }
        QueuesCmd::Resume { name, kind } => {
            let t = target(name, kind);
            if pause::resume(pool, &t).await? {
                println!("resumed {t}");
            } else {
                println!("{t} was not paused");
            }
        }
        QueuesCmd::List => list(pool).await?,
    }
    Ok(())
}

async fn list(pool: &PgPool) -> Result<(), Fail> {
    let counts = oncely_core::count_jobs(pool).await?;
    let pauses = pause::list_pauses(pool).await?;
    let mut queues: std::collections::BTreeMap<String, [i64; 5]> = Default::default();
    for c in counts {
        let i = JobState::ALL.iter().position(|s| *s == c.state).unwrap_or(0);
        queues.entry(c.queue).or_default()[i] += c.count;
    }
    for p in &pauses {
        if let PauseTarget::Queue(q) = &p.target {
            queues.entry(q.clone()).or_default();
        }
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|(q, n)| {
            let paused = pauses.iter().find(|p| p.target == PauseTarget::Queue(q.clone()));
            let mut row = vec![q.clone()];
            row.extend(n.iter().map(i64::to_string));
            row.push(match paused {
                Some(p) => format!(
                    "paused since {}{}",
                    p.paused_at.format("%Y-%m-%d %H:%M:%S"),
                    p.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
                ),
                None => "active".into(),
            });
            row
        })
        .collect();
    let mut header = vec!["queue"];
    header.extend(JobState::ALL.iter().map(|s| s.as_str()));
    header.push("status");
    print!("{}", table::render(&header, &rows, &[1, 2, 3, 4, 5]));
    for p in pauses.iter().filter(|p| matches!(p.target, PauseTarget::Kind(_))) {
        println!(
            "kind {} paused since {}{}",
            p.target.name(),
            p.paused_at.format("%Y-%m-%d %H:%M:%S"),
            p.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        );
    }
    Ok(())
}
