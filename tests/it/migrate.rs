//! oncely's migration history lives in `oncely._migrations`, so it coexists with the host
//! application's own sqlx migrator (`_sqlx_migrations`) in either order, upgrades databases an older
//! oncely migrated into `_sqlx_migrations`, and applies each migration once under concurrency.

use std::path::{Path, PathBuf};

use oncely::testkit::TestDb;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

/// A database with nothing in it: the test kit's, with oncely's schema dropped again.
async fn empty_db() -> TestDb {
    let db = TestDb::new().await;
    sqlx::raw_sql("DROP SCHEMA oncely CASCADE; DROP TABLE IF EXISTS public._sqlx_migrations")
        .execute(db.pool())
        .await
        .unwrap();
    db
}

/// The host application's migrations folder (a temporary directory), removed on drop.
struct AppMigrations(PathBuf);

impl AppMigrations {
    fn new() -> AppMigrations {
        let dir = std::env::temp_dir().join(format!("oncely-app-migrations-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let app = AppMigrations(dir);
        app.add("20250101000000_users.sql", "CREATE TABLE app_users (id bigint PRIMARY KEY, email text NOT NULL);");
        app
    }

    fn add(&self, file: &str, sql: &str) {
        std::fs::write(self.0.join(file), sql).unwrap();
    }

    async fn migrator(&self) -> Migrator {
        Migrator::new(Path::new(&self.0)).await.unwrap()
    }

    async fn run(&self, pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
        self.migrator().await.run(pool).await
    }
}

impl Drop for AppMigrations {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn oncely_versions() -> Vec<i64> {
    let mut v: Vec<i64> = oncely::core::MIGRATOR.iter().map(|m| m.version).collect();
    v.sort_unstable();
    v
}

async fn oncely_history(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM oncely._migrations ORDER BY version").fetch_all(pool).await.unwrap()
}

async fn app_history(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM public._sqlx_migrations ORDER BY version").fetch_all(pool).await.unwrap()
}

/// Both migrators rerun cleanly, and the application can add a migration afterwards.
async fn both_keep_working(pool: &PgPool, app: &AppMigrations) {
    app.run(pool).await.expect("the application's migrator reruns");
    let report = oncely::migrate_report(pool).await.expect("oncely's migrator reruns");
    assert!(report.applied.is_empty() && report.moved.is_empty(), "nothing left to do: {report:?}");
    app.add("20250201000000_orders.sql", "CREATE TABLE app_orders (id bigint PRIMARY KEY);");
    app.run(pool).await.expect("the application applies its second migration");
    oncely::migrate(pool).await.expect("oncely's migrator after the application's second migration");
    sqlx::query("INSERT INTO app_orders VALUES (1)").execute(pool).await.unwrap();
    assert_eq!(app_history(pool).await, [20250101000000, 20250201000000], "only the application's rows");
    assert_eq!(oncely_history(pool).await, oncely_versions());
}

#[tokio::test]
async fn the_application_migrates_first_then_oncely() {
    let db = empty_db().await;
    let pool = db.pool();
    let app = AppMigrations::new();
    app.run(pool).await.unwrap();

    let report = oncely::migrate_report(pool).await.expect("oncely migrates next to the application's history");
    assert_eq!(report.applied, oncely_versions());
    assert_eq!(report.recorded, oncely_versions().len());
    assert_eq!(app_history(pool).await, [20250101000000], "the application's history is untouched");
    assert_eq!(oncely_history(pool).await, oncely_versions());
    both_keep_working(pool, &app).await;
}

#[tokio::test]
async fn oncely_migrates_first_then_the_application() {
    let db = empty_db().await;
    let pool = db.pool();
    oncely::migrate(pool).await.unwrap();
    let public_history: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text").fetch_one(pool).await.unwrap();
    assert_eq!(public_history, None, "oncely writes nothing in the application's bookkeeping");

    let app = AppMigrations::new();
    app.run(pool).await.expect("the application's migrator does not see oncely's history");
    assert_eq!(app_history(pool).await, [20250101000000]);
    both_keep_working(pool, &app).await;
}

/// An older oncely recorded its migrations in `_sqlx_migrations` (with sqlx's own runner), and the
/// application got along by ignoring versions it did not know.
async fn migrate_the_old_way(pool: &PgPool, app: &AppMigrations) {
    oncely::core::MIGRATOR.run(pool).await.unwrap();
    let mut m = app.migrator().await;
    m.set_ignore_missing(true);
    m.run(pool).await.unwrap();
    let mut expected = oncely_versions();
    expected.insert(0, 20250101000000);
    assert_eq!(app_history(pool).await, expected, "the old layout: both histories in one table");
}

#[tokio::test]
async fn a_database_migrated_by_an_older_oncely_is_upgraded_and_its_rows_moved() {
    let db = empty_db().await;
    let pool = db.pool();
    let app = AppMigrations::new();
    migrate_the_old_way(pool, &app).await;
    let installed_on: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT min(installed_on) FROM public._sqlx_migrations WHERE version <> 20250101000000")
            .fetch_one(pool)
            .await
            .unwrap();

    let report = oncely::migrate_report(pool).await.unwrap();
    assert_eq!(report.moved, oncely_versions(), "oncely's rows moved");
    assert!(report.applied.is_empty(), "nothing applied twice: {report:?}");
    assert_eq!(app_history(pool).await, [20250101000000], "the application's row stays");
    assert_eq!(oncely_history(pool).await, oncely_versions());
    let moved_installed_on: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT min(installed_on) FROM oncely._migrations").fetch_one(pool).await.unwrap();
    assert_eq!(moved_installed_on, installed_on, "the rows keep their history");
    // The application's migrator works again without ignoring anything.
    both_keep_working(pool, &app).await;
}

#[tokio::test]
async fn rows_with_oncely_versions_but_other_checksums_are_left_alone() {
    let db = empty_db().await;
    let pool = db.pool();
    let app = AppMigrations::new();
    app.run(pool).await.unwrap();
    // Not oncely's migration: the version matches, the checksum does not.
    let first = oncely_versions()[0];
    sqlx::query(
        "INSERT INTO public._sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'not oncely', true, '\\x00', 0)",
    )
    .bind(first)
    .execute(pool)
    .await
    .unwrap();
    let report = oncely::migrate_report(pool).await.unwrap();
    assert!(report.moved.is_empty(), "{report:?}");
    assert_eq!(report.applied, oncely_versions());
    assert_eq!(app_history(pool).await, [first.min(20250101000000), first.max(20250101000000)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrators_on_separate_connections_apply_each_migration_once() {
    for old_layout in [false, true] {
        let db = empty_db().await;
        let app = AppMigrations::new();
        if old_layout {
            migrate_the_old_way(db.pool(), &app).await;
        }
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let pool = db.new_pool(1).await;
            // Polled together on this task, each on its own connection: they meet in the database.
            tasks.push(async move {
                let report = oncely::migrate_report(&pool).await;
                pool.close().await;
                report
            });
        }
        let mut applied = Vec::new();
        let mut moved = Vec::new();
        for report in futures::future::join_all(tasks).await {
            let report = report.expect("every concurrent migrate call succeeds");
            applied.extend(report.applied);
            moved.extend(report.moved);
        }
        applied.sort_unstable();
        moved.sort_unstable();
        let (expect_applied, expect_moved) =
            if old_layout { (vec![], oncely_versions()) } else { (oncely_versions(), vec![]) };
        assert_eq!(applied, expect_applied, "each migration applied by one caller (old layout: {old_layout})");
        assert_eq!(moved, expect_moved, "each old row moved by one caller (old layout: {old_layout})");
        assert_eq!(oncely_history(db.pool()).await, oncely_versions());
    }
}

#[tokio::test]
async fn an_edited_or_newer_history_is_refused_with_a_typed_error() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let first = oncely_versions()[0];

    sqlx::query(
        "INSERT INTO oncely._migrations (version, description, checksum) VALUES (99991231000000, 'future', '\\x00')",
    )
    .execute(pool)
    .await
    .unwrap();
    let err = oncely::migrate(pool).await.unwrap_err();
    assert!(
        matches!(
            err,
            oncely::Error::Migration(oncely::core::MigrationError::UnknownVersion { version: 99991231000000 })
        ),
        "{err:?}"
    );
    sqlx::query("DELETE FROM oncely._migrations WHERE version = 99991231000000").execute(pool).await.unwrap();

    sqlx::query("UPDATE oncely._migrations SET checksum = '\\x00' WHERE version = $1")
        .bind(first)
        .execute(pool)
        .await
        .unwrap();
    let err = oncely::migrate(pool).await.unwrap_err();
    assert!(
        matches!(&err, oncely::Error::Migration(oncely::core::MigrationError::ChecksumMismatch { version, .. }) if *version == first),
        "{err:?}"
    );
    assert!(err.to_string().contains("different checksum"), "{err}");
}
