//! `oncely runs ...`: function runs, their triggers and steps, and re-running one from a step.

use clap::Subcommand;
use oncely_core::function::{self, RunSummary, Trigger};
use oncely_core::JobId;
use sqlx::PgPool;

use crate::{table, Fail};

/// Step outputs and errors longer than this are cut (with `…`).
const OUTPUT_CHARS: usize = 80;

/// The `runs` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum RunsCmd {
    /// List function runs, newest first, with their triggers.
    List {
        /// Only runs of this function.
        #[arg(long)]
        function: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Show one run: its trigger and each step (start, duration, attempt, output, error).
    Show {
        /// The run's id (its job id).
        id: i64,
    },
    /// Invalidate a finished run's step and the steps after it, then queue the run again.
    /// Business-key steps are never invalidated.
    Rerun {
        /// The run's id.
        id: i64,
        /// The step to run again from.
        #[arg(long)]
        from: String,
    },
}

pub(crate) async fn run(pool: &PgPool, cmd: RunsCmd) -> Result<(), Fail> {
    match cmd {
        RunsCmd::List { function, limit } => list(pool, function.as_deref(), limit).await,
        RunsCmd::Show { id } => show(pool, id).await,
        RunsCmd::Rerun { id, from } => rerun(pool, id, &from).await,
    }
}

fn cut(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() > OUTPUT_CHARS || line.len() < s.len() {
        format!("{}…", line.chars().take(OUTPUT_CHARS).collect::<String>())
    } else {
        line.to_owned()
    }
}

fn trigger(t: &Trigger) -> String {
    match t {
        Trigger::Event(e) => {
            let key = e.key.as_deref().map(|k| format!(" key={k}")).unwrap_or_default();
            format!("event {} {}{key}", e.id, e.topic)
        }
        Trigger::Cron(t) => {
            let missed = if t.missed > 0 { format!(" (+{} missed)", t.missed) } else { String::new() };
            format!("cron {} {} tick {}{missed}", t.cron, t.timezone, t.at.format("%Y-%m-%d %H:%M:%S"))
        }
    }
}

fn summary_row(r: &RunSummary) -> Vec<String> {
    vec![
        r.id.to_string(),
        r.function.clone(),
        r.state.clone(),
        r.attempt.to_string(),
        r.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        trigger(&r.trigger),
    ]
}

async fn list(pool: &PgPool, function: Option<&str>, limit: i64) -> Result<(), Fail> {
    let runs = function::list_runs(pool, function, limit).await?;
    let rows: Vec<Vec<String>> = runs.iter().map(summary_row).collect();
    print!("{}", table::render(&["id", "function", "state", "attempt", "created (UTC)", "trigger"], &rows, &[0, 3]));
    println!("({} runs)", runs.len());
    Ok(())
}

async fn show(pool: &PgPool, id: i64) -> Result<(), Fail> {
    let mut conn = pool.acquire().await?;
    let d = function::run_history(&mut conn, JobId(id)).await?;
    let r = &d.run;
    println!("run:      {} ({})", r.id, r.function);
    println!("state:    {} after {} attempts", r.state, r.attempt);
    println!("trigger:  {}", trigger(&r.trigger));
    if let Trigger::Event(e) = &r.trigger {
        println!("payload:  {}", cut(&e.payload.to_string()));
    }
    println!("created:  {}", r.created_at);
    println!("finished: {}", r.finished_at.map(|t| t.to_string()).unwrap_or_else(|| "-".into()));
    let rows: Vec<Vec<String>> = d
        .steps
        .iter()
        .map(|s| {
            vec![
                if s.business_key { format!("{} (business key)", s.name) } else { s.name.clone() },
                s.state.clone(),
                s.started_at.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                format!("{} ms", s.duration.num_milliseconds()),
                s.attempt.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                match s.output.as_ref().and_then(|o| o.get("sleep_until")) {
                    // A durable sleep records its wake time.
                    Some(until) => format!("sleep until {}", until.as_str().unwrap_or_default()),
                    None => s.output.as_ref().map(|o| cut(&o.to_string())).unwrap_or_default(),
                },
                s.error.as_deref().map(cut).unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["step", "state", "started (UTC)", "duration", "attempt", "output", "error"], &rows, &[3, 4])
    );
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    let waits: Vec<Vec<String>> = d
        .waits
        .iter()
        .map(|w| {
            let outcome = match (w.resolved_at, w.event_id) {
                (Some(at), Some(event)) => format!("event {event} at {}", fmt(at)),
                (Some(at), None) => format!("timed out at {}", fmt(at)),
                (None, _) => "waiting".to_owned(),
            };
            vec![
                w.step.clone(),
                if w.kind == "cancel" { "cancel_on".to_owned() } else { "wait_for_event".to_owned() },
                format!("{} where {}", w.topic, w.matching),
                w.timeout_at.map(fmt).unwrap_or_else(|| "-".into()),
                outcome,
            ]
        })
        .collect();
    if !waits.is_empty() {
        print!("{}", table::render(&["wait", "kind", "awaits", "until (UTC)", "outcome"], &waits, &[]));
    }
    let children: Vec<Vec<String>> = d
        .children
        .iter()
        .map(|c| {
            vec![
                c.step.clone(),
                c.index.to_string(),
                c.child.to_string(),
                c.kind.clone(),
                c.state.clone(),
                c.finished_at.map(fmt).unwrap_or_else(|| "-".into()),
                match (&c.error, &c.output) {
                    (Some(e), _) => cut(e),
                    (None, Some(o)) => cut(&o.to_string()),
                    (None, None) => String::new(),
                },
            ]
        })
        .collect();
    if !children.is_empty() {
        print!(
            "{}",
            table::render(
                &["child of step", "#", "job", "kind", "state", "finished (UTC)", "output / error"],
                &children,
                &[1, 2]
            )
        );
    }
    for e in &d.errors {
        println!("attempt {} failed at {} ({:?}): {}", e.attempt, e.at, e.kind, cut(&e.message));
    }
    Ok(())
}

async fn rerun(pool: &PgPool, id: i64, from: &str) -> Result<(), Fail> {
    let mut conn = pool.acquire().await?;
    let r = function::rerun_from_step(&mut conn, JobId(id), from).await?;
    println!("run {id} queued again; invalidated steps: {}", r.invalidated.join(", "));
    Ok(())
}
