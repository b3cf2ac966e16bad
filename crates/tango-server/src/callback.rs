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
    pub fn new() -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
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
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url} answered HTTP {}", answer.status()))
        }
    }
}
