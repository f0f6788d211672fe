//! The embedded schema migrations (schema `oncely`) and their runner.
//!
//! oncely keeps its migration history in its own table, `oncely._migrations`, never in
//! `_sqlx_migrations`: that table belongs to the host application's own `sqlx::migrate!()`, and two
//! migrators sharing it break each other (each refuses the versions it does not know). sqlx 0.8's
//! `Migrator` cannot use another table, so [`migrate`] is a small runner over the embedded list
//! ([`MIGRATOR`]): one transaction per migration, each holding a transaction-scoped advisory lock,
//! with the checksum of every applied migration verified.
//!
//! Databases migrated by oncely versions that kept their history in `_sqlx_migrations` are upgraded
//! on the first call: the rows that are oncely's own (same version *and* checksum) move to
//! `oncely._migrations`; the application's rows stay where they are.

use futures::future::BoxFuture;
use sqlx::{Acquire, PgConnection, Row};

/// The migrations in the repository's `migrations/` folder, embedded at compile time.
///
/// Run them with [`migrate`], not with `MIGRATOR.run(..)`: sqlx's runner would record them in the
/// application's `_sqlx_migrations`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The table that records oncely's applied migrations.
pub const MIGRATIONS_TABLE: &str = "oncely._migrations";

/// Why [`migrate`] refused to run or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// A migration recorded as applied has another checksum than the embedded one: the file was
    /// edited after it ran somewhere. Nothing was applied.
    #[error(
        "oncely migration {version} ({description}) was applied with a different checksum: \
         the embedded migration was edited after it ran"
    )]
    ChecksumMismatch {
        /// The migration's version.
        version: i64,
        /// Its description.
        description: String,
    },

    /// `oncely._migrations` records a migration this build does not have: a newer oncely migrated
    /// the database. Nothing was applied.
    #[error(
        "oncely migration {version} is recorded in {MIGRATIONS_TABLE} but unknown to this build: \
         the database was migrated by a newer oncely"
    )]
    UnknownVersion {
        /// The recorded version.
        version: i64,
    },

    /// A migration's SQL failed; its transaction was rolled back, so neither it nor its history row
    /// was applied. Migrations before it stay applied.
    #[error("oncely migration {version} ({description}) failed: {source}")]
    Apply {
        /// The migration's version.
        version: i64,
        /// Its description.
        description: String,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
}

/// What one [`migrate_report`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrateReport {
    /// Versions this call applied, in order.
    pub applied: Vec<i64>,
    /// Versions whose history rows this call moved from `_sqlx_migrations` to `oncely._migrations`
    /// (a database migrated by an older oncely).
    pub moved: Vec<i64>,
    /// Migrations recorded in `oncely._migrations` once the call finished.
    pub recorded: usize,
}

/// Apply every pending migration. Safe to call from many processes at once: each migration runs in
/// its own transaction under an advisory lock, and is applied once.
///
/// The history lives in `oncely._migrations`; the application's `_sqlx_migrations` is only read,
/// and only to move rows an older oncely left there. See [`migrate_report`] for what was done.
///
/// # Errors
///
/// [`Error::Migration`](crate::Error::Migration) when an applied migration's checksum differs from
/// the embedded one, when the database was migrated by a newer oncely, or when a migration's SQL
/// fails; [`Error::Database`](crate::Error::Database) when the database cannot be reached.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// oncely_core::migrate(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &sqlx::PgPool) -> crate::Result<()> {
    migrate_report(pool).await.map(drop)
}

/// [`migrate`], returning which migrations it applied and which history rows it moved.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// let report = oncely_core::migrate_report(&pool).await?;
/// tracing::info!(applied = ?report.applied, "schema up to date");
/// # Ok(()) }
/// ```
#[tracing::instrument(skip_all, err)]
pub async fn migrate_report(pool: &sqlx::PgPool) -> crate::Result<MigrateReport> {
    let mut conn = pool.acquire().await?;
    migrate_conn(&mut conn).await
}

/// [`migrate_report`] on one connection (it must not be inside a transaction).
pub async fn migrate_conn(conn: &mut PgConnection) -> crate::Result<MigrateReport> {
    let mut migrations: Vec<&'static sqlx::migrate::Migration> =
        MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration()).collect();
    migrations.sort_by_key(|m| m.version);

    let mut report = MigrateReport { moved: prepare(conn, &migrations).await?, ..MigrateReport::default() };
    if !report.moved.is_empty() {
        tracing::info!(moved = ?report.moved, "moved oncely's migration history from _sqlx_migrations to oncely._migrations");
    }
    for m in migrations {
        if apply(conn, m).await? {
            tracing::info!(version = m.version, description = %m.description, "applied oncely migration");
            report.applied.push(m.version);
        }
    }
    report.recorded = recorded(conn).await?;
    Ok(report)
}

/// A recorded migration: its version and checksum.
type Recorded = (i64, Vec<u8>);

fn recorded_versions(conn: &mut PgConnection) -> BoxFuture<'_, sqlx::Result<Vec<Recorded>>> {
    Box::pin(
        crate::pooler::query_as("SELECT version, checksum FROM oncely._migrations ORDER BY version").fetch_all(conn),
    )
}

/// Run `sql` (several statements) as one simple query, unprepared, as sqlx's own runner does.
fn simple_query<'c>(conn: &'c mut PgConnection, sql: &'c str) -> BoxFuture<'c, sqlx::Result<()>> {
    // `Executor::execute` returns a boxed `Send` future; `RawSql::execute` is an `async fn` whose
    // future the compiler cannot prove `Send`.
    Box::pin(async move { sqlx::Executor::execute(conn, sqlx::raw_sql(sql)).await.map(drop) })
}

fn recorded(conn: &mut PgConnection) -> BoxFuture<'_, crate::Result<usize>> {
    Box::pin(async move {
        let n: i64 =
            crate::pooler::query_scalar("SELECT count(*) FROM oncely._migrations").fetch_one(&mut *conn).await?;
        Ok(n.try_into().unwrap_or(usize::MAX))
    })
}

// The steps of `migrate_conn` are boxed `Send` futures of their own: written inline, the compiler
// cannot prove the whole future `Send` (sqlx's `Executor` is implemented per lifetime, and the
// proof needs it for every lifetime), and a service could not `tokio::spawn` its migration.

/// Create the history table, adopt an older oncely's rows, and check what is recorded. Returns the
/// versions moved.
fn prepare<'a>(
    conn: &'a mut PgConnection,
    migrations: &'a [&'static sqlx::migrate::Migration],
) -> BoxFuture<'a, crate::Result<Vec<i64>>> {
    Box::pin(async move {
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        // Two statements: sent as a simple query, not prepared.
        simple_query(
            &mut tx,
            "CREATE SCHEMA IF NOT EXISTS oncely;
         CREATE TABLE IF NOT EXISTS oncely._migrations (
             version        bigint      PRIMARY KEY,
             description    text        NOT NULL,
             checksum       bytea       NOT NULL,
             installed_on   timestamptz NOT NULL DEFAULT now(),
             execution_time bigint      NOT NULL DEFAULT -1
         );",
        )
        .await?;
        let moved = adopt_legacy_rows(&mut tx, migrations).await?;
        let recorded = recorded_versions(&mut tx).await?;
        for (version, checksum) in &recorded {
            match migrations.iter().find(|m| m.version == *version) {
                None => return Err(MigrationError::UnknownVersion { version: *version }.into()),
                Some(m) if *m.checksum != checksum[..] => return Err(mismatch(m).into()),
                Some(_) => {}
            }
        }
        tx.commit().await?;
        Ok(moved)
    })
}

/// Apply `m` in a transaction of its own unless it is recorded already. Returns whether it ran.
fn apply<'a>(conn: &'a mut PgConnection, m: &'static sqlx::migrate::Migration) -> BoxFuture<'a, crate::Result<bool>> {
    Box::pin(async move {
        let mut tx = conn.begin().await?;
        lock(&mut tx).await?;
        // Read again under the lock: another process may have applied it since.
        let done: Option<Vec<u8>> =
            crate::pooler::query_scalar("SELECT checksum FROM oncely._migrations WHERE version = $1")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?;
        match done {
            Some(checksum) if *m.checksum == checksum[..] => return Ok(false),
            Some(_) => return Err(mismatch(m).into()),
            None => {}
        }
        let started = std::time::Instant::now();
        // A migration is many statements: a simple query, as sqlx's own runner sends it.
        simple_query(&mut tx, &m.sql).await.map_err(|source| MigrationError::Apply {
            version: m.version,
            description: m.description.to_string(),
            source,
        })?;
        crate::pooler::query(
            "INSERT INTO oncely._migrations (version, description, checksum, execution_time) VALUES ($1, $2, $3, $4)",
        )
        .bind(m.version)
        .bind(&*m.description)
        .bind(&*m.checksum)
        .bind(i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    })
}

/// Serializes oncely's migrators (not the application's: sqlx's lock has another key) until the
/// transaction ends.
fn lock(tx: &mut PgConnection) -> BoxFuture<'_, sqlx::Result<()>> {
    let lock = crate::pooler::query("SELECT pg_advisory_xact_lock(hashtextextended('oncely.migrate', 0))");
    Box::pin(async move { sqlx::Executor::execute(tx, lock).await.map(drop) })
}

fn mismatch(m: &sqlx::migrate::Migration) -> MigrationError {
    MigrationError::ChecksumMismatch { version: m.version, description: m.description.to_string() }
}

/// Move the rows an older oncely wrote to `_sqlx_migrations` (the one the search path finds, where
/// sqlx wrote them) into `oncely._migrations`: only rows whose version and checksum are both one
/// of oncely's migrations, so the application's rows stay. Returns the moved versions.
fn adopt_legacy_rows<'a>(
    tx: &'a mut PgConnection,
    migrations: &[&sqlx::migrate::Migration],
) -> BoxFuture<'a, sqlx::Result<Vec<i64>>> {
    let versions: Vec<i64> = migrations.iter().map(|m| m.version).collect();
    let checksums: Vec<Vec<u8>> = migrations.iter().map(|m| m.checksum.to_vec()).collect();
    Box::pin(async move {
        let exists = crate::pooler::query("SELECT to_regclass('_sqlx_migrations') IS NOT NULL");
        if !sqlx::Executor::fetch_one(&mut *tx, exists).await?.try_get::<bool, _>(0)? {
            return Ok(Vec::new());
        }
        // The application's migrator may be running at the same moment (under its own lock): the
        // row locks of the DELETE make this all or nothing per row.
        let moved = crate::pooler::query(
            "WITH moved AS (
                 DELETE FROM _sqlx_migrations s
                 USING unnest($1::bigint[], $2::bytea[]) AS o(version, checksum)
                 WHERE s.version = o.version AND s.checksum = o.checksum AND s.success
                 RETURNING s.version, s.description, s.checksum, s.installed_on, s.execution_time)
             INSERT INTO oncely._migrations (version, description, checksum, installed_on, execution_time)
             SELECT version, description, checksum, installed_on, execution_time FROM moved
             ON CONFLICT (version) DO NOTHING
             RETURNING version",
        )
        .bind(versions)
        .bind(checksums);
        sqlx::Executor::fetch_all(&mut *tx, moved).await?.iter().map(|row| row.try_get(0)).collect()
    })
}

#[cfg(test)]
mod tests {
    /// A service runs `migrate` in a spawned task (a readiness check, a start-up job): its future
    /// must be `Send`. This fails to compile otherwise.
    #[allow(dead_code)]
    fn migrate_futures_are_send(pool: sqlx::PgPool, mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {
        fn send<T: Send>(_: T) {}
        let other = pool.clone();
        send(async move { super::migrate(&pool).await });
        send(async move { super::migrate_report(&other).await });
        send(async move { super::migrate_conn(&mut conn).await });
    }
}
