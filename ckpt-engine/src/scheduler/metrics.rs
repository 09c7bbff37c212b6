//! Plain metric data of the scheduler: counters, gauges and fixed-bucket histograms, exposed as a
//! snapshot struct that exporters (Prometheus in the proxy, the load-test report) copy from.

use std::time::Duration;

use serde::Serialize;

/// Upper bounds of histogram buckets in microseconds (the last bucket is unbounded).
pub const BUCKET_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram with fixed buckets ([`BUCKET_BOUNDS_US`] plus one overflow bucket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Histogram {
    /// Count per bucket; `counts[i]` holds values `<= BUCKET_BOUNDS_US[i]` (and above the
    /// previous bound); the last element counts values above every bound.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, value: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKET_BOUNDS_US.len() + 1];
        }
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKET_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKET_BOUNDS_US.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// Upper bound (µs) of the bucket holding quantile `q` (0..=1); `max_us` for the overflow
    /// bucket; 0 when empty.
    pub fn quantile_upper_bound_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return BUCKET_BOUNDS_US
                    .get(i)
                    .copied()
                    .unwrap_or(self.max_us)
                    .min(self.max_us);
            }
        }
        self.max_us
    }

    /// Mean in microseconds (0 when empty).
    pub fn mean_us(&self) -> u64 {
        self.sum_us.checked_div(self.count).unwrap_or(0)
    }
}

/// A copy of every scheduler metric at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SchedulerMetrics {
    /// Jobs waiting in the normal lane (gauge).
    pub queued_normal: u64,
    /// Jobs waiting in the priority lane (gauge).
    pub queued_priority: u64,
    /// Jobs running (gauge).
    pub running: u64,
    /// Tokens in the I/O bucket, bytes (gauge; negative while priority jobs borrowed).
    pub io_tokens: i64,
    /// Submissions (counter).
    pub submitted: u64,
    /// Submissions folded into an already queued job of the same sandbox (counter).
    pub coalesced: u64,
    /// Jobs moved to the priority lane because a reply started waiting (counter).
    pub promoted: u64,
    /// Waiters cancelled (counter).
    pub cancelled: u64,
    /// Jobs dropped from a queue because every waiter cancelled (counter).
    pub dropped: u64,
    /// Jobs started (counter).
    pub started: u64,
    /// Jobs finished successfully (counter).
    pub succeeded: u64,
    /// Jobs failed (counter).
    pub failed: u64,
    /// Estimated bytes of started jobs (counter).
    pub bytes_started: u64,
    /// Estimated bytes returned to the I/O bucket by jobs that wrote less (counter).
    pub bytes_refunded: u64,
    /// Time from a waiter's submission to its job's start.
    pub queueing_delay: Histogram,
    /// Time from the moment a reply started waiting on a job to the job's end: the delay the
    /// agent sees.
    pub exposed_delay: Histogram,
    /// Run time of jobs.
    pub run_time: Histogram,
}
