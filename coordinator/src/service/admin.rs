//! `AdminService`: what admin certificates (the study lead) may call.

use std::sync::Arc;

use prost::Message;
use proto::pb::{self, admin_service_server::AdminService};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::records::{model_info, site_info, site_warnings, study_info};
use super::{Coordinator, Feed, SResult, ServiceError, identity_of, now_s};
use crate::identity::{Identity, invalid_name, valid_name};
use crate::store::{
    ModelRecord, RoundRecord, RoundState, SiteRecord, StudyRecord, TaskRecord, TaskState,
};

type RoundStream = super::FedStream<pb::RoundInfo>;

// === impl AdminService ===

/// `AdminService` over a shared coordinator.
#[derive(Clone, Debug)]
pub struct AdminApi(pub Arc<Coordinator>);

impl AdminApi {
    async fn receive_model(
        &self,
        mut stream: Streaming<pb::PushModelRequest>,
    ) -> SResult<ModelRecord> {
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
        self.0
            .receive_blob(header.name.clone(), &header, stream, |m| match m.part {
                Some(pb::push_model_request::Part::Chunk(c)) => Some(c),
                _ => None,
            })
            .await
    }

    fn round(&self, id: &str) -> SResult<RoundRecord> {
        self.0.store.round(id)?.ok_or_else(|| ServiceError::NotFound(format!("no round {id}")))
    }
}

/// The longest round deadline a study lead may set: 90 days.
const MAX_DEADLINE_SECONDS: u32 = 90 * 86_400;

/// Epochs, batch size and learning rate within sane bounds.
fn check_spec_numbers(spec: &pb::TaskSpec) -> Result<(), String> {
    if spec.epochs > 10_000 || spec.batch_size > 4096 {
        return Err("epochs <= 10000 and batch_size <= 4096".into());
    }
    if !(spec.learning_rate.is_finite() && spec.learning_rate >= 0.0 && spec.learning_rate < 10.0) {
        return Err(format!("learning_rate = {} is not a learning rate", spec.learning_rate));
    }
    Ok(())
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
        c.store.put_model(&record)?;
        c.store.flush().await?;
        tracing::info!(admin = %who.name, model = %record.name, sha256 = %record.sha256, "model stored");
        Ok(Response::new(model_info(&record)))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        admin(&req)?;
        let models = self.0.store.models()?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(model_info).collect(),
        }))
    }

    async fn list_sites(
        &self,
        req: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        admin(&req)?;
        let sites = self.0.store.sites()?;
        Ok(Response::new(pb::ListSitesResponse {
            sites: sites.iter().map(|s| site_info(&self.0, s)).collect(),
        }))
    }

    async fn approve_site(
        &self,
        req: Request<pb::SiteRequest>,
    ) -> Result<Response<pb::SiteInfo>, Status> {
        let who = admin(&req)?;
        let pb::SiteRequest { name, reinstate } = req.into_inner();
        if !valid_name(&name) {
            return Err(ServiceError::InvalidArgument(invalid_name("site", &name)).into());
        }
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut site = c
            .store
            .site(&name)?
            .unwrap_or_else(|| SiteRecord { name: name.clone(), ..Default::default() });
        if site.revoked && !reinstate {
            return Err(ServiceError::FailedPrecondition(format!(
                "site \"{name}\" was revoked (`coordinator site revoke`); approving it lets its \
                 certificate in again: run `coordinator site approve {name} --reinstate` if that \
                 is meant"
            ))
            .into());
        }
        if c.certificate_revoked(&site) {
            tracing::warn!(site = %name, "approved, but its last certificate is on the revocation list; it needs a new bundle");
        }
        site.approved = true;
        site.revoked = false;
        c.store.put_site(&site)?;
        c.durable().await?;
        tracing::info!(admin = %who.name, site = %name, "site approved");
        Ok(Response::new(site_info(c, &site)))
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
            .site(&name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no site \"{name}\"")))?;
        site.approved = false;
        site.revoked = true;
        c.store.put_site(&site)?;
        c.store.flush().await?;
        // Its unfinished tasks fail at the next tick; the site's calls are refused from now.
        c.notify();
        tracing::warn!(admin = %who.name, site = %name, "site revoked");
        Ok(Response::new(site_info(c, &site)))
    }

    async fn create_study(
        &self,
        req: Request<pb::CreateStudyRequest>,
    ) -> Result<Response<pb::StudyInfo>, Status> {
        admin(&req)?;
        let body = req.into_inner();
        let c = &self.0;
        if !valid_name(&body.name) {
            return Err(ServiceError::InvalidArgument(invalid_name("study", &body.name)).into());
        }
        let _w = c.write.lock().await;
        if c.store.study(&body.name)?.is_some() {
            return Err(
                ServiceError::AlreadyExists(format!("study \"{}\" exists", body.name)).into()
            );
        }
        // No base model: the study's transfer rounds train Model_S at a source site.
        let model = if body.base_model.is_empty() {
            None
        } else {
            Some(c.store.model_by_ref(&body.base_model)?.ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no model \"{}\"; push it with `coordinator model push FILE --name NAME`",
                    body.base_model
                ))
            })?)
        };
        if body.sites.is_empty() {
            return Err(
                ServiceError::InvalidArgument("a study needs at least one site".into()).into()
            );
        }
        let mut sites = body.sites.clone();
        sites.sort();
        sites.dedup();
        for s in &sites {
            if c.store.site(s)?.is_none() {
                return Err(ServiceError::NotFound(format!(
                    "no site \"{s}\"; it appears once its agent connects or the study lead approves it"
                ))
                .into());
            }
        }
        let study = StudyRecord {
            name: body.name,
            base_sha256: model.map(|m| m.sha256).unwrap_or_default(),
            sites,
            created: now_s(),
        };
        c.store.put_study(&study)?;
        c.store.flush().await?;
        Ok(Response::new(study_info(c, study)))
    }

    async fn list_studies(
        &self,
        req: Request<pb::ListStudiesRequest>,
    ) -> Result<Response<pb::ListStudiesResponse>, Status> {
        admin(&req)?;
        let c = &self.0;
        let studies = c.store.studies()?;
        Ok(Response::new(pb::ListStudiesResponse {
            studies: studies.into_iter().map(|s| study_info(c, s)).collect(),
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
            .study(&body.study)?
            .ok_or_else(|| ServiceError::NotFound(format!("no study \"{}\"", body.study)))?;
        let spec = body
            .spec
            .ok_or_else(|| ServiceError::InvalidArgument("a round needs a task spec".into()))?;
        let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
        let bad = |m: String| Status::from(ServiceError::InvalidArgument(m));
        // Model_S is the study's base model, or is trained by the round's source site when the
        // study has none yet. A source site never runs the target arms.
        let source = (!body.source_site.is_empty()).then_some(body.source_site.as_str());
        if let Some(site) = source {
            if kind != pb::TaskKind::TransferTarget {
                return Err(bad("a source site is for transfer rounds".into()));
            }
            if !study.sites.iter().any(|s| s == site) {
                return Err(bad(format!(
                    "source site \"{site}\" is not one of study {}'s sites ({})",
                    study.name,
                    study.sites.join(", ")
                )));
            }
            if study.sites.len() < 2 {
                return Err(bad("a transfer round needs a target site besides the source".into()));
            }
        }
        let trains_source = source.is_some() && study.base_sha256.is_empty();
        let source_spec = if trains_source {
            let mut ss = body.source_spec.clone().unwrap_or_default();
            ss.kind = pb::TaskKind::TransferSource as i32;
            ss.arms.clear();
            if ss.config.is_empty() {
                ss.config = spec.config.clone();
            }
            check_spec_numbers(&ss).map_err(bad)?;
            Some(ss)
        } else {
            None
        };
        // Model_S's config, to check the arms' k against (and to default it).
        let config_name = match &source_spec {
            Some(ss) => {
                Some(if ss.config.is_empty() { "small".to_owned() } else { ss.config.clone() })
            }
            None if kind == pb::TaskKind::Train => None,
            None => {
                if study.base_sha256.is_empty() {
                    return Err(bad(format!(
                        "study {} has no base model: push one and create the study with --base, or name a --source site that trains Model_S",
                        study.name
                    )));
                }
                let base = c.store.model(&study.base_sha256)?.ok_or_else(|| {
                    ServiceError::NotFound(format!(
                        "the study's base model {} is gone",
                        study.base_sha256
                    ))
                })?;
                Some(base.config)
            }
        };
        let config = config_name
            .map(|name| {
                shared::model::ModelConfig::preset(&name)
                    .map_err(|_| bad(format!("config \"{name}\": use tiny, small or resnet103")))
            })
            .transpose()?;
        let base_layers = config.as_ref().map_or(0, |c| c.num_layers() as u32);
        let mut spec = spec;
        if let Some(config) = &config {
            // k = 0: the paper's share of the layers.
            for arm in spec
                .arms
                .iter_mut()
                .filter(|a| a.kind == pb::ArmKind::Finetune as i32 && a.trainable_layers == 0)
            {
                arm.trainable_layers = config.default_trainable_layers() as u32;
            }
        }
        match kind {
            pb::TaskKind::Unspecified | pb::TaskKind::TransferSource => {
                return Err(bad("task kind: use evaluate, finetune, train or transfer".into()));
            }
            pb::TaskKind::Finetune => {
                if spec.trainable_layers == 0 || spec.trainable_layers > base_layers {
                    return Err(bad(format!(
                        "trainable_layers = {}; the base model has {base_layers} layers",
                        spec.trainable_layers
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
            pb::TaskKind::TransferTarget => {
                if spec.arms.is_empty() || spec.arms.len() > super::MAX_ARMS {
                    return Err(bad(format!(
                        "a transfer round runs 1 to {} arms, not {}",
                        super::MAX_ARMS,
                        spec.arms.len()
                    )));
                }
                for (i, arm) in spec.arms.iter().enumerate() {
                    let ak = pb::ArmKind::try_from(arm.kind).unwrap_or(pb::ArmKind::Unspecified);
                    if ak == pb::ArmKind::Unspecified {
                        return Err(bad(format!("arm {i}: kind is base, scratch or finetune")));
                    }
                    if ak == pb::ArmKind::Finetune
                        && (arm.trainable_layers == 0 || arm.trainable_layers > base_layers)
                    {
                        return Err(bad(format!(
                            "arm {i}: trainable_layers = {}; Model_S has {base_layers} layers",
                            arm.trainable_layers
                        )));
                    }
                    check_spec_numbers(&pb::TaskSpec {
                        epochs: arm.epochs,
                        learning_rate: arm.learning_rate,
                        ..Default::default()
                    })
                    .map_err(|m| bad(format!("arm {i}: {m}")))?;
                }
            }
            pb::TaskKind::Evaluate => {}
        }
        check_spec_numbers(&spec).map_err(bad)?;
        // One task per study site; a source site that does not train Model_S has none.
        let sites: Vec<&String> =
            study.sites.iter().filter(|s| trains_source || source != Some(s.as_str())).collect();
        let n = sites.len() as u32;
        let quorum = if body.quorum == 0 { n } else { body.quorum };
        if quorum > n {
            return Err(bad(format!("quorum {quorum} is more than the round's {n} sites")));
        }
        let (revoked, warnings) = site_warnings(c, &sites)?;
        if let Some(s) = source.filter(|s| trains_source && revoked.iter().any(|r| r == s)) {
            return Err(ServiceError::FailedPrecondition(format!(
                "the source site {s} is revoked: it cannot train Model_S; reinstate it \
                 (`coordinator site approve {s} --reinstate`) or name another --source"
            ))
            .into());
        }
        let usable = n - revoked.len() as u32;
        if quorum > usable {
            return Err(ServiceError::FailedPrecondition(format!(
                "site(s) {} of study {} are revoked, so their tasks would fail at once and the \
                 quorum of {quorum} cannot be met by the other {usable}: reinstate them \
                 (`coordinator site approve NAME --reinstate`) or pass --quorum {usable}",
                revoked.join(", "),
                study.name
            ))
            .into());
        }
        if body.deadline_seconds > MAX_DEADLINE_SECONDS {
            return Err(bad(format!(
                "deadline_seconds = {} is more than {} days; a round that long is a mistake",
                body.deadline_seconds,
                MAX_DEADLINE_SECONDS / 86_400
            )));
        }
        let deadline = if body.deadline_seconds == 0 {
            c.limits.round_deadline_seconds
        } else {
            body.deadline_seconds
        };
        let max_attempts =
            if body.max_attempts == 0 { c.limits.max_attempts } else { body.max_attempts.min(100) };
        let id = format!("r{}-{:06x}", now_s(), rand::random::<u32>() & 0xff_ffff);
        let tasks: Vec<TaskRecord> = sites
            .iter()
            .map(|s| {
                let is_source = trains_source && source == Some(s.as_str());
                TaskRecord {
                    id: format!("{id}.{s}"),
                    round_id: id.clone(),
                    site: (*s).clone(),
                    state: if trains_source && !is_source {
                        TaskState::Waiting
                    } else {
                        TaskState::Pending
                    },
                    attempt: 0,
                    progress: Vec::new(),
                    source: is_source,
                }
            })
            .collect();
        let round = RoundRecord {
            id: id.clone(),
            study: study.name.clone(),
            spec: spec.encode_to_vec(),
            // Set when the source site uploads Model_S.
            base_sha256: (kind != pb::TaskKind::Train && !trains_source)
                .then(|| study.base_sha256.clone()),
            quorum,
            max_attempts,
            created: now_s(),
            created_ms: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000,
            deadline: now_s() + i64::from(deadline),
            state: RoundState::Running,
            tasks: tasks.iter().map(|t| t.id.clone()).collect(),
            source_spec: source_spec.map(|s| s.encode_to_vec()),
        };
        c.store.commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)?;
        c.durable().await?;
        tracing::info!(admin = %who.name, round = %id, study = %study.name, kind = ?kind, "round started");
        for w in &warnings {
            tracing::warn!(round = %id, "{w}");
        }
        let mut info = c.round_info(&round)?;
        info.warnings = warnings;
        Ok(Response::new(info))
    }

    async fn get_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        admin(&req)?;
        let round = self.round(&req.get_ref().round_id)?;
        Ok(Response::new(self.0.round_info(&round)?))
    }

    async fn list_rounds(
        &self,
        req: Request<pb::ListRoundsRequest>,
    ) -> Result<Response<pb::ListRoundsResponse>, Status> {
        admin(&req)?;
        let study = &req.get_ref().study;
        let c = &self.0;
        if !study.is_empty() && c.store.study(study)?.is_none() {
            return Err(ServiceError::NotFound(format!(
                "no study \"{study}\"; `coordinator study list` shows them"
            ))
            .into());
        }
        let mut rounds: Vec<_> = c
            .store
            .rounds()?
            .into_iter()
            .filter(|r| study.is_empty() || &r.study == study)
            .collect();
        rounds.sort_by_key(|r| std::cmp::Reverse((r.created_millis(), r.id.clone())));
        let rounds = rounds.iter().map(|r| c.round_info(r)).collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListRoundsResponse { rounds }))
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
        let (feed, stream) = Feed::new(c.limits.idle_seconds, 4);
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
                        feed.send(Err(e.into())).await;
                        return;
                    }
                };
                let done = info.state != pb::RoundState::Running as i32;
                if last.as_ref() != Some(&info) {
                    if !feed.send(Ok(info.clone())).await {
                        return; // the watcher went away or stopped reading
                    }
                    last = Some(info);
                }
                if done || changed.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
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
        let mut tasks = c.store.round_tasks(&round)?;
        for t in tasks.iter_mut().filter(|t| !t.state.is_final()) {
            t.state = TaskState::Cancelled;
        }
        round.state = RoundState::Cancelled;
        c.store.commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)?;
        c.durable().await?;
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
        Ok(Response::new(c.round_results(&round)?))
    }

    async fn get_study_results(
        &self,
        req: Request<pb::StudyRequest>,
    ) -> Result<Response<pb::StudyResults>, Status> {
        admin(&req)?;
        let c = &self.0;
        let name = &req.get_ref().name;
        let study = c
            .store
            .study(name)?
            .ok_or_else(|| ServiceError::NotFound(format!("no study \"{name}\"")))?;
        let mut rounds: Vec<RoundRecord> =
            c.store.rounds()?.into_iter().filter(|r| &r.study == name).collect();
        rounds.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        let rounds = rounds.iter().map(|r| c.round_results(r)).collect::<SResult<Vec<_>>>()?;
        Ok(Response::new(pb::StudyResults { study: Some(study_info(c, study)), rounds }))
    }
}
