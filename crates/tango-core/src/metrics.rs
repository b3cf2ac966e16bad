//! Counters and histograms the engine keeps for `/metrics` (rendered by the
//! server; the engine knows no exposition format).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bucket bounds in seconds shared by every phase histogram: from 1 ms (a
/// warm sandbox's copy-in) to 1 h (a long job, or a queue at a deadline).
pub const PHASE_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
    3600.0,
];

/// A fixed-bucket histogram of durations, updated without locks.
#[derive(Debug)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of [`PHASE_BUCKETS`], plus +Inf.
    counts: [AtomicU64; PHASE_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// A histogram's state: cumulative counts per upper bound, sum, count.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum_secs: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe_ms(&self, ms: i64) {
        let secs = ms.max(0) as f64 / 1000.0;
        let slot = PHASE_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(PHASE_BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(ms.max(0) as u64 * 1000, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(PHASE_BUCKETS.len());
        for (i, bound) in PHASE_BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        cumulative += self.counts[PHASE_BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            sum_secs: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: cumulative,
        }
    }
}

/// Phase durations of finished jobs and backend errors.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Added (or re-queued) until its VM was ready.
    pub waiting_for_vm: Histogram,
    pub copy_in: Histogram,
    pub run: Histogram,
    pub copy_out: Histogram,
    /// Job finished until its callback was delivered.
    pub callback_delivery: Histogram,
    /// Added until finished.
    pub total: Histogram,
    /// (backend, step) -> errors.
    backend_errors: Mutex<BTreeMap<(String, String), u64>>,
}

impl EngineMetrics {
    pub fn backend_error(&self, backend: &str, step: &str) {
        *self
            .backend_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((backend.to_string(), step.to_string()))
            .or_default() += 1;
    }

    pub fn backend_errors(&self) -> BTreeMap<(String, String), u64> {
        self.backend_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the phases of a job that ran to an outcome.
    pub fn observe_phases(&self, phases: &crate::model::Phases) {
        let span = |from: Option<i64>, to: Option<i64>| from.zip(to).map(|(a, b)| b - a);
        if let Some(ms) = span(phases.added, phases.vm_ready) {
            self.waiting_for_vm.observe_ms(ms);
        }
        if let Some(ms) = span(phases.vm_ready, phases.copied_in) {
            self.copy_in.observe_ms(ms);
        }
        if let Some(ms) = span(phases.copied_in, phases.ran) {
            self.run.observe_ms(ms);
        }
        if let Some(ms) = span(phases.ran, phases.copied_out) {
            self.copy_out.observe_ms(ms);
        }
        if let Some(ms) = span(phases.added, phases.finished) {
            self.total.observe_ms(ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe_ms(0);
        h.observe_ms(3);
        h.observe_ms(7_200_000);
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.001, 1));
        assert_eq!(s.buckets[2], (0.005, 2));
        assert_eq!(s.buckets.last().unwrap().1, 2);
        assert!((s.sum_secs - 7200.003).abs() < 1e-6);
    }
}
