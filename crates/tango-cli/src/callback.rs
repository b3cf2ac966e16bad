//! A small HTTP server that receives job results: tangod POSTs each finished
//! output to the job's `callback_url` as multipart/form-data with a file
//! part named `file`. Each job gets its own path, so one listener serves
//! any number of jobs.

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// A delivered result: the output bytes and when they arrived.
#[derive(Debug)]
pub struct Delivery {
    pub output: Vec<u8>,
    pub received_at: Instant,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Delivery>>>>;

pub struct CallbackListener {
    /// What tangod is told to POST to, without the per-job token.
    public_base: String,
    waiters: Waiters,
    next_token: AtomicU64,
    /// Makes tokens of different runs differ, so a late callback of an
    /// earlier run on a reused port is not mistaken for ours.
    run_nonce: String,
    shutdown: Option<oneshot::Sender<()>>,
}

/// The results of outputs can be large (capped at the server's maximum).
const MAX_CALLBACK_BYTES: usize = 1 << 30;

impl CallbackListener {
    /// Listens on `bind` (e.g. 127.0.0.1:0). `public_base` is the URL tangod
    /// should use when it differs from the bound address (tangod on another
    /// host); by default it is `http://<bound address>`.
    pub async fn start(bind: SocketAddr, public_base: Option<String>) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| {
            format!("cannot listen for callbacks on {bind} — pick another --callback-listen")
        })?;
        let local_addr = listener.local_addr()?;
        let waiters: Waiters = Arc::default();
        let app = Router::new()
            .route("/callback/{token}", post(receive))
            .layer(DefaultBodyLimit::max(MAX_CALLBACK_BYTES))
            .with_state(waiters.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("warning: the callback listener stopped: {e}");
            }
        });
        let public_base = public_base
            .map(|b| b.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("http://{local_addr}"));
        let run_nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        Ok(CallbackListener {
            public_base,
            waiters,
            next_token: AtomicU64::new(0),
            run_nonce,
            shutdown: Some(shutdown),
        })
    }

    /// Registers a job before it is added: returns its callback URL and the
    /// receiver its result will arrive on.
    pub fn expect(&self) -> (String, oneshot::Receiver<Delivery>) {
        let n = self.next_token.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}-{n}", self.run_nonce);
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.insert(token.clone(), sender);
        }
        (format!("{}/callback/{token}", self.public_base), receiver)
    }
}

impl Drop for CallbackListener {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

async fn receive(
    State(waiters): State<Waiters>,
    Path(token): Path<String>,
    mut multipart: Multipart,
) -> StatusCode {
    let received_at = Instant::now();
    let mut output = None;
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                if field.name() == Some("file") {
                    match field.bytes().await {
                        Ok(bytes) => output = Some(bytes.to_vec()),
                        Err(_) => return StatusCode::BAD_REQUEST,
                    }
                }
            }
            Ok(None) => break,
            Err(_) => return StatusCode::BAD_REQUEST,
        }
    }
    let Some(output) = output else {
        return StatusCode::BAD_REQUEST;
    };
    let waiter = waiters.lock().ok().and_then(|mut w| w.remove(&token));
    if let Some(waiter) = waiter {
        let _ = waiter.send(Delivery {
            output,
            received_at,
        });
    }
    // Unknown tokens (a repeated delivery, or a job whose waiter gave up)
    // are acknowledged too, so tangod stops retrying them. Autolab answers
    // 204 the same way.
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_the_file_part_to_the_job_that_expects_it() {
        let listener = CallbackListener::start("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        let (url_a, rx_a) = listener.expect();
        let (url_b, rx_b) = listener.expect();
        assert_ne!(url_a, url_b);
        let http = reqwest::Client::new();
        let form = reqwest::multipart::Form::new()
            .text("other", "ignored")
            .part(
                "file",
                reqwest::multipart::Part::bytes(b"result B\n".to_vec()).file_name("file"),
            );
        let answer = http
            .post(&url_b)
            .header("Filename", "b.out")
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 204);
        let got = rx_b.await.unwrap();
        assert_eq!(got.output, b"result B\n");
        // A repeat of the same delivery is acknowledged and dropped.
        let form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(b"again".to_vec()).file_name("file"),
        );
        let answer = http.post(&url_b).multipart(form).send().await.unwrap();
        assert_eq!(answer.status(), 204);
        // A body without a `file` part is refused.
        let form = reqwest::multipart::Form::new().text("nope", "x");
        let answer = http.post(&url_a).multipart(form).send().await.unwrap();
        assert_eq!(answer.status(), 400);
        drop(rx_a);
    }
}
