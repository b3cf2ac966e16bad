//! Job images: the derived images with the autodriver added, the grading
//! user of each image, the image list, and loading images (`/build`).

use super::{api_error, is_not_found, naming, Docker, VmmsError, AUTODRIVER_PATH, DERIVED_REPO};
use bollard::models::{ContainerConfig, ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, ImportImageOptionsBuilder, ListImagesOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

/// Loading a large `docker save` tar can take a while.
pub(super) const IMAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// FNV-1a, 64 bits: a stable fingerprint of the autodriver binary.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The user line for `name` in a passwd file's text.
fn passwd_has_user(passwd: &str, name: &str) -> bool {
    passwd
        .lines()
        .any(|line| line.split(':').next() == Some(name))
}

/// The image a `docker load` reported, from its progress messages.
pub(super) fn loaded_image(message: &str) -> Option<&str> {
    let message = message.trim();
    message
        .strip_prefix("Loaded image: ")
        .or_else(|| message.strip_prefix("Loaded image ID: "))
        .map(str::trim)
        .filter(|image| !image.is_empty())
}

/// Tango's image names: the repository for `latest`, `repo:tag` otherwise.
fn image_names(repo_tags: &[String]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for tag in repo_tags {
        if tag == "<none>:<none>" || tag.starts_with(&format!("{DERIVED_REPO}:")) {
            continue;
        }
        match tag.rsplit_once(':') {
            Some((repo, "latest")) => {
                names.insert(repo.to_string());
            }
            _ => {
                names.insert(tag.clone());
            }
        }
    }
    names.into_iter().collect()
}

impl Docker {
    /// Removes the derived images (see the module doc) made for another
    /// autodriver build that no container uses, e.g. at server start after
    /// an upgrade; returns how many went. Another server on the same daemon
    /// with another autodriver copes: it re-derives, or uploads.
    pub async fn remove_stale_derived_images(&self) -> Result<usize, VmmsError> {
        let filters = HashMap::from([("reference", vec![DERIVED_REPO.to_string()])]);
        let options = ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let images = self
            .api
            .list_images(Some(options))
            .await
            .map_err(|e| api_error("cannot list images", e))?;
        let current = format!("-{}", self.autodriver_hash);
        let mut removed = 0;
        for tag in images.into_iter().flat_map(|i| i.repo_tags) {
            let ours = tag.starts_with(&format!("{DERIVED_REPO}:"));
            if ours && !tag.ends_with(&current) && self.remove_unused_image(&tag).await {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The `--user` of jobs on `image`: the grading user if the image has
    /// it, else the numeric fallback. Read once per image from a container.
    pub(super) async fn grading_user(
        &self,
        container: &str,
        image: &str,
    ) -> Result<String, VmmsError> {
        if let Some(user) = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(image)
        {
            return Ok(user.clone());
        }
        let passwd = self.read_file(container, "/etc/passwd", 4 << 20).await?;
        let has_user = passwd
            .map(|bytes| {
                passwd_has_user(&String::from_utf8_lossy(&bytes), &self.config.grading_user)
            })
            .unwrap_or(false);
        let user = if has_user {
            self.config.grading_user.clone()
        } else {
            self.config.fallback_user.clone()
        };
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image.to_string(), user.clone());
        Ok(user)
    }

    /// The image `image` with the autodriver in it, made once per base
    /// image and autodriver (tagged `DERIVED_REPO:<base id>-<autodriver>`),
    /// so creating a container needs no archive upload (Docker runs a helper
    /// process for each). A rebuilt base image gets a new ID, hence a new
    /// derived image.
    pub(super) async fn derived_image(&self, image: &str) -> Result<String, VmmsError> {
        let base = match self.api.inspect_image(image).await {
            Ok(base) => base,
            Err(e) if is_not_found(&e) => return Err(VmmsError::NoSuchImage(image.to_string())),
            Err(e) => return Err(api_error(format_args!("cannot inspect image {image}"), e)),
        };
        let base_id = base
            .id
            .ok_or_else(|| VmmsError::Backend(format!("image {image} has no ID")))?;
        let short_id: String = base_id
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        let tag = format!("{short_id}-{}", self.autodriver_hash);
        let derived = format!("{DERIVED_REPO}:{tag}");
        let exists = |api: &bollard::Docker| {
            let derived = derived.clone();
            let api = api.clone();
            async move { api.inspect_image(&derived).await.is_ok() }
        };
        if exists(&self.api).await {
            return Ok(derived);
        }
        let _making = self.deriving.lock().await;
        if exists(&self.api).await {
            return Ok(derived);
        }
        let body = ContainerCreateBody {
            image: Some(base_id.clone()),
            entrypoint: Some(vec![AUTODRIVER_PATH.into(), "--idle".into()]),
            cmd: Some(vec![]),
            labels: Some(HashMap::from([(
                naming::LABEL_DERIVED.to_string(),
                self.autodriver_hash.clone(),
            )])),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let scratch = self
            .api
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .map_err(|e| api_error(format_args!("cannot derive an image from {image}"), e))?
            .id;
        let made = async {
            self.upload(&scratch, self.autodriver_tar.clone())
                .await
                .map_err(|e| api_error("cannot put the autodriver into an image", e))?;
            let options = CommitContainerOptionsBuilder::default()
                .container(&scratch)
                .repo(DERIVED_REPO)
                .tag(&tag)
                .pause(false)
                .build();
            self.api
                .commit_container(options, ContainerConfig::default())
                .await
                .map_err(|e| api_error(format_args!("cannot commit {derived}"), e))
        }
        .await;
        let _ = self.remove(&scratch).await;
        made.map(|_| derived)
    }

    /// Removes the derived images of base image `base_id` that no container
    /// uses (so a replaced job image's layers can be freed).
    async fn remove_derived_images(&self, base_id: &str) {
        let short_id: String = base_id
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        let filters = HashMap::from([("reference", vec![DERIVED_REPO.to_string()])]);
        let options = ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let Ok(images) = self.api.list_images(Some(options)).await else {
            return;
        };
        for tag in images.into_iter().flat_map(|i| i.repo_tags) {
            if tag.starts_with(&format!("{DERIVED_REPO}:{short_id}-")) {
                self.remove_unused_image(&tag).await;
            }
        }
    }

    /// Removes an image tag; true when it was removed. Fails while a
    /// container uses the image, which is fine: it goes on a later pass.
    async fn remove_unused_image(&self, tag: &str) -> bool {
        self.api
            .remove_image(
                tag,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
            .is_ok()
    }

    /// The job images of the daemon, by Tango's names (Tango's getImages).
    pub(super) async fn list_images(&self) -> Result<Vec<String>, VmmsError> {
        let images = self
            .api
            .list_images(Some(ListImagesOptionsBuilder::default().build()))
            .await
            .map_err(|e| api_error("cannot list images", e))?;
        let tags: Vec<String> = images.into_iter().flat_map(|i| i.repo_tags).collect();
        Ok(image_names(&tags))
    }

    /// Loads a `docker save` tar as `name:latest` (`/build`), then drops the
    /// derived images of the image it replaced.
    pub(super) async fn load_image(&self, name: &str, tar: &Path) -> Result<(), VmmsError> {
        let previous = self
            .api
            .inspect_image(&format!("{name}:latest"))
            .await
            .ok()
            .and_then(|image| image.id);
        let file = tokio::fs::File::open(tar)
            .await
            .map_err(|e| VmmsError::io(format!("cannot open {}", tar.display()), e))?;
        let body = tokio_util::io::ReaderStream::new(file);
        let options = ImportImageOptionsBuilder::default().quiet(false).build();
        let load = async {
            let mut loaded = None;
            let mut progress = self.api.import_image_stream(options, body, None);
            while let Some(info) = progress.next().await {
                let info = info.map_err(|e| api_error("cannot load the image", e))?;
                if loaded.is_none() {
                    loaded = info
                        .stream
                        .as_deref()
                        .and_then(loaded_image)
                        .map(String::from);
                }
            }
            Ok::<_, VmmsError>(loaded)
        };
        let loaded = tokio::time::timeout(IMAGE_LOAD_TIMEOUT, load)
            .await
            .map_err(|_| VmmsError::Backend("loading the image timed out".into()))??
            .ok_or_else(|| {
                VmmsError::Backend(
                    "docker load reported no image: is this a `docker save` tar?".into(),
                )
            })?;
        let options = TagImageOptionsBuilder::default()
            .repo(name)
            .tag("latest")
            .build();
        self.api
            .tag_image(&loaded, Some(options))
            .await
            .map_err(|e| api_error(format_args!("cannot tag {loaded} as {name}:latest"), e))?;
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|image, _| image != name && image != &format!("{name}:latest"));
        let current = self
            .api
            .inspect_image(&format!("{name}:latest"))
            .await
            .ok()
            .and_then(|image| image.id);
        if let Some(previous) = previous.filter(|p| Some(p) != current.as_ref()) {
            self.remove_derived_images(&previous).await;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "images_tests.rs"]
mod tests;
