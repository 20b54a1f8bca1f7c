//! The study lead's connection to the coordinator: the admin channel over mutual TLS, and
//! [`AdminClient`], one typed method per admin call, whose errors keep the gRPC status
//! ([`super::CallFailed`]) for scripts and tests.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::limits;
use proto::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{Conn, status};

/// Connects to the coordinator with an admin bundle.
pub async fn connect(conn: &Conn) -> Result<AdminServiceClient<Channel>> {
    let read = |f: &str| {
        let p = conn.bundle.join(f);
        std::fs::read(&p).with_context(|| format!("reading {} of the admin bundle", p.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
        .domain_name(conn.server_name.clone());
    let channel = Channel::from_shared(conn.coordinator.clone())
        .with_context(|| format!("coordinator address {}", conn.coordinator))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", conn.coordinator))?;
    Ok(AdminServiceClient::new(channel)
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_MESSAGE_BYTES))
}

/// Uploads a weights file with a progress bar; returns what the coordinator stored. The file
/// is read twice, 1 MiB at a time: once for its sha256 (the header names it), once as the
/// chunks are sent, at most two chunks ahead of the network.
pub async fn push_model(
    client: &mut AdminServiceClient<Channel>,
    file: &Path,
    name: &str,
    progress: bool,
) -> Result<pb::ModelInfo> {
    let path = file.to_owned();
    let (sha256, size) = tokio::task::spawn_blocking(move || shared::weights::sha256_file(&path))
        .await?
        .with_context(|| format!("reading {}", file.display()))?;
    let bar =
        if progress { indicatif::ProgressBar::new(size) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template"),
    );
    bar.set_message(format!("uploading {name}"));
    let header = pb::PushModelRequest {
        part: Some(pb::push_model_request::Part::Header(pb::ModelRef {
            sha256,
            size,
            name: name.into(),
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let pieces = shared::weights::Pieces::open(file, limits::CHUNK_BYTES)
        .with_context(|| format!("reading {}", file.display()))?;
    let (b, path) = (bar.clone(), file.to_owned());
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        if tx.blocking_send(header).is_err() {
            return Ok(()); // the call ended first; its error says why
        }
        for piece in pieces {
            let piece = piece.with_context(|| format!("reading {}", path.display()))?;
            b.inc(piece.len() as u64);
            let chunk =
                pb::PushModelRequest { part: Some(pb::push_model_request::Part::Chunk(piece)) };
            if tx.blocking_send(chunk).is_err() {
                break;
            }
        }
        Ok(())
    });
    let answer = client.push_model(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    // A file that could not be read ends the stream early: that is the error to show.
    reader.await??;
    let info = answer.map_err(status)?.into_inner();
    bar.finish_and_clear();
    Ok(info)
}

/// The admin service with the study lead's bundle: each call answers its message, or
/// [`super::CallFailed`] with the coordinator's status.
#[derive(Clone, Debug)]
pub struct AdminClient {
    inner: AdminServiceClient<Channel>,
}

/// One typed method per unary admin call.
macro_rules! calls {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty;)*) => {
        impl AdminClient {
            $(
                $(#[$doc])*
                pub async fn $name(&mut self, request: $req) -> Result<$resp> {
                    Ok(self.inner.$name(request).await.map_err(status)?.into_inner())
                }
            )*
        }
    };
}

calls! {
    list_models(pb::ListModelsRequest) -> pb::ListModelsResponse;
    list_sites(pb::ListSitesRequest) -> pb::ListSitesResponse;
    approve_site(pb::SiteRequest) -> pb::SiteInfo;
    revoke_site(pb::SiteRequest) -> pb::SiteInfo;
    create_study(pb::CreateStudyRequest) -> pb::StudyInfo;
    list_studies(pb::ListStudiesRequest) -> pb::ListStudiesResponse;
    start_round(pb::StartRoundRequest) -> pb::RoundInfo;
    list_rounds(pb::ListRoundsRequest) -> pb::ListRoundsResponse;
    get_round(pb::RoundRequest) -> pb::RoundInfo;
    cancel_round(pb::RoundRequest) -> pb::RoundInfo;
    get_results(pb::RoundRequest) -> pb::RoundResults;
    get_study_results(pb::StudyRequest) -> pb::StudyResults;
}

impl AdminClient {
    /// Connects with the admin bundle `conn` names.
    pub async fn connect(conn: &Conn) -> Result<Self> {
        Ok(Self { inner: connect(conn).await? })
    }

    /// Uploads a weights file (see [`push_model`]).
    pub async fn push_model(
        &mut self,
        file: &Path,
        name: &str,
        progress: bool,
    ) -> Result<pb::ModelInfo> {
        push_model(&mut self.inner, file, name, progress).await
    }

    /// Follows a round until it ends (see [`super::watch`]).
    pub async fn watch(&mut self, round: &str) -> Result<pb::RoundInfo> {
        super::watch(&mut self.inner, round).await
    }
}
