//! The study lead's connection to the coordinator: the admin channel over mutual TLS, and
//! [`AdminClient`], one typed method per admin call, whose errors keep the gRPC status
//! ([`super::CallFailed`]) for scripts and tests.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::limits;
use proto::pb::{self, admin_service_client::AdminServiceClient};
use sha2::{Digest, Sha256};
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

/// Uploads a weights file with a progress bar; returns what the coordinator stored.
pub async fn push_model(
    client: &mut AdminServiceClient<Channel>,
    file: &Path,
    name: &str,
    progress: bool,
) -> Result<pb::ModelInfo> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let bar = if progress {
        indicatif::ProgressBar::new(bytes.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template"),
    );
    bar.set_message(format!("uploading {name}"));
    let header = pb::PushModelRequest {
        part: Some(pb::push_model_request::Part::Header(pb::ModelRef {
            sha256,
            size: bytes.len() as u64,
            name: name.into(),
        })),
    };
    let chunks: Vec<pb::PushModelRequest> = bytes
        .chunks(limits::CHUNK_BYTES)
        .map(|c| pb::PushModelRequest {
            part: Some(pb::push_model_request::Part::Chunk(c.to_vec())),
        })
        .collect();
    let b = bar.clone();
    let stream =
        tokio_stream::iter(std::iter::once(header).chain(chunks.into_iter().inspect(move |c| {
            if let Some(pb::push_model_request::Part::Chunk(d)) = &c.part {
                b.inc(d.len() as u64);
            }
        })));
    let info = client.push_model(stream).await.map_err(status)?.into_inner();
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
