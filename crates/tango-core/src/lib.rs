//! tango-core owns the model of tango-rs (jobs, machines, input files,
//! traces), the [`Vmms`] trait every backend implements, the [`Store`] trait
//! the engine persists through, the job engine (queue, dispatcher, pools,
//! worker steps, retries, callback outbox), the data directory layout and
//! the output-file format.
//!
//! It knows nothing of HTTP servers, SQL or any particular backend.

pub mod config;
pub mod engine;
pub mod files;
pub mod metrics;
pub mod model;
pub mod names;
pub mod output;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vmms;

#[cfg(test)]
mod engine_tests;

pub use config::{CourselabPolicy, EngineConfig, Scheduling, Timeouts};
pub use engine::{CallbackSender, Engine, EngineError, NewJob, MAX_POOL_SIZE};
pub use model::*;
pub use store::{OutboxEntry, Store, StoreError};
pub use vmms::*;
