//! `coordinator serve`: the configuration file, TLS, the two services with their
//! authenticating interceptors, health checking, reflection and the lease ticker.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::limits;
use proto::pb::{admin_service_server::AdminServiceServer, site_service_server::SiteServiceServer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::identity::Role;
use crate::service::{AdminApi, Coordinator, Limits, SiteApi};
use crate::store::Store;

/// `coordinator.toml`. Relative paths are resolved against the file's folder.
#[derive(Clone, Debug, Deserialize)]
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
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates must chain to.
    pub client_ca: PathBuf,
    /// `revoked.txt` written by `coordinator pki revoke`; re-read when it changes.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
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
    #[error(
        "opening the database in {path}: {source}; is another coordinator using this data_dir?"
    )]
    Store { path: PathBuf, source: crate::store::StoreError },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
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
        if l.lease_seconds < 2 || l.max_poll_seconds == 0 || l.max_attempts == 0 || l.tick_ms == 0 {
            return Err(err(
                "limits: lease_seconds >= 2, max_poll_seconds, max_attempts and tick_ms >= 1"
                    .into(),
            ));
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
    let db_path = cfg.data_dir.join("db");
    let blobs = cfg.data_dir.join("blobs");
    std::fs::create_dir_all(&blobs)
        .map_err(|source| ServeError::Io { path: blobs.clone(), source })?;
    let store = Store::open(&db_path)
        .map_err(|source| ServeError::Store { path: db_path.clone(), source })?;
    let l = &cfg.limits;
    let coord = Coordinator::new(
        store,
        blobs,
        Limits {
            lease_seconds: l.lease_seconds,
            max_poll_seconds: l.max_poll_seconds,
            round_deadline_seconds: l.round_deadline_seconds,
            max_attempts: l.max_attempts,
        },
        cfg.tls.revocation_list.clone(),
    );

    check_server_certificate(&cfg.tls.cert)?;
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(read(&cfg.tls.cert)?, read(&cfg.tls.key)?))
        .client_ca_root(Certificate::from_pem(read(&cfg.tls.client_ca)?));

    let (reporter, health) = tonic_health::server::health_reporter();
    for name in ["fedtune.v1.SiteService", "fedtune.v1.AdminService"] {
        reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Tls(format!("reflection: {e}")))?;

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

    let result = Server::builder()
        .tls_config(tls)?
        .timeout(Duration::from_secs(u64::from(cfg.limits.max_poll_seconds) + 30))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .concurrency_limit_per_connection(64)
        .add_service(health)
        .add_service(reflection)
        .add_service(site)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    result?;
    Ok(())
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
        if !limiter.allow(&format!("{}/{}", id.role.as_str(), id.name)) {
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
