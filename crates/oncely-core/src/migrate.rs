//! The embedded schema migrations (schema `oncely`).

use sqlx::migrate::Migrator;

/// The migrations in the repository's `migrations/` folder, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Apply every pending migration. Safe to call from many processes at once: sqlx takes an advisory
/// lock while migrating.
///
/// # Example
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> oncely_core::Result<()> {
/// oncely_core::migrate(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &sqlx::PgPool) -> crate::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
