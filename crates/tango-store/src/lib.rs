//! Implementations of tango-core's [`Store`](tango_core::Store): SQLite, the
//! embedded default (one file in the data dir, [`SqliteStore`]), and, with
//! the `postgres` feature, PostgreSQL ([`PostgresStore`]). Both keep jobs as
//! the same JSON records, with their state and courselab as indexed columns.

mod sqlite;
pub use sqlite::{SqliteStore, SCHEMA_VERSION};

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};

use tango_core::{Job, StoreError};

/// A job's record, as both stores keep it.
fn job_record(job: &Job) -> Result<String, StoreError> {
    serde_json::to_string(job)
        .map_err(|e| StoreError(format!("cannot serialize job {}: {e}", job.id)))
}
