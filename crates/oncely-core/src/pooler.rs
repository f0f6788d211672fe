//! Running behind a connection pooler in transaction pooling mode (PgBouncer `pool_mode =
//! transaction`), where each transaction may run on a different server connection and nothing
//! of a session survives between transactions.
//!
//! The mode is a process-wide switch, off by default: call [`set_pooler`] with
//! [`Pooler::Transaction`] before the process runs any oncely statement (the worker does it when
//! its `WorkerConfig::pooler` says so). In that mode:
//!
//! - every statement oncely sends is **unnamed** (sqlx's `persistent(false)`): no named prepared
//!   statement outlives its transaction, so none can be missing or collide on a server another
//!   client used before. The cost is a parse and a plan per statement;
//! - every statement oncely would send in autocommit on a pool runs inside an explicit
//!   transaction instead (`BEGIN`, the statement, `COMMIT`): sqlx sends a statement with
//!   parameters in two round trips (parse, then bind and execute), and in autocommit a
//!   transaction pooler may hand the second to another server. Pass [`db`]`(&pool)` where you
//!   would pass `&pool` to an oncely function (`enqueue(db(&pool), job)`); a transaction of your
//!   own (`&mut *tx`) needs nothing;
//! - the worker does not `LISTEN` through the pool: it polls, or listens over a direct
//!   connection of its own (`WorkerConfig::listen_url`).
//!
//! oncely takes no session advisory lock and sets nothing at session level in either mode.
//! Statements of your own on the same pool are yours to keep pooler-safe: unnamed
//! (`.persistent(false)`) and inside a transaction.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Either, Execute, Executor, FromRow, PgPool, Postgres};

/// How the process reaches PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooler {
    /// Directly, or through a pooler in session mode: sessions are the client's own. The default.
    #[default]
    Session,
    /// Through a pooler in transaction pooling mode: no state is kept across transactions (see the
    /// [module docs](self)).
    Transaction,
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Set the process-wide pooler mode. Every oncely statement sent afterwards follows it; set it
/// once, at start-up, before any oncely call.
pub fn set_pooler(mode: Pooler) {
    MODE.store(matches!(mode, Pooler::Transaction) as u8, Ordering::Relaxed);
    tracing::debug!(?mode, "oncely pooler mode set");
}

/// The process-wide pooler mode (see [`set_pooler`]).
pub fn pooler() -> Pooler {
    if transaction_pooling() {
        Pooler::Transaction
    } else {
        Pooler::Session
    }
}

#[inline]
pub(crate) fn transaction_pooling() -> bool {
    MODE.load(Ordering::Relaxed) != 0
}

/// Whether oncely's statements are prepared as named, cached statements: not in
/// [`Pooler::Transaction`] mode.
#[inline]
pub fn persistent() -> bool {
    !transaction_pooling()
}

/// `sqlx::query`, unnamed in [`Pooler::Transaction`] mode.
pub(crate) fn query(sql: &str) -> sqlx::query::Query<'_, Postgres, PgArguments> {
    sqlx::query(sql).persistent(persistent())
}

/// `sqlx::query_as`, unnamed in [`Pooler::Transaction`] mode.
pub(crate) fn query_as<'q, O>(sql: &'q str) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(persistent())
}

/// `sqlx::query_scalar`, unnamed in [`Pooler::Transaction`] mode.
pub(crate) fn query_scalar<'q, O>(sql: &'q str) -> sqlx::query::QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(persistent())
}

/// A pool as an executor that follows the pooler mode: the pool itself in
/// [`Pooler::Session`] mode, and in [`Pooler::Transaction`] mode each statement inside a
/// transaction of its own (see the [module docs](self)). Get one with [`db`].
#[derive(Clone, Copy)]
pub struct Db<'p> {
    pool: &'p PgPool,
    wrap: bool,
}

impl fmt::Debug for Db<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("pool", self.pool).field("transaction_per_statement", &self.wrap).finish()
    }
}

/// `pool` as an executor for oncely's functions that is safe in the process's pooler mode: in
/// [`Pooler::Transaction`] mode each statement runs in a transaction of its own; otherwise it is
/// `pool` itself.
pub fn db(pool: &PgPool) -> Db<'_> {
    Db { pool, wrap: transaction_pooling() }
}

impl<'p> Executor<'p> for Db<'p> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.wrap {
            return self.pool.fetch_many(query);
        }
        let pool = self.pool;
        futures::stream::once(async move {
            let mut tx = crate::txn::begin(pool).await?;
            let items: Vec<_> = (&mut *tx).fetch_many(query).try_collect().await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(futures::stream::iter(items.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.wrap {
            return self.pool.fetch_optional(query);
        }
        let pool = self.pool;
        Box::pin(async move {
            let mut tx = crate::txn::begin(pool).await?;
            let row = (&mut *tx).fetch_optional(query).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.pool.describe(sql)
    }
}
