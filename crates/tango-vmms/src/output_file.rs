//! The last job's output file, as the docker and ec2 backends keep it on
//! tangod's machine: `copy_out` copies it to where the engine wants it.

use std::path::{Path, PathBuf};
use tango_core::vmms::VmmsError;

/// Copies `output`, the output file of the last job run in VM `vm`, to
/// `dest`; `None`: no job has run there.
pub(crate) async fn copy_last_output(
    output: Option<PathBuf>,
    vm: &str,
    dest: &Path,
) -> Result<(), VmmsError> {
    let output = output.ok_or_else(|| VmmsError::Backend(format!("no job has run in {vm}")))?;
    tokio::fs::copy(&output, dest).await.map_err(|e| {
        VmmsError::io(
            format!("cannot copy {} to {}", output.display(), dest.display()),
            e,
        )
    })?;
    Ok(())
}
