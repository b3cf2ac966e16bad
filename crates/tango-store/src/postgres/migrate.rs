//! The schema: the files of `migrations/postgres`, embedded, applied by
//! sqlx's migrator (which records them in `_sqlx_migrations` and holds a
//! PostgreSQL advisory lock meanwhile, so that servers starting together
//! apply each migration once).

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::PgPool;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use tango_core::StoreError;

/// `(version, description, sql)`, oldest first. Add a file and a line for
/// any change; never edit one that shipped, as databases made by it exist
/// (sqlx refuses a database whose applied migration's checksum changed).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../migrations/postgres/0001_schema.sql"),
    ),
    (
        2,
        "servers",
        include_str!("../../migrations/postgres/0002_servers.sql"),
    ),
    (
        3,
        "shared",
        include_str!("../../migrations/postgres/0003_shared.sql"),
    ),
];

/// The schema version this build writes and the newest it can open.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The embedded migrations, as sqlx's migrator takes them (sqlx's
/// `migrate!` macro would do the same at the cost of building its macros).
#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Refuses a database of a newer schema without writing to it, then
/// applies the migrations it lacks.
pub(super) async fn run(pool: &PgPool, target: &str) -> Result<(), StoreError> {
    let fail = |what: &str, e: sqlx::Error| super::explain(target, what, e);
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(|e| fail("connecting", e))?;
    let found: Option<i64> = if recorded {
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(pool)
            .await
            .map_err(|e| fail("reading the schema version", e))?
    } else {
        None
    };
    if let Some(found) = found.filter(|v| *v > SCHEMA_VERSION) {
        return Err(StoreError(format!(
            "the PostgreSQL database {target} has schema version {found}, but this tangod knows \
             versions up to {SCHEMA_VERSION}: a newer tangod wrote it. Run that newer tangod (or \
             a later one), or restore a backup made by this version; the database was not changed"
        )));
    }
    let migrator = Migrator::new(Embedded)
        .await
        .map_err(|e| StoreError(format!("the embedded migrations are broken: {e}")))?;
    migrator.run(pool).await.map_err(|e| {
        StoreError(format!(
            "PostgreSQL store {target}: cannot bring the schema to version {SCHEMA_VERSION}: \
             {e}; the failed migration was rolled back"
        ))
    })
}
