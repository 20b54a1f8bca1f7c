//! `AdminService`: what admin certificates (the study lead) may call.

use std::sync::Arc;

use proto::pb::{self, admin_service_server::AdminService};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::records::{model_info, site_info, site_standing, study_info};
use super::{Coordinator, Feed, SResult, ServiceError, identity_of, now_s};
use crate::identity::{Identity, invalid_name, valid_name};
use crate::rounds::{self, Plan, PlanError, PlanInputs};
use crate::store::{ModelRecord, RoundRecord, RoundState, SiteRecord, StudyRecord, TaskState};

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
        // A study's base is a whole model; a tail is only ever made by a round.
        let whole = |m: &shared::weights::Inspected| match &m.header.manifest.tail {
            Some(_) => Err("it is a tail (the last layers of another model), not a model; \
                            push the whole model"
                .to_owned()),
            None => Ok(()),
        };
        self.0
            .receive_blob(
                header.name.clone(),
                &header,
                stream,
                |m| match m.part {
                    Some(pb::push_model_request::Part::Chunk(c)) => Some(c),
                    _ => None,
                },
                false,
                &whole,
            )
            .await
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
        // Planning is pure; what it reads from the store is read here, under the write lock.
        let base_config = match study.base_sha256.as_str() {
            "" => None,
            sha => c.store.model(sha)?.map(|m| m.config),
        };
        let sites = site_standing(c, &study.sites)?;
        let cross_eval =
            body.spec.as_ref().is_some_and(|s| s.kind == pb::TaskKind::CrossEval as i32);
        let models = if cross_eval { c.study_models(&study)? } else { Vec::new() };
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
        let planned = rounds::plan::plan(
            body,
            &PlanInputs {
                study: &study,
                base_config,
                sites,
                default_deadline_seconds: c.limits.round_deadline_seconds,
                default_max_attempts: c.limits.max_attempts,
                now_s: now_ms / 1000,
                now_ms,
                id: format!("r{}-{:06x}", now_s(), rand::random::<u32>() & 0xff_ffff),
                models,
            },
        );
        let Plan { round, tasks, warnings, kind } = planned.map_err(|e| match e {
            PlanError::Invalid(m) => ServiceError::InvalidArgument(m),
            PlanError::Precondition(m) => ServiceError::FailedPrecondition(m),
            PlanError::NotFound(m) => ServiceError::NotFound(m),
        })?;
        c.store.commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)?;
        // Leases may start as soon as the tasks are durable: the flush and the answer's
        // round view run without the write lock.
        drop(_w);
        c.durable().await?;
        let id = &round.id;
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
    type BackupStream = super::FedStream<pb::BackupChunk>;

    async fn backup(
        &self,
        _req: Request<pb::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        Ok(Response::new(self.0.backup().await?))
    }

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
        let sites = c
            .store
            .sites()?
            .iter()
            .filter(|s| study.sites.contains(&s.name))
            .map(|s| super::records::site_info(c, s))
            .collect();
        Ok(Response::new(pb::StudyResults {
            study: Some(study_info(c, study)),
            rounds,
            sites,
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
            generated_unix: super::now_s(),
        }))
    }
}
