//! `AdminService`: what admin certificates (the study lead) may call.

use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use proto::limits;
use proto::pb::{self, admin_service_server::AdminService};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{Coordinator, SResult, ServiceError, identity_of, now_s};
use crate::identity::{Identity, valid_name};
use crate::store::{
    ModelRecord, RoundRecord, RoundState, SiteRecord, StoreError, StudyRecord, TaskRecord,
    TaskState,
};

type RoundStream = Pin<Box<dyn Stream<Item = Result<pb::RoundInfo, Status>> + Send>>;

// === impl AdminService ===

/// `AdminService` over a shared coordinator.
#[derive(Clone, Debug)]
pub struct AdminApi(pub Arc<Coordinator>);

fn site_info(s: &SiteRecord) -> pb::SiteInfo {
    pb::SiteInfo {
        name: s.name.clone(),
        approved: s.approved,
        revoked: s.revoked,
        last_seen_unix: s.last_seen,
        capabilities: pb::Capabilities::decode(s.capabilities.as_slice())
            .ok()
            .filter(|_| !s.capabilities.is_empty()),
        dataset: pb::DatasetSummary::decode(s.dataset.as_slice())
            .ok()
            .filter(|_| !s.dataset.is_empty()),
        certificate_not_after_unix: s.cert_not_after,
    }
}

fn model_info(m: &ModelRecord) -> pb::ModelInfo {
    pb::ModelInfo {
        model: Some(pb::ModelRef { sha256: m.sha256.clone(), size: m.size, name: m.name.clone() }),
        created_unix: m.created,
        config: m.config.clone(),
        layers: m.layers,
    }
}

impl AdminApi {
    async fn receive_model(
        &self,
        mut stream: Streaming<pb::PushModelRequest>,
    ) -> SResult<ModelRecord> {
        let c = &self.0;
        let header = match stream.next().await {
            Some(Ok(pb::PushModelRequest {
                part: Some(pb::push_model_request::Part::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(ServiceError::InvalidArgument(format!("upload: {s}"))),
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "an upload starts with its header".into(),
                ));
            }
        };
        if !valid_name(&header.name) {
            return Err(ServiceError::InvalidArgument(format!(
                "model name \"{}\": use 1 to 63 lowercase letters, digits and '-'",
                header.name
            )));
        }
        if header.size == 0 || header.size > limits::MAX_MODEL_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "model size {} is outside 1..={}",
                header.size,
                limits::MAX_MODEL_BYTES
            )));
        }
        if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ServiceError::InvalidArgument("sha256 must be 64 hex digits".into()));
        }
        let sha = header.sha256.to_ascii_lowercase();
        let tmp_dir = c.blobs.join("tmp");
        let io = |path: &std::path::Path| {
            let path = path.to_owned();
            move |source| ServiceError::Io { path, source }
        };
        tokio::fs::create_dir_all(&tmp_dir).await.map_err(io(&tmp_dir))?;
        let tmp = tmp_dir.join(format!("upload-{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut bytes = Vec::new();
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(|s| ServiceError::InvalidArgument(format!("upload: {s}")))?;
                let Some(pb::push_model_request::Part::Chunk(chunk)) = msg.part else {
                    return Err(ServiceError::InvalidArgument(
                        "a second header in one upload".into(),
                    ));
                };
                if chunk.len() > limits::CHUNK_BYTES {
                    return Err(ServiceError::InvalidArgument(format!(
                        "chunk of {} bytes; at most {}",
                        chunk.len(),
                        limits::CHUNK_BYTES
                    )));
                }
                size += chunk.len() as u64;
                if size > header.size {
                    return Err(ServiceError::InvalidArgument(format!(
                        "more bytes than the header's size {}",
                        header.size
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(io(&tmp))?;
                bytes.extend_from_slice(&chunk);
            }
            if size != header.size {
                return Err(ServiceError::InvalidArgument(format!(
                    "upload ended at {size} of {} bytes",
                    header.size
                )));
            }
            let got = hex::encode(hasher.finalize());
            if got != sha {
                return Err(ServiceError::InvalidArgument(format!(
                    "sha256 of the upload is {got}, the header said {sha}"
                )));
            }
            let manifest = shared::weights::read_manifest(&bytes).map_err(|e| {
                ServiceError::InvalidArgument(format!("not a fedtune weights file: {e}"))
            })?;
            file.sync_all().await.map_err(io(&tmp))?;
            Ok(manifest)
        }
        .await;
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let dest = c.blob_path(&sha);
        tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))?;
        if let Ok(dir) = tokio::fs::File::open(&c.blobs).await {
            let _ = dir.sync_all().await;
        }
        Ok(ModelRecord {
            sha256: sha,
            size: header.size,
            name: header.name,
            created: now_s(),
            config: manifest.config.name.clone(),
            layers: manifest.layers.len() as u32,
        })
    }

    fn round(&self, id: &str) -> SResult<RoundRecord> {
        self.0.store.round(id)?.ok_or_else(|| ServiceError::NotFound(format!("no round {id}")))
    }
}

fn admin<T>(req: &Request<T>) -> SResult<Identity> {
    identity_of(req)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn push_model(
        &self,
        req: Request<Streaming<pb::PushModelRequest>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let who = admin(&req)?;
        let record = self.receive_model(req.into_inner()).await?;
        let c = &self.0;
        let _w = c.write.lock().await;
        c.store.put_model(&record).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        tracing::info!(admin = %who.name, model = %record.name, sha256 = %record.sha256, "model stored");
        Ok(Response::new(model_info(&record)))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        admin(&req)?;
        let models = self.0.store.models().map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(model_info).collect(),
        }))
    }

    async fn list_sites(
        &self,
        req: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        admin(&req)?;
        let sites = self.0.store.sites().map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListSitesResponse { sites: sites.iter().map(site_info).collect() }))
    }

    async fn approve_site(
        &self,
        req: Request<pb::SiteRequest>,
    ) -> Result<Response<pb::SiteInfo>, Status> {
        let who = admin(&req)?;
        let name = req.into_inner().name;
        if !valid_name(&name) {
            return Err(ServiceError::InvalidArgument(format!(
                "\"{name}\" is not a valid site name"
            ))
            .into());
        }
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut site = c
            .store
            .site(&name)
            .map_err(ServiceError::from)?
            .unwrap_or_else(|| SiteRecord { name: name.clone(), ..Default::default() });
        site.approved = true;
        site.revoked = false;
        c.store.put_site(&site).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(admin = %who.name, site = %name, "site approved");
        Ok(Response::new(site_info(&site)))
    }

    async fn revoke_site(
        &self,
        req: Request<pb::SiteRequest>,
    ) -> Result<Response<pb::SiteInfo>, Status> {
        let who = admin(&req)?;
        let name = req.into_inner().name;
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut site = c
            .store
            .site(&name)
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound(format!("no site \"{name}\"")))?;
        site.approved = false;
        site.revoked = true;
        c.store.put_site(&site).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        tracing::warn!(admin = %who.name, site = %name, "site revoked");
        Ok(Response::new(site_info(&site)))
    }

    async fn create_study(
        &self,
        req: Request<pb::CreateStudyRequest>,
    ) -> Result<Response<pb::StudyInfo>, Status> {
        admin(&req)?;
        let body = req.into_inner();
        let c = &self.0;
        if !valid_name(&body.name) {
            return Err(ServiceError::InvalidArgument(format!(
                "\"{}\" is not a valid study name",
                body.name
            ))
            .into());
        }
        let _w = c.write.lock().await;
        if c.store.study(&body.name).map_err(ServiceError::from)?.is_some() {
            return Err(
                ServiceError::AlreadyExists(format!("study \"{}\" exists", body.name)).into()
            );
        }
        let model =
            c.store.model_by_ref(&body.base_model).map_err(ServiceError::from)?.ok_or_else(
                || {
                    ServiceError::NotFound(format!(
                        "no model \"{}\"; push it with `coordinator model push FILE --name NAME`",
                        body.base_model
                    ))
                },
            )?;
        if body.sites.is_empty() {
            return Err(
                ServiceError::InvalidArgument("a study needs at least one site".into()).into()
            );
        }
        let mut sites = body.sites.clone();
        sites.sort();
        sites.dedup();
        for s in &sites {
            if c.store.site(s).map_err(ServiceError::from)?.is_none() {
                return Err(ServiceError::NotFound(format!(
                    "no site \"{s}\"; it appears once its agent connects or the study lead approves it"
                ))
                .into());
            }
        }
        let study = StudyRecord {
            name: body.name,
            base_sha256: model.sha256.clone(),
            sites,
            created: now_s(),
        };
        c.store.put_study(&study).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::StudyInfo {
            name: study.name,
            base: Some(c.model_ref(&model.sha256)?),
            sites: study.sites,
            created_unix: study.created,
        }))
    }

    async fn list_studies(
        &self,
        req: Request<pb::ListStudiesRequest>,
    ) -> Result<Response<pb::ListStudiesResponse>, Status> {
        admin(&req)?;
        let c = &self.0;
        let studies = c.store.studies().map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListStudiesResponse {
            studies: studies
                .into_iter()
                .map(|s| pb::StudyInfo {
                    base: c.model_ref(&s.base_sha256).ok(),
                    name: s.name,
                    sites: s.sites,
                    created_unix: s.created,
                })
                .collect(),
        }))
    }

    async fn start_round(
        &self,
        req: Request<pb::StartRoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        let who = admin(&req)?;
        let body = req.into_inner();
        let c = &self.0;
        let _w = c.write.lock().await;
        let study = c
            .store
            .study(&body.study)
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound(format!("no study \"{}\"", body.study)))?;
        let spec = body
            .spec
            .ok_or_else(|| ServiceError::InvalidArgument("a round needs a task spec".into()))?;
        let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
        let base =
            c.store.model(&study.base_sha256).map_err(ServiceError::from)?.ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "the study's base model {} is gone",
                    study.base_sha256
                ))
            })?;
        let bad = |m: String| Status::from(ServiceError::InvalidArgument(m));
        match kind {
            pb::TaskKind::Unspecified => {
                return Err(bad("task kind: use evaluate, finetune or train".into()));
            }
            pb::TaskKind::Finetune => {
                if spec.trainable_layers == 0 || spec.trainable_layers > base.layers {
                    return Err(bad(format!(
                        "trainable_layers = {}; the base model has {} layers",
                        spec.trainable_layers, base.layers
                    )));
                }
            }
            pb::TaskKind::Train => {
                if !spec.config.is_empty()
                    && shared::model::ModelConfig::preset(&spec.config).is_err()
                {
                    return Err(bad(format!(
                        "config \"{}\": use tiny, small or resnet103",
                        spec.config
                    )));
                }
            }
            pb::TaskKind::Evaluate => {}
        }
        if spec.epochs > 10_000 || spec.batch_size > 4096 {
            return Err(bad("epochs <= 10000 and batch_size <= 4096".into()));
        }
        if !(spec.learning_rate.is_finite()
            && spec.learning_rate >= 0.0
            && spec.learning_rate < 10.0)
        {
            return Err(bad(format!(
                "learning_rate = {} is not a learning rate",
                spec.learning_rate
            )));
        }
        let n = study.sites.len() as u32;
        let quorum = if body.quorum == 0 { n } else { body.quorum };
        if quorum > n {
            return Err(bad(format!("quorum {quorum} is more than the study's {n} sites")));
        }
        let deadline = if body.deadline_seconds == 0 {
            c.limits.round_deadline_seconds
        } else {
            body.deadline_seconds
        };
        let max_attempts =
            if body.max_attempts == 0 { c.limits.max_attempts } else { body.max_attempts.min(100) };
        let id = format!("r{}-{:06x}", now_s(), rand::random::<u32>() & 0xff_ffff);
        let tasks: Vec<TaskRecord> = study
            .sites
            .iter()
            .map(|s| TaskRecord {
                id: format!("{id}.{s}"),
                round_id: id.clone(),
                site: s.clone(),
                state: TaskState::Pending,
                attempt: 0,
                progress: Vec::new(),
            })
            .collect();
        let round = RoundRecord {
            id: id.clone(),
            study: study.name.clone(),
            spec: spec.encode_to_vec(),
            base_sha256: (kind != pb::TaskKind::Train).then(|| study.base_sha256.clone()),
            quorum,
            max_attempts,
            created: now_s(),
            deadline: now_s() + i64::from(deadline),
            state: RoundState::Running,
            tasks: tasks.iter().map(|t| t.id.clone()).collect(),
        };
        c.store
            .commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)
            .map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(admin = %who.name, round = %id, study = %study.name, kind = ?kind, "round started");
        Ok(Response::new(c.round_info(&round)?))
    }

    async fn get_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        admin(&req)?;
        let round = self.round(&req.get_ref().round_id)?;
        Ok(Response::new(self.0.round_info(&round)?))
    }

    type WatchRoundStream = RoundStream;

    async fn watch_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<Self::WatchRoundStream>, Status> {
        admin(&req)?;
        let id = req.into_inner().round_id;
        self.round(&id)?;
        let c = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut changed = c.changed.subscribe();
            let mut last = None;
            loop {
                let info = c.store.round(&id).map_err(ServiceError::from).and_then(|r| {
                    let r = r.ok_or_else(|| ServiceError::NotFound(format!("no round {id}")))?;
                    c.round_info(&r)
                });
                let info = match info {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let done = info.state != pb::RoundState::Running as i32;
                if last.as_ref() != Some(&info) {
                    if tx.send(Ok(info.clone())).await.is_err() {
                        return; // the watcher went away
                    }
                    last = Some(info);
                }
                if done || changed.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        let who = admin(&req)?;
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut round = self.round(&req.get_ref().round_id)?;
        if round.state != RoundState::Running {
            return Err(ServiceError::FailedPrecondition(format!(
                "round {} is not running",
                round.id
            ))
            .into());
        }
        let mut tasks = c.store.round_tasks(&round).map_err(ServiceError::from)?;
        for t in tasks.iter_mut().filter(|t| !t.state.is_final()) {
            t.state = TaskState::Cancelled;
        }
        round.state = RoundState::Cancelled;
        c.store
            .commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)
            .map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(admin = %who.name, round = %round.id, "round cancelled");
        Ok(Response::new(c.round_info(&round)?))
    }

    async fn get_results(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundResults>, Status> {
        admin(&req)?;
        let c = &self.0;
        let round = self.round(&req.get_ref().round_id)?;
        let mut results = Vec::new();
        for t in c.store.round_tasks(&round).map_err(ServiceError::from)? {
            if let Some(bytes) = c.store.result(&t.id).map_err(ServiceError::from)? {
                let result = pb::TaskResult::decode(bytes.as_slice()).map_err(|e| {
                    ServiceError::Store(StoreError::Corrupt {
                        tree: "results",
                        key: t.id.clone(),
                        error: e.to_string(),
                    })
                })?;
                results.push(pb::SiteResult { site: t.site, result: Some(result) });
            }
        }
        Ok(Response::new(pb::RoundResults { round: Some(c.round_info(&round)?), results }))
    }
}
