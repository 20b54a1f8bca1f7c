//! `coordinator.toml`: what the server reads at start, with its defaults, and the errors of
//! starting it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// Address of the Prometheus endpoint (`/metrics`, and `/healthz`), plain HTTP. Default:
    /// none (no endpoint). Keep it on loopback or a monitoring network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

/// The server's bundle (from `coordinator pki init`) and the consortium CA.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates must chain to.
    pub client_ca: PathBuf,
    /// The CA's certificate revocation list (`crl.pem`, written by `coordinator pki init` and
    /// `pki revoke`); re-read when it changes. Default: none (nothing is revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
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
        crate::store::StoreError::Schema { .. } => "nothing in it was changed",
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
        if let Some(r) = &mut cfg.tls.crl {
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
                crl: Some(pki.join("crl.pem")),
            },
            limits: LimitsConfig::default(),
            metrics_listen: None,
        }
    }
}

/// Refuses to serve with an expired server certificate (every agent would drop the
/// handshake); warns when it expires soon.
pub(super) fn check_server_certificate(path: &Path) -> Result<(), ServeError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `deploy/coordinator.toml` parses as it is and with every commented option switched on,
    /// and names every field of the configuration.
    #[test]
    fn the_deploy_example_parses_and_documents_every_field() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let example =
            std::fs::read_to_string(root.join("deploy/coordinator.toml")).expect("example");
        let path = Path::new("/etc/fedtune/coordinator.toml");
        let cfg = ServerConfig::parse(&example, path).expect("as shipped");
        assert_eq!(cfg.tls.crl.as_deref(), Some(Path::new("/etc/fedtune/pki/crl.pem")));
        let on = shared::cli::options_on(&example);
        let all = ServerConfig::parse(&on, path).expect("every option on");
        assert!(all.metrics_listen.is_some());
        // Every field, as serde writes them.
        let written = toml::to_string(&all).expect("serializes");
        for line in written.lines() {
            if let Some((key, _)) = line.split_once(" = ") {
                assert!(
                    example.contains(&format!("\n{key} = "))
                        || example.contains(&format!("# {key} = ")),
                    "deploy/coordinator.toml does not document {key}"
                );
            }
        }
    }
}
