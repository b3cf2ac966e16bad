//! tango-core owns the model of tango-rs (jobs, machines, input files,
//! traces), the [`Vmms`] trait every backend implements, the [`Store`] trait
//! the engine persists through, the job engine, the data directory layout
//! and the output-file format.
//!
//! The job engine ([`engine`]) is a folder, one concern per file:
//! `engine/mod.rs` the public API and shared state; `engine/validate.rs`
//! what `addJob` checks; `engine/scheduler.rs` the scheduling policy (a
//! pure type: fair or fifo); `engine/dispatch.rs` the queue (what starts
//! next, in the scheduler's order) and restart recovery;
//! `engine/pools.rs` VM pools and placement; `engine/worker.rs` one job's
//! steps and retries; `engine/outbox.rs` callback delivery;
//! `engine/sweeps.rs` the orphan-VM and unused-blob sweeps.
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

pub use config::{CourselabPolicy, EngineConfig, Scheduling, Timeouts};
pub use engine::{CallbackSender, Engine, EngineError, NewJob, MAX_POOL_SIZE};
pub use model::*;
pub use store::{OutboxEntry, ServerRecord, SharedOutput, SharedStore, Store, StoreError};
pub use vmms::*;
