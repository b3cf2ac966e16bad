//! Bounded capture of the job's output.
//!
//! The cap applies while reading, so memory stays bounded by the cap no
//! matter how much the job writes: the first `cap / 2` bytes are kept as the
//! head, and a ring buffer keeps the last `cap - cap / 2` bytes after the head.
//! That is enough to print everything when the total fits in the cap, and the
//! first and last `cap / 2` bytes (Tango's layout) when it does not.

/// The marker Tango's autodriver prints between the head and the tail.
pub const ELISION_MARKER: &[u8] = b"\n...[excess bytes elided]...\n";

pub struct OutputCapture {
    cap: usize,
    head: Vec<u8>,
    head_limit: usize,
    tail: Vec<u8>,
    tail_limit: usize,
    /// Where the next byte goes in `tail` once it is full.
    tail_start: usize,
    total: u64,
}

impl OutputCapture {
    pub fn new(cap: usize) -> Self {
        let head_limit = cap / 2;
        let tail_limit = cap - head_limit;
        OutputCapture {
            cap,
            head: Vec::with_capacity(head_limit.min(1 << 20)),
            head_limit,
            tail: Vec::new(),
            tail_limit,
            tail_start: 0,
            total: 0,
        }
    }

    /// Takes in the next chunk of output; returns the part of it that went
    /// into the head (what may be streamed live).
    pub fn push<'a>(&mut self, mut chunk: &'a [u8]) -> &'a [u8] {
        self.total += chunk.len() as u64;
        let room = self.head_limit - self.head.len();
        let into_head = room.min(chunk.len());
        let head_part = &chunk[..into_head];
        self.head.extend_from_slice(head_part);
        chunk = &chunk[into_head..];
        if chunk.is_empty() || self.tail_limit == 0 {
            return head_part;
        }
        if chunk.len() >= self.tail_limit {
            // The chunk alone fills the ring: keep its end only.
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - self.tail_limit..]);
            self.tail_start = 0;
            return head_part;
        }
        let free = self.tail_limit - self.tail.len();
        if free > 0 {
            let n = free.min(chunk.len());
            self.tail.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
        }
        if chunk.is_empty() {
            return head_part;
        }
        // The ring is full and the rest is shorter than it: overwrite the
        // oldest bytes, in two slices when the rest wraps around the end.
        let to_end = chunk.len().min(self.tail_limit - self.tail_start);
        self.tail[self.tail_start..self.tail_start + to_end].copy_from_slice(&chunk[..to_end]);
        let wrapped = &chunk[to_end..];
        self.tail[..wrapped.len()].copy_from_slice(wrapped);
        self.tail_start = (self.tail_start + chunk.len()) % self.tail_limit;
        head_part
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn elided(&self) -> bool {
        self.total > self.cap as u64
    }

    /// The bytes kept after the head, oldest first.
    fn tail_in_order(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tail.len());
        out.extend_from_slice(&self.tail[self.tail_start..]);
        out.extend_from_slice(&self.tail[..self.tail_start]);
        out
    }

    /// The output as printed: everything when it fits in the cap, else the
    /// first `cap / 2` bytes, the marker and the last `cap / 2` bytes.
    /// Also returns how many of the job's bytes that contains.
    pub fn render(&self) -> (Vec<u8>, u64) {
        let tail = self.tail_in_order();
        let mut out = Vec::with_capacity(self.head.len() + ELISION_MARKER.len() + tail.len());
        out.extend_from_slice(&self.head);
        if !self.elided() {
            out.extend_from_slice(&tail);
            return (out, self.total);
        }
        let keep = self.head_limit.min(tail.len());
        out.extend_from_slice(ELISION_MARKER);
        out.extend_from_slice(&tail[tail.len() - keep..]);
        (out, (self.head.len() + keep) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8], cap: usize) -> Vec<u8> {
        if data.len() <= cap {
            return data.to_vec();
        }
        let half = cap / 2;
        let mut out = data[..half].to_vec();
        out.extend_from_slice(ELISION_MARKER);
        out.extend_from_slice(&data[data.len() - half..]);
        out
    }

    #[test]
    fn matches_reference_for_many_sizes_and_chunkings() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cap in [0usize, 1, 2, 3, 10, 11, 100, 999, 4999, 5000, 5001, 9000] {
            for len in [0usize, 1, 5, 10, 11, 12, 99, 100, 101, 2500, 5000] {
                for chunk in [1usize, 3, 64, 1000, 4096] {
                    let mut capture = OutputCapture::new(cap);
                    for piece in data[..len].chunks(chunk) {
                        capture.push(piece);
                    }
                    let (rendered, kept) = capture.render();
                    let expected = reference(&data[..len], cap);
                    assert_eq!(rendered, expected, "cap {cap} len {len} chunk {chunk}");
                    assert_eq!(capture.total(), len as u64);
                    let expected_kept = if len <= cap { len } else { 2 * (cap / 2) };
                    assert_eq!(kept, expected_kept as u64);
                }
            }
        }
    }

    #[test]
    fn push_returns_the_head_part() {
        let mut capture = OutputCapture::new(8);
        assert_eq!(capture.push(b"abc"), b"abc");
        assert_eq!(capture.push(b"defgh"), b"d");
        assert_eq!(capture.push(b"ij"), b"");
    }
}
