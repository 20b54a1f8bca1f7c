//! What the admin service answers about stored records (sites, models, studies), and what
//! the study lead should know about a round's sites before it starts, and the answers about
//! rounds (state, results).

use std::collections::BTreeMap;

use prost::Message;
use proto::pb;

use super::{Coordinator, SResult, ServiceError, now_s};
use crate::rounds::SiteStanding;
use crate::store::{
    ModelRecord, RoundRecord, RoundState, SiteRecord, StoreError, StudyRecord, TaskState,
};

pub(super) fn site_info(c: &Coordinator, s: &SiteRecord) -> pb::SiteInfo {
    pb::SiteInfo {
        name: s.name.clone(),
        approved: s.approved && !c.site_revoked(s),
        revoked: c.site_revoked(s),
        certificate_revoked: c.certificate_revoked(s),
        last_seen_unix: c.last_contact(s),
        capabilities: pb::Capabilities::decode(s.capabilities.as_slice())
            .ok()
            .filter(|_| !s.capabilities.is_empty()),
        dataset: pb::DatasetSummary::decode(s.dataset.as_slice())
            .ok()
            .filter(|_| !s.dataset.is_empty()),
        certificate_not_after_unix: s.cert_not_after,
        agent_version: s.agent_version.clone(),
    }
}

/// `Ping`'s answer for site `site`: the coordinator's clock and how it stands.
pub(super) fn ping(c: &Coordinator, site: String) -> SResult<pb::PingResponse> {
    let record = c.store.site(&site)?;
    Ok(pb::PingResponse {
        server_time_unix_ms: super::now_ms(),
        known: record.is_some(),
        approved: record.is_some_and(|s| s.approved && !c.site_revoked(&s)),
        site,
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// How each site stands for a new round: revoked (its task fails at once), and a sentence for
/// each thing the study lead should know: revoked, never connected, not approved, or silent for
/// a day (its task waits until it returns or the round's deadline).
pub(super) fn site_standing(
    c: &Coordinator,
    sites: &[String],
) -> SResult<BTreeMap<String, SiteStanding>> {
    let now = now_s();
    let mut out = BTreeMap::new();
    for name in sites {
        let mut standing = SiteStanding::default();
        let warnings = &mut standing.warnings;
        match c.store.site(name)? {
            None => warnings.push(format!(
                "site {name} has never connected: its task waits until it does (or the \
                 round's deadline)"
            )),
            Some(site) if c.site_revoked(&site) => {
                warnings.push(format!("site {name} is revoked: its task fails at once"));
                standing.revoked = true;
            }
            Some(site) => {
                if !site.approved {
                    warnings.push(format!(
                        "site {name} is not approved: its task waits for `coordinator site approve {name}`"
                    ));
                }
                let silent = now - c.last_contact(&site);
                if silent > 86_400 {
                    warnings.push(format!(
                        "site {name} was last seen {} days ago: its task waits until it returns \
                         (or the round's deadline)",
                        silent / 86_400
                    ));
                }
            }
        }
        out.insert(name.clone(), standing);
    }
    Ok(out)
}

pub(super) fn model_info(m: &ModelRecord) -> pb::ModelInfo {
    pb::ModelInfo {
        model: Some(pb::ModelRef { sha256: m.sha256.clone(), size: m.size, name: m.name.clone() }),
        created_unix: m.created,
        config: m.config.clone(),
        layers: m.layers,
        tail_of: m.tail_of.clone().unwrap_or_default(),
        tail_layers: m.tail_layers,
    }
}

pub(super) fn study_info(c: &Coordinator, s: StudyRecord) -> pb::StudyInfo {
    pb::StudyInfo {
        base: (!s.base_sha256.is_empty()).then(|| c.model_ref(&s.base_sha256).ok()).flatten(),
        name: s.name,
        sites: s.sites,
        created_unix: s.created,
    }
}

impl Coordinator {
    pub(super) fn round_info(&self, round: &RoundRecord) -> SResult<pb::RoundInfo> {
        let tasks = self.store.round_tasks(round)?;
        let (state, reason) = match &round.state {
            RoundState::Running => (pb::RoundState::Running, String::new()),
            RoundState::Completed => (pb::RoundState::Completed, String::new()),
            RoundState::Failed { reason } => (pb::RoundState::Failed, reason.clone()),
            RoundState::Cancelled => (pb::RoundState::Cancelled, String::new()),
        };
        Ok(pb::RoundInfo {
            round_id: round.id.clone(),
            study: round.study.clone(),
            spec: pb::TaskSpec::decode(round.spec.as_slice()).ok(),
            state: state as i32,
            tasks: tasks
                .iter()
                .map(|t| {
                    let (state, reason) = match &t.state {
                        TaskState::Waiting => (pb::TaskState::Waiting, String::new()),
                        TaskState::Pending => (pb::TaskState::Pending, String::new()),
                        TaskState::Leased { .. } => (pb::TaskState::Leased, String::new()),
                        TaskState::Succeeded => (pb::TaskState::Succeeded, String::new()),
                        TaskState::Failed { reason } => (pb::TaskState::Failed, reason.clone()),
                        TaskState::Refused { reason } => (pb::TaskState::Refused, reason.clone()),
                        TaskState::Cancelled => (pb::TaskState::Cancelled, String::new()),
                    };
                    pb::TaskInfo {
                        task_id: t.id.clone(),
                        site: t.site.clone(),
                        state: state as i32,
                        attempt: t.attempt,
                        progress: pb::Progress::decode(t.progress.as_slice())
                            .ok()
                            .filter(|_| !t.progress.is_empty()),
                        reason,
                        source: t.source,
                        bytes_down: t.bytes_down,
                        bytes_up: t.bytes_up,
                        fed_step: t.fed_step,
                    }
                })
                .collect(),
            quorum: round.quorum,
            created_unix: round.created,
            deadline_unix: round.deadline,
            reason,
            source_spec: round.source_spec.as_deref().and_then(|b| pb::TaskSpec::decode(b).ok()),
            warnings: Vec::new(),
            fed: round.fed.as_ref().map(|f| pb::FedProgress {
                step: f.step,
                rounds: f.rounds,
                aggregates: f
                    .aggregates
                    .iter()
                    .map(|a| pb::FedAggregate {
                        step: a.step,
                        tail_sha256: a.tail_sha256.clone(),
                        sites: a.sites.clone(),
                        cases: a.cases.clone(),
                        tail_bytes: a.tail_bytes,
                    })
                    .collect(),
                model: (round.state == RoundState::Completed)
                    .then(|| f.aggregates.last())
                    .flatten()
                    .and_then(|a| self.model_ref(&a.tail_sha256).ok()),
            }),
        })
    }

    /// A round with the results of its succeeded tasks.
    pub(super) fn round_results(&self, round: &RoundRecord) -> SResult<pb::RoundResults> {
        let mut results = Vec::new();
        for t in self.store.round_tasks(round)? {
            if let Some(bytes) = self.store.result(&t.id)? {
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
        Ok(pb::RoundResults { round: Some(self.round_info(round)?), results })
    }

    pub(super) fn model_ref(&self, sha256: &str) -> SResult<pb::ModelRef> {
        let m = self.store.model(sha256)?.ok_or_else(|| {
            ServiceError::NotFound(format!("model {sha256} is not stored on this coordinator"))
        })?;
        Ok(pb::ModelRef { sha256: m.sha256, size: m.size, name: m.name })
    }
}
