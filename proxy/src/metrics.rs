//! Prometheus metrics (prometheus-client), served by the admin listener at `/metrics`.
//!
//! The per-API series the forwarding path touches on every request are resolved once, on
//! first use, and kept as handles ([`Metrics::request_bytes_for`] and friends): a `Family`
//! lookup hashes the labels and takes a lock each time. `crab_requests_total` keeps handles
//! for status 200 only ([`Metrics::count_request`]). A series still appears in `/metrics`
//! only once it was used.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `crab_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub api: &'static str,
    pub class: &'static str,
    pub status: u16,
}

/// A label set with only the API.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: &'static str,
}

/// Labels of `crab_stream_ends_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    pub api: &'static str,
    pub end: &'static str,
}

/// Labels of `crab_proxy_errors_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub side: &'static str,
    pub code: &'static str,
}

/// Labels of `crab_proxy_worker_connections`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: u32,
}

/// Labels of `crab_turns_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SandboxLabels {
    pub sandbox: String,
}

/// All proxy metrics.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_bytes: Family<ApiLabels, Counter>,
    pub response_bytes: Family<ApiLabels, Counter>,
    pub active_streams: Gauge,
    /// Open client connections per proxy worker (the acceptor's balancing input).
    pub worker_connections: Family<WorkerLabels, Gauge>,
    pub ttft_seconds: Family<ApiLabels, Histogram>,
    pub added_latency_seconds: Histogram,
    pub stream_ends: Family<EndLabels, Counter>,
    pub proxy_errors: Family<ErrorLabels, Counter>,
    pub turns: Family<SandboxLabels, Counter>,
    pub transcript_dropped: Counter,
    pub transcript_queue_wait_seconds: Histogram,
    pub transcript_write_errors: Counter,
    request_bytes_by_api: [OnceLock<Counter>; API_SLOTS],
    response_bytes_by_api: [OnceLock<Counter>; API_SLOTS],
    ttft_by_api: [OnceLock<Histogram>; API_SLOTS],
    stream_ends_by_api: [[OnceLock<Counter>; END_SLOTS]; API_SLOTS],
    requests_ok_by_api: [[OnceLock<Counter>; CLASS_SLOTS]; API_SLOTS],
}

/// Distinct API labels (see `forward::api_label`) and stream-end labels.
pub const API_SLOTS: usize = 5;
pub const END_SLOTS: usize = 4;
/// Distinct request class labels (see `forward::class_label`).
pub const CLASS_SLOTS: usize = 8;

/// An API label with its slot in the per-API handle arrays (`slot < API_SLOTS`).
#[derive(Debug, Clone, Copy)]
pub struct ApiSlot {
    pub slot: usize,
    pub label: &'static str,
}

impl Metrics {
    /// `crab_request_bytes_total{api}`.
    pub fn request_bytes_for(&self, api: ApiSlot) -> &Counter {
        self.request_bytes_by_api[api.slot % API_SLOTS].get_or_init(|| {
            self.request_bytes
                .get_or_create(&ApiLabels { api: api.label })
                .clone()
        })
    }

    /// `crab_response_bytes_total{api}`.
    pub fn response_bytes_for(&self, api: ApiSlot) -> &Counter {
        self.response_bytes_by_api[api.slot % API_SLOTS].get_or_init(|| {
            self.response_bytes
                .get_or_create(&ApiLabels { api: api.label })
                .clone()
        })
    }

    /// `crab_ttft_seconds{api}`.
    pub fn ttft_for(&self, api: ApiSlot) -> &Histogram {
        self.ttft_by_api[api.slot % API_SLOTS].get_or_init(|| {
            self.ttft_seconds
                .get_or_create(&ApiLabels { api: api.label })
                .clone()
        })
    }

    /// `crab_stream_ends_total{api,end}`; `end_slot < END_SLOTS` numbers the end labels.
    pub fn stream_end_for(&self, api: ApiSlot, end_slot: usize, end: &'static str) -> &Counter {
        self.stream_ends_by_api[api.slot % API_SLOTS][end_slot % END_SLOTS].get_or_init(|| {
            self.stream_ends
                .get_or_create(&EndLabels {
                    api: api.label,
                    end,
                })
                .clone()
        })
    }
}

impl Metrics {
    /// Counts one request in `crab_requests_total{api,class,status}`: through a kept handle
    /// for status 200 (nearly every request), a `Family` lookup for the others.
    /// `class_slot < CLASS_SLOTS` numbers the class labels.
    pub fn count_request(&self, api: ApiSlot, class_slot: usize, class: &'static str, status: u16) {
        let labels = || RequestLabels {
            api: api.label,
            class,
            status,
        };
        if status == 200 {
            self.requests_ok_by_api[api.slot % API_SLOTS][class_slot % CLASS_SLOTS]
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc();
        } else {
            self.requests.get_or_create(&labels()).inc();
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under the `crab` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            active_streams: Gauge::default(),
            worker_connections: Family::default(),
            ttft_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 19))
            }),
            // Fine below a millisecond (the target is 100 µs), coarse above.
            added_latency_seconds: Histogram::new(
                [
                    5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 125, 150, 200, 250, 300, 400, 500,
                    750, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
                ]
                .into_iter()
                .map(|us| f64::from(us) / 1e6),
            ),
            stream_ends: Family::default(),
            proxy_errors: Family::default(),
            turns: Family::default(),
            transcript_dropped: Counter::default(),
            transcript_queue_wait_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            transcript_write_errors: Counter::default(),
            request_bytes_by_api: Default::default(),
            response_bytes_by_api: Default::default(),
            ttft_by_api: Default::default(),
            stream_ends_by_api: Default::default(),
            requests_ok_by_api: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("crab");
        r.register(
            "requests",
            "Requests forwarded or answered, by API, class and status",
            m.requests.clone(),
        );
        r.register(
            "request_bytes",
            "Request body bytes received from clients, by API",
            m.request_bytes.clone(),
        );
        r.register(
            "response_bytes",
            "Response body bytes forwarded to clients, by API",
            m.response_bytes.clone(),
        );
        r.register(
            "active_streams",
            "Responses currently being forwarded",
            m.active_streams.clone(),
        );
        r.register(
            "proxy_worker_connections",
            "Open client connections per proxy worker thread",
            m.worker_connections.clone(),
        );
        r.register(
            "ttft_seconds",
            "Time from request arrival to the first content token, by API",
            m.ttft_seconds.clone(),
        );
        r.register(
            "added_latency_seconds",
            "The proxy's own time per request: request head in to upstream request sent (minus \
             the wait for the client's body bytes), plus response head in to response head out",
            m.added_latency_seconds.clone(),
        );
        r.register(
            "stream_ends",
            "Responses by how they ended (completed, upstream_error, cut, client_cancelled)",
            m.stream_ends.clone(),
        );
        r.register(
            "proxy_errors",
            "Errors answered by the proxy itself, by failed side and code",
            m.proxy_errors.clone(),
        );
        r.register("turns", "Turns started, by sandbox", m.turns.clone());
        r.register(
            "transcript_dropped",
            "Transcript records lost because the writer thread is gone (it panicked; logged \
             once). A full queue never drops: new requests wait instead \
             (crab_transcript_queue_wait_seconds)",
            m.transcript_dropped.clone(),
        );
        r.register(
            "transcript_queue_wait_seconds",
            "Time requests waited before being read because the transcript writer was behind \
             its queue bounds (transcript.queue_capacity, transcript.max_queue_bytes); only \
             requests that waited are observed",
            m.transcript_queue_wait_seconds.clone(),
        );
        r.register(
            "transcript_write_errors",
            "Transcript write or sync failures",
            m.transcript_write_errors.clone(),
        );
        m
    }
}

/// Encodes a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept status-200 handle and the `Family` lookup count into the same series.
    #[test]
    fn count_request_counts_the_labelled_series() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        let api = ApiSlot {
            slot: 0,
            label: "chat_completions",
        };
        m.count_request(api, 1, "main_loop", 200);
        m.count_request(api, 1, "main_loop", 200);
        m.count_request(api, 1, "main_loop", 500);
        let get = |status| {
            m.requests
                .get_or_create(&RequestLabels {
                    api: "chat_completions",
                    class: "main_loop",
                    status,
                })
                .get()
        };
        assert_eq!((get(200), get(500)), (2, 1));
        assert!(encode(&registry).contains("status=\"200\"} 2"));
    }
}
