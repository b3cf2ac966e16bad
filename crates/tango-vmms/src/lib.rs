//! VMMS backends for tango-rs, one module per backend, each behind a cargo
//! feature. Backends know nothing of HTTP or of the engine's internals: they
//! implement [`tango_core::Vmms`].
#[cfg(any(feature = "sandbox", feature = "docker"))]
mod cgroupfs;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "docker")]
pub mod docker;
#[cfg(feature = "ec2")]
pub mod ec2;
#[cfg(any(feature = "docker", feature = "ec2"))]
mod output_file;
#[cfg(feature = "sandbox")]
pub mod sandbox;
