//! `coordinator serve`: the configuration file, TLS, the two services with their
//! authenticating interceptors, health checking, reflection and the lease ticker.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::limits;
use proto::pb::{admin_service_server::AdminServiceServer, site_service_server::SiteServiceServer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::{Request, Status};

use crate::identity::Role;
use crate::service::{AdminApi, Coordinator, Limits, SiteApi};
use crate::store::Store;

/// `coordinator.toml`. Relative paths are resolved against the file's folder.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Format version; 1.
    pub version: u32,
    /// Address to listen on. Default `127.0.0.1:7443`; use `0.0.0.0:7443` to accept agents
    /// from other machines.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Folder for the database (`db/`) and model blobs (`blobs/`). Default `coordinator-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// The server's bundle (from `coordinator pki init`) and the consortium CA.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates must chain to.
    pub client_ca: PathBuf,
    /// `revoked.txt` written by `coordinator pki revoke`; re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_list: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// A task's lease, renewed by each heartbeat. Default 120 s.
    pub lease_seconds: u32,
    /// Longest a `NextTask` long poll waits. Default 30 s.
    pub max_poll_seconds: u32,
    /// A round's deadline unless `round start --deadline-seconds` says otherwise. Default 1 day.
    pub round_deadline_seconds: u32,
    /// Leases per task before it fails, unless the round says otherwise. Default 3.
    pub max_attempts: u32,
    /// How often leases and deadlines are checked. Default 1000 ms.
    pub tick_ms: u64,
    /// Requests per second each identity (site or admin certificate) may make, sustained.
    /// Default 50.
    pub requests_per_second: u32,
    /// Requests an identity may make at once before the sustained rate applies. Default 200.
    pub request_burst: u32,
    /// Longest a TLS handshake may take; a client that does not finish it is disconnected.
    /// Default 10 s.
    pub handshake_seconds: u32,
    /// Most connections open at once (handshaking or established); more are closed at once.
    /// Default 256.
    pub max_connections: u32,
    /// Most connections one client certificate may have open at once. Default 16.
    pub max_connections_per_identity: u32,
    /// Longest an upload may go without a chunk, and a download or watch without the client
    /// taking the next message; also bounds every other call to `max_poll_seconds` plus this.
    /// Default 60 s.
    pub idle_seconds: u32,
    /// HTTP/2 pings on an idle connection this often; a peer that does not answer within the
    /// same time (at most 20 s) is disconnected. Default 30 s.
    pub keepalive_seconds: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            lease_seconds: 120,
            max_poll_seconds: 30,
            round_deadline_seconds: 86_400,
            max_attempts: 3,
            tick_ms: 1000,
            requests_per_second: 50,
            request_burst: 200,
            handshake_seconds: 10,
            max_connections: 256,
            max_connections_per_identity: 16,
            idle_seconds: 60,
            keepalive_seconds: 30,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:7443".into()
}

fn default_data_dir() -> PathBuf {
    "coordinator-data".into()
}

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("opening the database in {path}: {error}; {}", store_hint(error))]
    Store { path: PathBuf, error: crate::store::StoreError },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What to do about a database that does not open.
fn store_hint(e: &crate::store::StoreError) -> &'static str {
    use std::io::ErrorKind;
    match e {
        crate::store::StoreError::Sled(sled::Error::Io(io)) => match io.kind() {
            ErrorKind::ReadOnlyFilesystem => {
                "its file system is read-only: remount it read-write or set data_dir elsewhere"
            }
            ErrorKind::PermissionDenied => {
                "this user may not write there: fix the folder's owner or set data_dir elsewhere"
            }
            ErrorKind::StorageFull => "its disk is full: free space, then start again",
            _ => "is another coordinator using this data_dir?",
        },
        crate::store::StoreError::Sled(sled::Error::Corruption { .. }) => {
            "the database is damaged: restore the data_dir from a backup"
        }
        _ => "is another coordinator using this data_dir?",
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ServeError::Io { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ServeError> {
        let err = |message: String| ServeError::Config { path: path.to_owned(), message };
        let mut cfg: Self = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if cfg.version != 1 {
            return Err(err(format!(
                "version = {}; this coordinator reads version 1",
                cfg.version
            )));
        }
        let l = &cfg.limits;
        if l.lease_seconds < 2
            || l.tick_ms == 0
            || [
                l.max_poll_seconds,
                l.max_attempts,
                l.requests_per_second,
                l.request_burst,
                l.handshake_seconds,
                l.max_connections,
                l.max_connections_per_identity,
                l.idle_seconds,
                l.keepalive_seconds,
            ]
            .contains(&0)
        {
            return Err(err("limits: lease_seconds must be at least 2 and every other limit at \
                 least 1"
                .into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.data_dir);
        resolve(&mut cfg.tls.cert);
        resolve(&mut cfg.tls.key);
        resolve(&mut cfg.tls.client_ca);
        if let Some(r) = &mut cfg.tls.revocation_list {
            resolve(r);
        }
        Ok(cfg)
    }

    /// A configuration for the files `coordinator pki init --dir PKI` wrote.
    pub fn for_pki(pki: &Path, data_dir: &Path, listen: &str) -> Self {
        Self {
            version: 1,
            listen: listen.into(),
            data_dir: data_dir.into(),
            tls: TlsFiles {
                cert: pki.join("server/cert.pem"),
                key: pki.join("server/key.pem"),
                client_ca: pki.join("ca.pem"),
                revocation_list: Some(pki.join("revoked.txt")),
            },
            limits: LimitsConfig::default(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|source| ServeError::Io { path: path.to_owned(), source })
}

/// Refuses to serve with an expired server certificate (every agent would drop the
/// handshake); warns when it expires soon.
fn check_server_certificate(path: &Path) -> Result<(), ServeError> {
    let fix = "put a new certificate signed by the consortium CA (and its key) in [tls] cert \
               and key, and restart";
    if let Some(days_left) =
        shared::cert::check_own(path, "server", fix).map_err(ServeError::Tls)?
    {
        tracing::warn!(
            days_left,
            "the server certificate expires soon; site agents will refuse it after that"
        );
    }
    Ok(())
}

/// Serves on `listener` until `shutdown` resolves, then drains open calls.
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_then(cfg, listener, shutdown, |_| {}).await
}

/// [`serve`], calling `ready` with the bound address once the database, the blob store and
/// the certificates have been opened and checked, just before the first connection is
/// accepted: a process that announces it is listening from `ready` never announces and then
/// fails on its data dir.
pub async fn serve_then(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    let db_path = cfg.data_dir.join("db");
    let blobs = cfg.data_dir.join("blobs");
    std::fs::create_dir_all(&blobs)
        .map_err(|source| ServeError::Io { path: blobs.clone(), source })?;
    let store = Store::open(&db_path)
        .map_err(|error| ServeError::Store { path: db_path.clone(), error })?;
    let l = &cfg.limits;
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
        cfg.tls.revocation_list.clone(),
    );

    check_server_certificate(&cfg.tls.cert)?;
    let tls = crate::listener::server_config(
        &read(&cfg.tls.cert)?,
        &read(&cfg.tls.key)?,
        &read(&cfg.tls.client_ca)?,
    )
    .map_err(|e| {
        ServeError::Tls(format!(
            "{e} (files: {}, {}, {})",
            cfg.tls.cert.display(),
            cfg.tls.key.display(),
            cfg.tls.client_ca.display()
        ))
    })?;

    let (reporter, health) = tonic_health::server::health_reporter();
    for name in ["fedtune.v1.SiteService", "fedtune.v1.AdminService"] {
        reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
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
    let limiter = Arc::new(crate::ratelimit::RateLimiter::new(
        cfg.limits.requests_per_second,
        cfg.limits.request_burst,
    ));
    let site =
        InterceptedService::new(site, authenticator(coord.clone(), Role::Site, limiter.clone()));
    let admin = InterceptedService::new(admin, authenticator(coord.clone(), Role::Admin, limiter));

    // The lease ticker: expires leases and applies round deadlines.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let ticker = {
        let coord = coord.clone();
        let every = Duration::from_millis(cfg.limits.tick_ms);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Err(e) = coord.tick().await {
                            tracing::error!(error = %e, "lease ticker");
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
    ready(addr);
    let incoming = crate::listener::incoming(
        listener,
        tls,
        crate::listener::ConnectionLimits {
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
        .layer(tower::layer::layer_fn(move |inner| CallDeadline { inner, limit: call_limit }))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(site)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    result?;
    Ok(())
}

/// HTTP/2 streams one connection may have open at once: an agent uses one or two, the study
/// lead's CLI a few.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Bounds every call whose request is a single message to `limit` (the longest long poll
/// plus the idle limit), answering `DEADLINE_EXCEEDED` past it: a client that sends headers
/// and never the body holds nothing for longer. Uploads are streams of any length on links
/// of any speed; they are bounded instead by the idle limit between chunks, in the handler.
#[derive(Clone, Debug)]
struct CallDeadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B, R> tower::Service<http::Request<B>> for CallDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if proto::CLIENT_STREAMING_METHODS.contains(&req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let path = req.uri().path().to_owned();
        let call = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    tracing::warn!(call = %path, seconds = limit.as_secs(), "call took too long; ended");
                    Ok(Status::deadline_exceeded(format!(
                        "the call took longer than {} s and was ended; retry",
                        limit.as_secs()
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// The interceptor of one service: reads the identity from the client certificate, checks
/// revocation and role, applies the identity's rate limit, and hands the identity to the
/// handler.
fn authenticator(
    coord: Arc<Coordinator>,
    role: Role,
    limiter: Arc<crate::ratelimit::RateLimiter>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let id = coord.authenticate(&req, role).map_err(Status::from)?;
        if !limiter.allow(&id.key()) {
            tracing::warn!(role = id.role.as_str(), name = %id.name, "rate limit reached");
            return Err(Status::resource_exhausted(format!(
                "{} \"{}\" made more than {} requests at once ({} per second sustained); \
                 slow down and retry",
                id.role.as_str(),
                id.name,
                limiter.burst(),
                limiter.per_second()
            )));
        }
        req.extensions_mut().insert(id);
        Ok(req)
    }
}
