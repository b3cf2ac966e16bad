//! tango-core owns the model of tango-rs (jobs, machines, input files,
//! traces), the [`Vmms`] trait every backend implements, the [`Store`] trait
//! the engine persists through, the job engine (queue, dispatcher, pools,
//! worker steps, retries, callback outbox) and the output-file format.
//!
//! It knows nothing of HTTP servers, SQL or any particular backend.

pub mod model;
pub mod names;
pub mod vmms;

pub use model::*;
pub use vmms::*;
