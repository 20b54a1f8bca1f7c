//! The agent's Prometheus metrics, served as text on `/metrics` when `[agent]
//! metrics_listen` is set: what it is doing (`task_phase`), how fast it trains (step time,
//! images per second), what it moved (bytes sent: every audited message and upload; bytes
//! received: weights) and when it last reached the coordinator.
//!
//! One agent per process, so the metrics are process-wide ([`get`]).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Label {
    value: String,
}

/// The phases `task_phase` reports; one is 1 at a time.
pub const PHASES: [&str; 6] = ["idle", "download", "cache", "train", "evaluate", "submit"];

#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    phase: Family<Label, Gauge>,
    tasks: Family<Label, Counter>,
    step_seconds: Histogram,
    images_per_second: Gauge<f64, std::sync::atomic::AtomicU64>,
    bytes_sent: Counter,
    bytes_received: Counter,
    last_contact: Gauge,
}

/// The process's metrics.
pub fn get() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(AgentMetrics::new)
}

impl AgentMetrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("fedtune_agent");
        let m = Self {
            registry: Registry::default(),
            phase: Family::default(),
            tasks: Family::default(),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            images_per_second: Gauge::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            last_contact: Gauge::default(),
        };
        r.register(
            "task_phase",
            "1 for what the agent is doing now (value label)",
            m.phase.clone(),
        );
        r.register("tasks", "Tasks ended, by outcome (value label)", m.tasks.clone());
        r.register("train_step_seconds", "Time per training step", m.step_seconds.clone());
        r.register(
            "train_images_per_second",
            "Training throughput of the last step (slices per second)",
            m.images_per_second.clone(),
        );
        r.register(
            "bytes_sent",
            "Bytes of messages and weights sent to the coordinator",
            m.bytes_sent.clone(),
        );
        r.register(
            "bytes_received",
            "Weights bytes received from the coordinator",
            m.bytes_received.clone(),
        );
        r.register(
            "last_contact_timestamp_seconds",
            "Unix time of the last answer from the coordinator",
            m.last_contact.clone(),
        );
        m.set_phase("idle");
        Self { registry: r, ..m }
    }

    pub fn set_phase(&self, phase: &str) {
        for p in PHASES {
            self.phase.get_or_create(&Label { value: p.into() }).set(i64::from(p == phase));
        }
    }
    pub fn task_ended(&self, outcome: &str) {
        self.tasks.get_or_create(&Label { value: outcome.into() }).inc();
    }
    /// One training step of `images` slices took `seconds`.
    pub fn step(&self, seconds: f64, images: usize) {
        self.step_seconds.observe(seconds);
        if seconds > 0.0 {
            self.images_per_second.set(images as f64 / seconds);
        }
    }
    pub fn sent(&self, bytes: u64) {
        self.bytes_sent.inc_by(bytes);
    }
    pub fn received(&self, bytes: u64) {
        self.bytes_received.inc_by(bytes);
    }
    pub fn contacted(&self) {
        self.last_contact.set(shared::cert::now_unix());
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` on `addr` until the process ends; returns the bound address.
pub async fn serve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                get().render(),
            )
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}
