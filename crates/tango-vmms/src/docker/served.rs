//! Jobs run by the container's PID 1 (`autodriver --idle --serve`) over a
//! Docker attach stream instead of one `docker exec` each: an exec costs
//! tens of ms of daemon and runc work, and a burst of container starts
//! makes it wait behind them. The request format is the autodriver's
//! (crates/autodriver/src/idle.rs).

use bollard::container::LogOutput;
use futures_util::Stream;
use std::fmt;
use std::pin::Pin;
use tokio::io::AsyncWrite;

/// The attach connection to a container's PID 1.
pub struct Attached {
    pub output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

impl fmt::Debug for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Attached")
    }
}

/// A fresh request nonce: 32 hex digits from the kernel's random source.
pub fn nonce() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        let got = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += got as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The request header and arguments (the input follows them).
pub fn request(nonce: &str, args: &[String], input_len: usize) -> Vec<u8> {
    let mut encoded = Vec::new();
    for arg in args {
        encoded.extend_from_slice(arg.as_bytes());
        encoded.push(0);
    }
    let mut request = format!("run {nonce} {} {input_len}\n", encoded.len()).into_bytes();
    request.extend_from_slice(&encoded);
    request
}

/// Finds the end line `\0autodriver-done NONCE CODE\n` in the output as it
/// comes, holding back only what could be its start.
pub struct EndScanner {
    marker: Vec<u8>,
    held: Vec<u8>,
    /// The marker has been seen: the bytes of CODE so far.
    code: Option<Vec<u8>>,
}

pub enum Scanned {
    /// Output to keep; the end is not reached.
    Output(Vec<u8>),
    /// The last output, the exit code (`None` when unreadable), and what
    /// followed the end line in the chunk.
    End(Vec<u8>, Option<i32>, Vec<u8>),
}

impl EndScanner {
    pub fn new(nonce: &str) -> Self {
        EndScanner {
            marker: format!("\0autodriver-done {nonce} ").into_bytes(),
            held: Vec::new(),
            code: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Scanned {
        if let Some(code) = &mut self.code {
            return Self::code_part(code, chunk, Vec::new());
        }
        self.held.extend_from_slice(chunk);
        if let Some(at) = find(&self.held, &self.marker) {
            let rest = self.held.split_off(at + self.marker.len());
            self.held.truncate(at);
            let output = std::mem::take(&mut self.held);
            let code = self.code.insert(Vec::new());
            return Self::code_part(code, &rest, output);
        }
        // Keep the longest tail that is a start of the marker.
        let keep = (1..self.marker.len())
            .rev()
            .find(|&n| n <= self.held.len() && self.held.ends_with(&self.marker[..n]))
            .unwrap_or(0);
        let output = self.held.drain(..self.held.len() - keep).collect();
        Scanned::Output(output)
    }

    fn code_part(code: &mut Vec<u8>, chunk: &[u8], output: Vec<u8>) -> Scanned {
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                code.extend_from_slice(&chunk[..end]);
                let parsed = std::str::from_utf8(code).ok().and_then(|c| c.parse().ok());
                Scanned::End(output, parsed, chunk[end + 1..].to_vec())
            }
            None => {
                code.extend_from_slice(chunk);
                Scanned::Output(output)
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(nonce: &str, chunks: &[&[u8]]) -> (Vec<u8>, Option<Option<i32>>) {
        let mut scanner = EndScanner::new(nonce);
        let mut output = Vec::new();
        for chunk in chunks {
            match scanner.feed(chunk) {
                Scanned::Output(o) => output.extend(o),
                Scanned::End(o, code, _) => {
                    output.extend(o);
                    return (output, Some(code));
                }
            }
        }
        (output, None)
    }

    #[test]
    fn the_end_is_found_across_chunks() {
        let n = "0123456789abcdef0123456789abcdef";
        let whole = format!("hello\n\0autodriver-done {n} 2\n");
        for split in 0..whole.len() {
            let (a, b) = whole.as_bytes().split_at(split);
            let (output, code) = scan(n, &[a, b]);
            assert_eq!(output, b"hello\n", "split at {split}");
            assert_eq!(code, Some(Some(2)), "split at {split}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = whole.as_bytes().chunks(1).collect();
        assert_eq!(scan(n, &bytes), (b"hello\n".to_vec(), Some(Some(2))));
    }

    #[test]
    fn another_nonce_is_output() {
        let n = "0123456789abcdef0123456789abcdef";
        let fake = "x\0autodriver-done ffffffffffffffffffffffffffffffff 0\ny";
        let (output, code) = scan(n, &[fake.as_bytes()]);
        assert_eq!(code, None);
        // All but a possible start of the marker is passed on at once.
        let (output2, _) = scan(
            n,
            &[
                fake.as_bytes(),
                format!("\0autodriver-done {n} 0\n").as_bytes(),
            ],
        );
        assert!(fake.as_bytes().starts_with(&output));
        assert_eq!(output2, fake.as_bytes());
    }

    #[test]
    fn requests_and_nonces() {
        let a = nonce().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, nonce().unwrap());
        let r = request(&a, &["-t".into(), "5".into()], 10);
        assert_eq!(r, format!("run {a} 5 10\n-t\05\0").into_bytes());
    }
}
