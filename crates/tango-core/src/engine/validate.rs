//! Job validation: what `addJob` checks before a job is queued (names as
//! single path components, the image, limits within the server's bounds,
//! input files frozen to the version uploaded last).

use super::{EngineError, Inner, NewJob};
use crate::model::{InputFile, Job};
use crate::names::{check_component, check_image};
use std::collections::HashSet;

impl Inner {
    pub(super) async fn validate(&self, new: NewJob) -> Result<Job, EngineError> {
        let invalid = |m: String| EngineError::Invalid(m);
        if new.name.len() > 1024 {
            return Err(invalid("jobName is longer than 1024 bytes".into()));
        }
        check_image(&new.image).map_err(|_| EngineError::InvalidImage)?;
        check_component("output_file", &new.output_file).map_err(|e| invalid(e.to_string()))?;
        if !self.courselab_exists(&new.courselab_dir).await? {
            return Err(EngineError::NoCourselab);
        }
        if new.files.is_empty() {
            return Err(invalid(
                "files is empty: a job needs at least a Makefile".into(),
            ));
        }
        if new.files.len() > 1000 {
            return Err(invalid("a job may have at most 1000 files".into()));
        }
        let mut dests = HashSet::new();
        for (local, dest) in &new.files {
            check_component("localFile", local).map_err(|e| invalid(e.to_string()))?;
            check_component("destFile", dest).map_err(|e| invalid(e.to_string()))?;
            if !dests.insert(dest.as_str()) {
                return Err(invalid(format!("destFile {dest:?} appears twice")));
            }
        }
        if !dests.contains("Makefile") {
            return Err(invalid(
                "no file has destFile \"Makefile\": exactly one file must be the Makefile".into(),
            ));
        }
        if let Some(url) = &new.callback_url {
            let ok_scheme = url.starts_with("http://") || url.starts_with("https://");
            if !ok_scheme || url.len() > 4096 || url.chars().any(|c| c.is_control() || c == ' ') {
                return Err(invalid(format!(
                    "callback_url {url:?} is not an http:// or https:// URL"
                )));
            }
        }
        let vmms = new
            .vmms
            .clone()
            .unwrap_or_else(|| self.config.default_vmms.clone());
        self.backend(&vmms)?;
        if !self.images(&vmms).await?.iter().any(|i| i == &new.image) {
            return Err(EngineError::InvalidImage);
        }
        let timeout_secs = match new.timeout_secs {
            Some(t) if t > 0 => (t as u64).min(self.config.max_timeout_secs),
            _ => self.config.default_timeout_secs,
        };
        let max_kb = match new.max_kb {
            Some(k) if k > 0 => (k as u64).min(self.config.max_output_kb),
            _ => self.config.default_output_kb,
        };
        let mut inputs = Vec::with_capacity(new.files.len());
        for (local, dest) in &new.files {
            let (path, md5) = self
                .data
                .snapshot(self.store.as_ref(), &new.courselab_dir, local)
                .await?;
            inputs.push(InputFile {
                local_file: local.clone(),
                dest_file: dest.clone(),
                path,
                md5,
            });
        }
        let (cores, memory_mb) = {
            let st = self.lock();
            st.pools
                .get(&new.image)
                .map(|p| (p.cores, p.memory_mb))
                .unwrap_or((None, None))
        };
        Ok(Job {
            inputs,
            output_file: new.output_file,
            timeout_secs,
            max_output_bytes: max_kb * 1024,
            callback_url: new.callback_url,
            disable_network: new.disable_network,
            cores,
            memory_mb,
            credentials: new.credentials,
            ..Job::new(new.name, new.courselab_dir, new.courselab, new.image, vmms)
        })
    }
}
