//! `coordinator serve`: the configuration file, TLS, the two services with their
//! authenticating interceptors, health checking, reflection and the lease ticker.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::limits;
use proto::pb::{admin_service_server::AdminServiceServer, site_service_server::SiteServiceServer};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::identity::Role;
use crate::service::{AdminApi, Coordinator, Limits, SiteApi};
use crate::store::Store;

mod calls;
mod config;
pub mod listener;
pub mod ratelimit;
pub mod tls;

use crate::metrics::{self, ServerMetrics};
use config::check_server_certificate;
pub use config::{LimitsConfig, ServeError, ServerConfig, TlsFiles};

/// Serves on `listener` until `shutdown` resolves, then drains open calls.
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_then(cfg, listener, shutdown, |_, _| {}).await
}

/// [`serve`], calling `ready` with the bound address (and the metrics endpoint's, where there
/// is one) once the database, the blob store and the certificates have been opened and
/// checked, just before the first connection is accepted: a process that announces it is
/// listening from `ready` never announces and then fails on its data dir.
pub async fn serve_then(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr, Option<std::net::SocketAddr>),
) -> Result<(), ServeError> {
    let db_path = cfg.data_dir.join("db");
    let blobs = cfg.data_dir.join("blobs");
    std::fs::create_dir_all(&blobs)
        .map_err(|source| ServeError::Io { path: blobs.clone(), source })?;
    let store = Store::open(&db_path)
        .map_err(|error| ServeError::Store { path: db_path.clone(), error })?;
    let l = &cfg.limits;
    let metrics = Arc::new(ServerMetrics::default());
    let coord = Coordinator::new(
        store,
        blobs,
        Limits {
            lease_seconds: l.lease_seconds,
            max_poll_seconds: l.max_poll_seconds,
            round_deadline_seconds: l.round_deadline_seconds,
            max_attempts: l.max_attempts,
            idle_seconds: l.idle_seconds,
        },
        cfg.tls.crl.clone(),
        metrics.clone(),
    );

    check_server_certificate(&cfg.tls.cert)?;
    let tls = tls::server_config(
        &tls::TlsPaths {
            cert: cfg.tls.cert.clone(),
            key: cfg.tls.key.clone(),
            client_ca: cfg.tls.client_ca.clone(),
            crl: cfg.tls.crl.clone(),
        },
        metrics.clone(),
    )
    .map_err(ServeError::Tls)?;

    let (reporter, health) = tonic_health::server::health_reporter();
    for name in SERVICES {
        reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let metrics_server = match &cfg.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Io {
                path: format!("metrics_listen {addr}").into(),
                source,
            })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServeError::Io { path: addr.into(), source })?;
            tracing::info!(%bound, "metrics on http://{bound}/metrics");
            let (c, m) = (coord.clone(), metrics.clone());
            let mut stop = stop_rx.clone();
            Some((
                bound,
                tokio::spawn(metrics::serve_http(
                    listener,
                    Arc::new(move || c.metrics_text()),
                    Arc::new(move || !m.is_stopped()),
                    async move {
                        let _ = stop.changed().await;
                    },
                )),
            ))
        }
        None => None,
    };
    // Reflection in both versions: grpcurl speaks v1, Python's grpcio-reflection v1alpha.
    let reflector = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection =
        reflector().build_v1().map_err(|e| ServeError::Tls(format!("reflection: {e}")))?;
    let reflection_v1alpha =
        reflector().build_v1alpha().map_err(|e| ServeError::Tls(format!("reflection: {e}")))?;

    let site = SiteServiceServer::new(SiteApi(coord.clone()))
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
    let admin = AdminServiceServer::new(AdminApi(coord.clone()))
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
    let limiter = Arc::new(ratelimit::RateLimiter::new(
        cfg.limits.requests_per_second,
        cfg.limits.request_burst,
    ));
    let site = InterceptedService::new(
        site,
        calls::authenticator(coord.clone(), Role::Site, limiter.clone()),
    );
    let admin =
        InterceptedService::new(admin, calls::authenticator(coord.clone(), Role::Admin, limiter));

    // The lease ticker: expires leases and applies round deadlines; health follows the
    // database (NOT_SERVING once a write failed and it stopped).
    let ticker = {
        let coord = coord.clone();
        let metrics = metrics.clone();
        let every = Duration::from_millis(cfg.limits.tick_ms);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            let mut serving = true;
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Err(e) = coord.tick().await {
                            tracing::error!(error = %e, "lease ticker");
                        }
                        if serving && metrics.take_suspect() {
                            coord.probe_store().await;
                        }
                        if serving && metrics.is_stopped() {
                            serving = false;
                            for name in SERVICES.into_iter().chain([""]) {
                                reporter.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
                            }
                        }
                    }
                    _ = stop_rx.changed() => return,
                }
            }
        })
    };

    let addr = listener
        .local_addr()
        .map_err(|source| ServeError::Io { path: cfg.listen.clone().into(), source })?;
    ready(addr, metrics_server.as_ref().map(|m| m.0));
    let incoming = listener::incoming(
        listener,
        tls,
        metrics.clone(),
        listener::ConnectionLimits {
            handshake: Duration::from_secs(u64::from(l.handshake_seconds)),
            max_connections: l.max_connections as usize,
            per_identity: l.max_connections_per_identity as usize,
        },
    );
    let keepalive = Duration::from_secs(u64::from(l.keepalive_seconds));
    let call_limit = Duration::from_secs(u64::from(l.max_poll_seconds) + u64::from(l.idle_seconds));
    let result = Server::builder()
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive.min(Duration::from_secs(20))))
        .concurrency_limit_per_connection(64)
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(tower::layer::layer_fn(move |inner| calls::CallDeadline {
            inner,
            limit: call_limit,
        }))
        .layer(tower::layer::layer_fn(move |inner| metrics::CountCalls {
            inner,
            metrics: metrics.clone(),
        }))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(site)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    if let Some((_, task)) = metrics_server {
        let _ = task.await;
    }
    result?;
    Ok(())
}

/// The services whose health is reported.
const SERVICES: [&str; 2] = ["fedtune.v1.SiteService", "fedtune.v1.AdminService"];

/// HTTP/2 streams one connection may have open at once: an agent uses one or two, the study
/// lead's CLI a few.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
