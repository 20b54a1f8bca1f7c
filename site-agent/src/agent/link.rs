//! `Link`: the agent's audited client of the coordinator's `SiteService`. Every request is
//! written to the audit log before it is sent; downloads resume from the last whole chunk of a
//! kept part and are checked against their sha256.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use proto::limits;
use proto::pb::{self, site_service_client::SiteServiceClient};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::audit::{self, AuditEntry, AuditLog};
use super::config::SiteConfig;
use super::faults;

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("connecting: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("download of {0} stopped on request")]
    Interrupted(String),
    #[error("model {sha256}: {message}")]
    Download { sha256: String, message: String },
    /// A download resumed from a kept part did not verify: the part was damaged.
    /// `Link::fetch_model` answers it by fetching again from the start.
    #[error("model {sha256}: resumed download {message}")]
    ResumedMismatch { sha256: String, message: String },
    /// The site's own certificate cannot be used (expired, not yet valid, unreadable).
    #[error("{0}")]
    Certificate(String),
}

impl CallError {
    /// Refusals the agent cannot fix by retrying: a revoked or unknown certificate.
    pub(super) fn is_fatal(&self) -> bool {
        matches!(self, CallError::Certificate(_))
            || matches!(self, CallError::Status(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
    }
}

/// Refuses to dial with an expired or not yet valid site certificate, saying what to do (the
/// coordinator would only drop the handshake); warns when it expires soon.
fn check_certificate(path: &Path) -> Result<(), CallError> {
    let renew = "make a new key and request where the agent runs (`site-agent init --name NAME \
                 --out DIR`), have the study lead sign it (`coordinator pki sign \
                 DIR/request.csr --site NAME --force`), put the cert.pem and ca.pem they send \
                 back in DIR and point [tls] bundle at it";
    match shared::cert::check_own(path, "site", renew) {
        Err(e) => Err(CallError::Certificate(e)),
        Ok(Some(days_left)) => {
            tracing::warn!(days_left, "the site certificate expires soon; {renew}");
            Ok(())
        }
        Ok(None) => Ok(()),
    }
}

/// Notes an answer from the coordinator (the `last_contact` metric) and passes it on.
fn contacted<T>(answer: T) -> T {
    super::metrics::get().contacted();
    answer
}

/// A connection to the coordinator whose every request is audited before it is sent.
#[derive(Clone, Debug)]
pub struct Link {
    client: SiteServiceClient<Channel>,
    audit: AuditLog,
}

const SVC: &str = "fedtune.v1.SiteService";

/// A request carrying the audit log's newest entry (`entry`) as metadata.
fn anchored<T>(m: T, entry: &AuditEntry) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    let meta = r.metadata_mut();
    // Digits and hex: always valid metadata values.
    if let (Ok(seq), Ok(head)) = (entry.seq.to_string().parse(), entry.hash.parse()) {
        meta.insert(proto::AUDIT_SEQ_HEADER, seq);
        meta.insert(proto::AUDIT_HEAD_HEADER, head);
    }
    r
}

impl Link {
    pub async fn connect(cfg: &SiteConfig, audit: AuditLog) -> Result<Self, CallError> {
        Ok(Self { client: Self::channel(cfg).await?, audit })
    }

    async fn channel(cfg: &SiteConfig) -> Result<SiteServiceClient<Channel>, CallError> {
        let bundle = &cfg.tls.bundle;
        check_certificate(&bundle.join("cert.pem"))?;
        let read = |f: &str| {
            let path = bundle.join(f);
            std::fs::read(&path).map_err(|source| CallError::Io { path, source })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
            .domain_name(cfg.coordinator.server_name.clone());
        let route = cfg.route().map_err(CallError::Certificate)?;
        let endpoint = Channel::from_shared(cfg.coordinator.address.clone())
            .map_err(|e| CallError::Download { sha256: String::new(), message: e.to_string() })?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = match route {
            super::proxy::Route::Direct => endpoint.connect().await?,
            proxy => endpoint.connect_with_connector(super::proxy::Connector(proxy)).await?,
        };
        Ok(SiteServiceClient::new(channel)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES))
    }

    fn audit<M: Message>(&self, rpc: &str, m: &M) -> Result<AuditEntry, CallError> {
        let bytes = m.encode_to_vec();
        super::metrics::get().sent(bytes.len() as u64);
        Ok(self.audit.record(&format!("{SVC}/{rpc}"), &bytes)?)
    }

    /// `m` audited, as a request that carries its own entry, the log's newest, for the
    /// coordinator to keep.
    fn audited<M: Message>(&self, rpc: &str, m: M) -> Result<tonic::Request<M>, CallError> {
        let entry = self.audit(rpc, &m)?;
        Ok(anchored(m, &entry))
    }

    /// The audit-log head the coordinator kept for this site. The request is empty and is not
    /// itself logged: `site-agent audit --verify` asks while a running agent holds the log.
    pub async fn audit_anchor(cfg: &SiteConfig) -> Result<pb::AuditAnchor, CallError> {
        let mut client = Self::channel(cfg).await?;
        Ok(client.get_audit_anchor(pb::AuditAnchorRequest {}).await?.into_inner())
    }

    /// The coordinator's clock and how it sees this site (`site-agent doctor`); not audited,
    /// like [`Self::audit_anchor`]: the request is empty.
    pub async fn ping(cfg: &SiteConfig) -> Result<pb::PingResponse, CallError> {
        let mut client = Self::channel(cfg).await?;
        Ok(client.ping(pb::PingRequest {}).await?.into_inner())
    }

    pub async fn hello(&mut self, req: pb::HelloRequest) -> Result<pb::HelloResponse, CallError> {
        let req = self.audited("Hello", req)?;
        Ok(contacted(self.client.hello(req).await?.into_inner()))
    }

    pub async fn next_task(&mut self, wait_seconds: u32) -> Result<Option<pb::Task>, CallError> {
        let req = pb::NextTaskRequest { wait_seconds };
        let mut r = self.audited("NextTask", req)?;
        r.set_timeout(Duration::from_secs(u64::from(wait_seconds) + 30));
        Ok(contacted(self.client.next_task(r).await?.into_inner()).task)
    }

    pub async fn heartbeat(
        &mut self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, CallError> {
        let req = self.audited("Heartbeat", req)?;
        Ok(contacted(self.client.heartbeat(req).await?.into_inner()))
    }

    pub async fn submit(&mut self, req: pb::SubmitResultRequest) -> Result<bool, CallError> {
        let req = self.audited("SubmitResult", req)?;
        faults::pause_at("submit");
        Ok(contacted(self.client.submit_result(req).await?.into_inner()).recorded)
    }

    /// Uploads the weights a task made (a source's Model_S, a tail), each message audited
    /// before it is sent. The file is read twice, 1 MiB at a time (its sha256, then the
    /// chunks, at most two ahead of the network), never whole. Safe to repeat: the
    /// coordinator accepts the same bytes again.
    pub async fn upload_model(
        &mut self,
        task_id: &str,
        attempt: u32,
        arm: u32,
        path: &Path,
    ) -> Result<pb::ModelInfo, CallError> {
        let io = |source| CallError::Io { path: path.to_owned(), source };
        let file = path.to_owned();
        let (sha256, size) =
            tokio::task::spawn_blocking(move || shared::weights::sha256_file(&file))
                .await
                .map_err(|e| io(std::io::Error::other(e)))?
                .map_err(io)?;
        let header = pb::UploadModelRequest {
            part: Some(pb::upload_model_request::Part::Header(pb::UploadHeader {
                task_id: task_id.into(),
                attempt,
                model: Some(pb::ModelRef { sha256: sha256.clone(), size, name: String::new() }),
                arm,
            })),
        };
        // The request carries the header's entry, the log's newest when the call starts.
        let entry = self.audit("UploadModel", &header)?;
        let pieces = shared::weights::Pieces::open(path, limits::CHUNK_BYTES).map_err(io)?;
        tracing::info!(task = task_id, arm, sha256 = %sha256, bytes = size, "uploading trained weights (policy share_weights = true)");
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (audit_log, file) = (self.audit.clone(), path.to_owned());
        let reader = tokio::task::spawn_blocking(move || -> Result<(), CallError> {
            if tx.blocking_send(header).is_err() {
                return Ok(());
            }
            for piece in pieces {
                let piece = piece.map_err(|source| CallError::Io { path: file.clone(), source })?;
                let m = pb::UploadModelRequest {
                    part: Some(pb::upload_model_request::Part::Chunk(piece)),
                };
                let bytes = m.encode_to_vec();
                super::metrics::get().sent(bytes.len() as u64);
                audit_log.record(&format!("{SVC}/UploadModel"), &bytes)?;
                if tx.blocking_send(m).is_err() {
                    break; // the call ended; its answer says why
                }
            }
            Ok(())
        });
        let req = anchored(tokio_stream::wrappers::ReceiverStream::new(rx), &entry);
        let answer = self.client.upload_model(req).await;
        // A file that could not be read (or logged) ends the stream early: that is the error.
        reader.await.map_err(|e| io(std::io::Error::other(e)))??;
        Ok(answer?.into_inner())
    }

    /// Downloads a model into `dir/<sha256>`, resuming from `dir/<sha256>.part`, and verifies
    /// its hash. A resumed download that does not verify (the kept part was damaged) is
    /// discarded and fetched again from the start, once. `stop_after` cuts the download after
    /// that many bytes of this call (tests use it to simulate a broken connection). Returns the
    /// file and the bytes received.
    pub async fn fetch_model(
        &mut self,
        model: &pb::ModelRef,
        dir: &Path,
        stop_after: Option<u64>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(PathBuf, u64), CallError> {
        match self.fetch_once(model, dir, stop_after, progress).await {
            Err(e @ CallError::ResumedMismatch { .. }) => {
                tracing::warn!(error = %e, "fetching the model again from the start");
                self.fetch_once(model, dir, stop_after, progress).await
            }
            other => other,
        }
    }

    async fn fetch_once(
        &mut self,
        model: &pb::ModelRef,
        dir: &Path,
        stop_after: Option<u64>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(PathBuf, u64), CallError> {
        let sha = model.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CallError::Download { sha256: sha, message: "not a sha256".into() });
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CallError::Io { path, source }
        };
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        let done = dir.join(&sha);
        if done.exists() {
            if super::cache::verify(&done, &sha).await.map_err(io(&done))? {
                return Ok((done, 0));
            }
            tracing::warn!(path = %done.display(), "cached model does not match its hash; fetching again");
            tokio::fs::remove_file(&done).await.map_err(io(&done))?;
        }
        let part = dir.join(format!("{sha}.part"));
        // Resume: the part file holds whole chunks received in order; hash what is there,
        // reading it a piece at a time.
        let (hasher, have) = {
            let p = part.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<(Sha256, u64)> {
                let mut h = Sha256::new();
                let n = match std::fs::File::open(&p) {
                    Ok(mut f) => std::io::copy(&mut f, &mut h)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                    Err(e) => return Err(e),
                };
                Ok((h, n))
            })
            .await
            .map_err(|e| CallError::Io { path: part.clone(), source: std::io::Error::other(e) })?
            .map_err(io(&part))?
        };
        let mut hasher = hasher;
        let mut offset = have;
        if offset > model.size {
            offset = 0;
            hasher = Sha256::new();
            let _ = tokio::fs::remove_file(&part).await;
        }
        if offset > 0 {
            tracing::info!(sha256 = %sha, offset, "resuming download");
        }
        let resumed_from = offset;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await
            .map_err(io(&part))?;
        let req = pb::FetchModelRequest { sha256: sha.clone(), offset };
        let req = self.audited("FetchModel", req)?;
        let mut stream = self.client.fetch_model(req).await?.into_inner();
        let mut received = 0u64;
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != offset || chunk.total_size != model.size {
                return Err(CallError::Download {
                    sha256: sha,
                    message: format!(
                        "chunk at {} (size {}), expected {offset} (size {})",
                        chunk.offset, chunk.total_size, model.size
                    ),
                });
            }
            file.write_all(&chunk.data).await.map_err(io(&part))?;
            file.flush().await.map_err(io(&part))?;
            faults::pause_at("download");
            hasher.update(&chunk.data);
            offset += chunk.data.len() as u64;
            super::metrics::get().received(chunk.data.len() as u64);
            received += chunk.data.len() as u64;
            progress(offset, model.size);
            if stop_after.is_some_and(|n| received >= n) && offset < model.size {
                return Err(CallError::Interrupted(sha));
            }
        }
        file.sync_all().await.map_err(io(&part))?;
        let got = hex::encode(hasher.finalize());
        if offset != model.size || got != sha {
            let _ = tokio::fs::remove_file(&part).await;
            let message =
                format!("received {offset} of {} bytes with sha256 {got}; discarded", model.size);
            return Err(if resumed_from > 0 {
                CallError::ResumedMismatch { sha256: sha, message }
            } else {
                CallError::Download { sha256: sha, message }
            });
        }
        tokio::fs::rename(&part, &done).await.map_err(io(&done))?;
        // Hashed on the way in: the next task that uses it need not hash it again.
        super::cache::note_verified(&done, &sha);
        Ok((done, received))
    }
}
