//! `oncely bulk cancel|retry|delete`: change every job that matches a filter, in batches.

use clap::{Args, Subcommand};
use oncely_core::bulk::{self, BulkFilter, BulkReport};
use oncely_core::JobState;
use sqlx::PgPool;

use crate::{webhooks, Fail};

/// `oncely bulk ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum BulkCmd {
    /// Cancel every matching available or running job (running ones are fenced out).
    Cancel(FilterArgs),
    /// Put every matching dead or cancelled job back in its queue.
    Retry(FilterArgs),
    /// Delete every matching job that is not running.
    Delete(FilterArgs),
}

/// The filter of a bulk operation; every option given must match.
#[derive(Args, Debug)]
pub(crate) struct FilterArgs {
    /// Only jobs in this state (repeat for several); defaults to every state the operation applies to.
    #[arg(long = "state")]
    states: Vec<String>,
    /// Only jobs of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// Only jobs on this queue.
    #[arg(long)]
    queue: Option<String>,
    /// Only jobs created since then (RFC 3339, or a duration ago such as 2h).
    #[arg(long, value_parser = webhooks::parse_time)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only jobs created before then (RFC 3339, or a duration ago such as 30m).
    #[arg(long, value_parser = webhooks::parse_time)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Only jobs whose arguments contain this JSON object, e.g. '{"tenant": 7}'.
    #[arg(long, value_name = "JSON")]
    args: Option<String>,
    /// Jobs changed per statement (each batch commits on its own).
    #[arg(long, default_value_t = bulk::DEFAULT_BATCH_SIZE)]
    batch_size: i64,
}

impl FilterArgs {
    fn filter(self) -> Result<BulkFilter, Fail> {
        let states = self.states.iter().map(|s| s.parse::<JobState>()).collect::<Result<Vec<_>, _>>()?;
        let args_contain = match self.args {
            Some(a) => Some(
                serde_json::from_str::<serde_json::Value>(&a).map_err(|e| Fail(format!("--args is not JSON: {e}")))?,
            ),
            None => None,
        };
        Ok(BulkFilter {
            states,
            kind: self.kind,
            queue: self.queue,
            created_after: self.since,
            created_before: self.until,
            args_contain,
            batch_size: Some(self.batch_size),
        })
    }
}

pub(crate) async fn run(pool: &PgPool, cmd: BulkCmd) -> Result<(), Fail> {
    let mut conn = pool.acquire().await?;
    let (verb, report): (&str, BulkReport) = match cmd {
        BulkCmd::Cancel(f) => ("cancelled", bulk::cancel_jobs(&mut conn, &f.filter()?).await?),
        BulkCmd::Retry(f) => ("put back", bulk::retry_jobs(&mut conn, &f.filter()?).await?),
        BulkCmd::Delete(f) => ("deleted", bulk::delete_jobs(&mut conn, &f.filter()?).await?),
    };
    println!("{} jobs {verb} in {} batches", report.affected, report.batches);
    if report.skipped > 0 {
        println!("{} matching jobs skipped (their unique key is held by a live job)", report.skipped);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn filter_of(args: &[&str]) -> Result<BulkFilter, Fail> {
        let cli = crate::Cli::try_parse_from(args).expect("the command line parses");
        match cli.cmd {
            crate::Cmd::Bulk { cmd: BulkCmd::Cancel(f) | BulkCmd::Retry(f) | BulkCmd::Delete(f) } => f.filter(),
            other => panic!("not a bulk command: {other:?}"),
        }
    }

    #[test]
    fn the_filter_options_become_a_bulk_filter() {
        let f = filter_of(&["oncely", "bulk", "cancel", "--state", "available", "--args", r#"{"tenant": 7}"#])
            .unwrap_or_else(|e| panic!("{}", e.0));
        assert_eq!(f.states, vec![JobState::Available]);
        assert_eq!(f.args_contain, Some(serde_json::json!({"tenant": 7})));
        assert_eq!(f.batch_size, Some(bulk::DEFAULT_BATCH_SIZE));
    }

    #[test]
    fn a_bad_state_or_bad_json_is_refused() {
        assert!(filter_of(&["oncely", "bulk", "retry", "--state", "deadd"]).is_err());
        let e = filter_of(&["oncely", "bulk", "delete", "--args", "{tenant"]).unwrap_err();
        assert!(e.0.contains("--args is not JSON"), "{}", e.0);
    }
}
