//! Images onto hosts that lack them: a `docker save` stream of one engine
//! fed to the `docker load` of another, with nothing on disk in between;
//! or, when no host has it, a pull from the fleet's registry.

use super::super::images::{loaded_image, IMAGE_LOAD_TIMEOUT};
use super::super::{api_error, is_not_found, Docker};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ImportImageOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures_util::StreamExt;
use tango_core::vmms::VmmsError;

/// The reference of a Tango image name: a name without a tag is `latest`.
pub fn image_ref(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') || image.contains('@') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// Copies `image` (with its tags) from `from` to `to`; the whole transfer
/// is bounded like a `/build` load.
pub async fn stream_image(from: &Docker, to: &Docker, image: &str) -> Result<(), VmmsError> {
    let reference = image_ref(image);
    let saved = from.api().export_image(&reference);
    let options = ImportImageOptionsBuilder::default().quiet(false).build();
    let load = async {
        let mut loaded = false;
        let mut progress = to.api().import_image_stream(options, saved, None);
        while let Some(info) = progress.next().await {
            let info =
                info.map_err(|e| api_error(format_args!("cannot stream image {reference}"), e))?;
            if let Some(error) = info.error_detail.and_then(|d| d.message) {
                return Err(VmmsError::Backend(format!(
                    "docker: loading image {reference} failed: {error}"
                )));
            }
            loaded |= info.stream.as_deref().and_then(loaded_image).is_some();
        }
        if loaded {
            Ok(())
        } else {
            Err(VmmsError::Backend(format!(
                "docker: streaming image {reference} loaded nothing"
            )))
        }
    };
    tokio::time::timeout(IMAGE_LOAD_TIMEOUT, load)
        .await
        .map_err(|_| VmmsError::Backend(format!("streaming image {reference} timed out")))?
}

/// Checks `[docker] registry`: a `HOST:PORT` (or `HOST`) the engines pull
/// from, without a scheme or path (an image name is appended to it).
pub fn check_registry(registry: &str) -> Result<(), String> {
    let host = registry.split(':').next().unwrap_or_default();
    let port_ok = registry
        .split_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_ok_and(|p| p > 0));
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!(
            "registry {registry:?} is not HOST or HOST:PORT (e.g. \"registry.example.edu:5000\", \
             no scheme, no path)"
        ))
    }
}

/// Makes `to` pull `image` (a Tango image name, without a registry) from
/// `registry` and name it `image`, as if loaded. A registry that answers it
/// has no such image gives [`VmmsError::NoSuchImage`]; any other failure
/// (registry down, slow beyond the bound) is [`VmmsError::Unavailable`], so
/// the job waits for the registry instead of spending its retries.
pub async fn pull_image(to: &Docker, registry: &str, image: &str) -> Result<(), VmmsError> {
    let reference = image_ref(image);
    let (name, tag) = reference.rsplit_once(':').unwrap_or((image, "latest"));
    let remote = format!("{registry}/{name}");
    let remote_ref = format!("{remote}:{tag}");
    let tried = || format!("pulling {remote_ref} from registry {registry}");
    // The tag is given: without one the engine pulls every tag.
    let options = CreateImageOptionsBuilder::default()
        .from_image(&remote)
        .tag(tag)
        .build();
    let pull = async {
        let mut progress = to.api().create_image(Some(options), None, None);
        while let Some(info) = progress.next().await {
            let info = match info {
                Ok(info) => info,
                Err(e) if is_not_found(&e) => {
                    tracing::warn!(image, "docker: {} failed: {e}", tried());
                    return Err(VmmsError::NoSuchImage(image.to_string()));
                }
                Err(e) => {
                    return Err(VmmsError::Unavailable(format!(
                        "docker: {} failed: {e}",
                        tried()
                    )))
                }
            };
            if let Some(error) = info.error_detail.and_then(|d| d.message) {
                return Err(VmmsError::Unavailable(format!(
                    "docker: {} failed: {error}",
                    tried()
                )));
            }
        }
        Ok(())
    };
    tokio::time::timeout(IMAGE_LOAD_TIMEOUT, pull)
        .await
        .map_err(|_| {
            VmmsError::Unavailable(format!(
                "docker: {} took over {} s",
                tried(),
                IMAGE_LOAD_TIMEOUT.as_secs()
            ))
        })??;
    // Named as jobs name it; the registry's name goes, so that image lists
    // show the plain name only.
    let named = TagImageOptionsBuilder::default()
        .repo(name)
        .tag(tag)
        .build();
    to.api()
        .tag_image(&remote_ref, Some(named))
        .await
        .map_err(|e| api_error(format_args!("cannot tag {remote_ref} as {reference}"), e))?;
    let untag = RemoveImageOptionsBuilder::default().noprune(true).build();
    if let Err(e) = to.api().remove_image(&remote_ref, Some(untag), None).await {
        tracing::warn!("docker: cannot remove the tag {remote_ref}: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check_registry, image_ref};

    #[test]
    fn registries_are_host_and_port() {
        for good in ["127.0.0.1:5000", "registry.example.edu", "reg-1.lan:443"] {
            assert_eq!(check_registry(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "http://reg:5000",
            "reg:5000/course",
            "reg:",
            "reg:0",
            "reg:99999",
            ":5000",
        ] {
            assert!(check_registry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn untagged_names_mean_latest() {
        assert_eq!(
            image_ref("tango-test-bookworm"),
            "tango-test-bookworm:latest"
        );
        assert_eq!(image_ref("course/img:v2"), "course/img:v2");
        assert_eq!(image_ref("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(image_ref("localhost:5000/x:v1"), "localhost:5000/x:v1");
    }
}
