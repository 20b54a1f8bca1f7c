//! The coordinator's Prometheus metrics (prometheus-client, one registry per server) and the
//! opt-in HTTP listener (`metrics_listen`) that serves them as text on `/metrics`, with
//! `/healthz` answering 503 once the database has stopped.
//!
//! Counters are kept as things happen (RPCs by method and code with their latency, refused
//! handshakes by reason, weights bytes served and received, leases expired); the state gauges
//! (sites, tasks and rounds by state) are read from the store at each scrape.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

/// The coordinator's metrics.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    rpcs: Family<Rpc, Counter>,
    rpc_seconds: Family<Method, Histogram>,
    refused: Family<Reason, Counter>,
    bytes_served: Counter,
    bytes_received: Counter,
    leases_expired: Counter,
    sites: Family<State, Gauge>,
    sites_connected: Gauge,
    tasks: Family<State, Gauge>,
    rounds: Family<State, Gauge>,
    store_up: Gauge,
    /// Set once a write failed and the database stopped (sled keeps the error).
    stopped: AtomicBool,
    /// Set when a call was answered UNAVAILABLE or RESOURCE_EXHAUSTED: the ticker then checks
    /// the database with a write.
    suspect: AtomicBool,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("fedtune_coordinator");
        let m = Self {
            rpcs: Family::default(),
            rpc_seconds: Family::new_with_constructor(
                (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
            ),
            refused: Family::default(),
            bytes_served: Counter::default(),
            bytes_received: Counter::default(),
            leases_expired: Counter::default(),
            sites: Family::default(),
            sites_connected: Gauge::default(),
            tasks: Family::default(),
            rounds: Family::default(),
            store_up: Gauge::default(),
            stopped: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            registry: Registry::default(),
        };
        r.register("rpcs", "RPCs answered, by method and gRPC status code", m.rpcs.clone());
        r.register(
            "rpc_seconds",
            "Time from request to response headers, by method",
            m.rpc_seconds.clone(),
        );
        r.register(
            "handshakes_refused",
            "TLS connections refused, by reason (certificate checks, handshake timeout, caps)",
            m.refused.clone(),
        );
        r.register("weights_bytes_served", "Weights bytes sent to agents", m.bytes_served.clone());
        r.register(
            "weights_bytes_received",
            "Weights bytes received from agents and admins",
            m.bytes_received.clone(),
        );
        r.register("leases_expired", "Task leases that expired", m.leases_expired.clone());
        r.register("sites", "Sites by state (approved, pending, revoked)", m.sites.clone());
        r.register(
            "sites_connected",
            "Sites that called within the last minute",
            m.sites_connected.clone(),
        );
        r.register("tasks", "Tasks by state", m.tasks.clone());
        r.register("rounds", "Rounds by state", m.rounds.clone());
        r.register(
            "store_up",
            "1 while the database accepts writes, 0 once a write failed and it stopped",
            m.store_up.clone(),
        );
        Self { registry: r, ..m }
    }
}

impl ServerMetrics {
    pub fn rpc(&self, method: &str, code: &str, started: Instant) {
        self.rpcs.get_or_create(&Rpc { method: method.into(), code: code.into() }).inc();
        self.rpc_seconds
            .get_or_create(&Method { method: method.into() })
            .observe(started.elapsed().as_secs_f64());
    }
    pub fn handshake_refused(&self, reason: &str) {
        self.refused.get_or_create(&Reason { reason: reason.into() }).inc();
    }
    pub fn served(&self, bytes: u64) {
        self.bytes_served.inc_by(bytes);
    }
    pub fn received(&self, bytes: u64) {
        self.bytes_received.inc_by(bytes);
    }
    pub fn lease_expired(&self) {
        self.leases_expired.inc();
    }
    /// Marks the database stopped: health says NOT_SERVING from now on.
    pub fn store_stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
    /// Whether a call since the last look was refused in a way a stopped database answers.
    pub fn take_suspect(&self) -> bool {
        self.suspect.swap(false, Ordering::Relaxed)
    }

    /// Sets the state gauges: counts by state name.
    pub fn set_states(
        &self,
        sites: &[(&str, i64)],
        connected: i64,
        tasks: &[(&str, i64)],
        rounds: &[(&str, i64)],
    ) {
        for (family, counts) in [(&self.sites, sites), (&self.tasks, tasks), (&self.rounds, rounds)]
        {
            for (state, n) in counts {
                family.get_or_create(&State { state: (*state).into() }).set(*n);
            }
        }
        self.sites_connected.set(connected);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.store_up.set(i64::from(!self.is_stopped()));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics` (what `render` returns) and `/healthz` (200, or 503 once `healthy` says
/// no) on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = healthy();
                async move {
                    if ok {
                        (StatusCode::OK, "serving\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not serving: the database stopped\n")
                    }
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// A tower layer counting every RPC by method and gRPC status, with its latency to the
/// response headers. A status sent in the headers (every error a handler or interceptor
/// returns) is counted as such; a response whose status comes in trailers (a successful call,
/// or a stream that fails later) counts as `OK` here.
#[derive(Clone, Debug)]
pub struct CountCalls<S> {
    pub inner: S,
    pub metrics: Arc<ServerMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for CountCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().trim_start_matches('/').to_owned();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => Some(
                    r.headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                ),
                Err(_) => None,
            };
            if matches!(code, Some(tonic::Code::Unavailable | tonic::Code::ResourceExhausted)) {
                metrics.suspect.store(true, Ordering::Relaxed);
            }
            let label = match code {
                Some(tonic::Code::Ok) => "OK".to_owned(),
                Some(c) => format!("{c:?}"),
                None => "transport".to_owned(),
            };
            metrics.rpc(&method, &label, started);
            res
        })
    }
}
