//! Callback delivery over HTTP, in Tango's shape: a multipart/form-data POST
//! with one file part named `file` (filename `file`) holding the output, and
//! a `Filename: <output_file>` header. Any 2xx answer counts as delivered.

use async_trait::async_trait;
use std::time::Duration;
use tango_core::CallbackSender;

pub struct HttpCallbacks {
    client: reqwest::Client,
}

impl HttpCallbacks {
    /// `ca_cert`: PEM certificates trusted besides the public roots.
    pub fn new(ca_cert: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read callback_ca_cert {}: {e}", path.display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "callback_ca_cert {} holds no PEM certificate \
                         (expected -----BEGIN CERTIFICATE-----)",
                        path.display()
                    )
                })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("tango-rs/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpCallbacks { client })
    }
}

#[async_trait]
impl CallbackSender for HttpCallbacks {
    async fn send(&self, url: &str, output_file: &str, body: Vec<u8>) -> Result<(), String> {
        let part = reqwest::multipart::Part::bytes(body).file_name("file");
        let form = reqwest::multipart::Form::new().part("file", part);
        let answer = self
            .client
            .post(url)
            .header("Filename", output_file)
            .multipart(form)
            .send()
            .await
            .map_err(|e| {
                let why = causes(&e);
                // rustls's words for a certificate it refuses.
                let hint = if why.contains("invalid peer certificate") {
                    " (if a private CA signed its certificate, give that CA as callback_ca_cert)"
                } else {
                    ""
                };
                format!("cannot reach {url}: {why}{hint}")
            })?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url} answered HTTP {}", answer.status()))
        }
    }
}

/// An error with its causes: reqwest's own message leaves out why a
/// request failed (refused, a certificate not trusted...).
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let more = e.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        current = e.source();
    }
    text
}
