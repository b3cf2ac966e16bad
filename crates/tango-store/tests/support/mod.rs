pub mod job;
#[cfg(feature = "postgres")]
pub mod postgres;
