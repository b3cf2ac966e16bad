//! Images onto hosts that lack them: a `docker save` stream of one engine
//! fed to the `docker load` of another, with nothing on disk in between.

use super::super::images::{loaded_image, IMAGE_LOAD_TIMEOUT};
use super::super::{api_error, Docker};
use bollard::query_parameters::ImportImageOptionsBuilder;
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

#[cfg(test)]
mod tests {
    use super::image_ref;

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
