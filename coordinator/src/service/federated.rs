//! Federated rounds on the coordinator's side: averaging a finished step's tails into the
//! next step's global tail (and, after the last step, Model_FT), the models of a study a
//! cross-eval round scores, and the bytes each task moved.

use prost::Message;
use proto::pb;
use shared::weights::Federated;

use super::{Coordinator, SResult, now_s};
use crate::rounds::fedavg;
use crate::store::{
    FedAggregate, ModelRecord, RoundRecord, RoundState, StudyRecord, TaskRecord, TaskState,
};

impl Coordinator {
    /// Adds weights bytes a task moved (sent to its site, received from it). Not flushed:
    /// a count, kept within sled's flush interval.
    pub(super) async fn note_bytes(&self, task_id: &str, down: u64, up: u64) {
        if down == 0 && up == 0 {
            return;
        }
        self.metrics.served(down);
        self.metrics.received(up);
        let _w = self.write.lock().await;
        let Ok(Some(mut task)) = self.store.task(task_id) else { return };
        task.bytes_down += down;
        task.bytes_up += up;
        if let Err(e) = self.store.commit(None, &[&task], None) {
            tracing::warn!(task = task_id, error = %e, "could not count the bytes a task moved");
        }
    }

    /// The tail a succeeded federated task uploaded and its training cases (from its result).
    fn contribution(&self, t: &TaskRecord) -> Option<(String, u32)> {
        let sha = t.uploads.get(&1)?.clone();
        let bytes = self.store.result(&t.id).ok()??;
        let result = pb::TaskResult::decode(bytes.as_slice()).ok()?;
        let arm = result.arms.get(1)?;
        // A site's weight is its training cases, as reported with the tail, but never more
        // than its hello said it holds: one site cannot outweigh the others by claiming more.
        let held = self
            .store
            .site(&t.site)
            .ok()
            .flatten()
            .and_then(|s| pb::DatasetSummary::decode(s.dataset.as_slice()).ok())
            .map_or(0, |d| d.train_cases);
        (arm.tail_sha256 == sha).then_some((sha, arm.train_cases.min(held)))
    }

    /// Averages every federated round whose current step has ended: the average becomes the
    /// next step's global tail (new tasks), or after the last step the round's Model_FT.
    /// Run after each result and by the ticker; a restart finds a finished step again and
    /// makes the same average (the same bytes), so nothing is lost or done twice.
    pub async fn advance_federated(&self) -> SResult<()> {
        let _w = self.write.lock().await;
        let mut changed = false;
        for mut round in self.store.rounds()? {
            if round.state != RoundState::Running || round.fed.is_none() {
                continue;
            }
            let tasks = self.store.round_tasks(&round)?;
            match fedavg::step(&round, &tasks, |t| self.contribution(t)) {
                fedavg::Step::Running => continue,
                fedavg::Step::Fail(reason) => {
                    tracing::warn!(round = %round.id, %reason, "federated round failed");
                    round.state = RoundState::Failed { reason };
                    self.store.commit(Some(&round), &[], None)?;
                }
                fedavg::Step::Average(inputs) => match self.average(&round, &inputs).await {
                    Ok(agg) => {
                        tracing::info!(round = %round.id, step = agg.step, sites = inputs.len(), tail = %agg.tail_sha256, "tails averaged");
                        let new = fedavg::advance(&mut round, &tasks, agg);
                        self.store.commit(Some(&round), &new.iter().collect::<Vec<_>>(), None)?;
                    }
                    Err(reason) => {
                        tracing::error!(round = %round.id, %reason, "the tails could not be averaged");
                        round.state = RoundState::Failed { reason };
                        self.store.commit(Some(&round), &[], None)?;
                    }
                },
            }
            changed = true;
        }
        if changed {
            self.durable().await?;
        }
        Ok(())
    }

    /// Averages `inputs` (site, tail sha256, cases; sorted by site) of `round`'s current step
    /// and stores the result as a model. Errors are the round's failure reason.
    async fn average(
        &self,
        round: &RoundRecord,
        inputs: &[(String, String, u32)],
    ) -> Result<FedAggregate, String> {
        let fed = round.fed.clone().unwrap_or_default();
        let mut blobs = Vec::with_capacity(inputs.len());
        for (site, sha, _) in inputs {
            let path = self.blob_path(sha);
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| format!("reading {site}'s tail {}: {e}", path.display()))?;
            blobs.push(bytes);
        }
        let contributions: Vec<fedavg::Contribution<'_>> = blobs
            .iter()
            .zip(inputs)
            .map(|(b, (_, _, cases))| fedavg::Contribution { bytes: b, cases: *cases })
            .collect();
        let provenance = Federated {
            round: round.id.clone(),
            step: fed.step,
            rounds: fed.rounds,
            sites: inputs.iter().map(|i| i.0.clone()).collect(),
            cases: inputs.iter().map(|i| i.2).collect(),
            keep_local_bn: fed.keep_local_bn,
            prox_mu: fed.prox_mu,
        };
        let bytes =
            fedavg::average(&contributions, provenance.clone()).map_err(|e| e.to_string())?;
        let manifest = shared::weights::read_manifest(&bytes).map_err(|e| e.to_string())?;
        let size = bytes.len() as u64;
        let sha = self.put_blob(bytes).await.map_err(|e| e.to_string())?;
        let name = if fed.step >= fed.rounds {
            format!("model-ft-{}", round.id)
        } else {
            format!("fed-{}-step{}", round.id, fed.step)
        };
        let record = ModelRecord::of(sha.clone(), size, name, now_s(), &manifest);
        self.store.put_model(&record).map_err(|e| e.to_string())?;
        Ok(FedAggregate {
            step: fed.step,
            tail_sha256: sha,
            sites: provenance.sites,
            cases: provenance.cases,
            tail_bytes: size,
        })
    }

    /// The models of a study a cross-eval round scores: Model_S (the study's base), each
    /// target's Model_ST from the latest completed transfer round over that base (its
    /// uploaded tail, or, where the site kept it, a reference to the site's own copy that
    /// only that site gets), and Model_FT of the latest completed federated round over it.
    pub(super) fn study_models(&self, study: &StudyRecord) -> SResult<Vec<pb::EvalModel>> {
        if study.base_sha256.is_empty() {
            return Ok(Vec::new());
        }
        let base_sha = study.base_sha256.clone();
        let base = self.model_ref(&base_sha)?;
        let mut out = vec![pb::EvalModel {
            label: crate::report::MODEL_S.into(),
            base: Some(base.clone()),
            shared: true,
            ..Default::default()
        }];
        let mut rounds: Vec<RoundRecord> = self
            .store
            .rounds()?
            .into_iter()
            .filter(|r| {
                r.study == study.name
                    && r.state == RoundState::Completed
                    && r.base_sha256.as_deref() == Some(base_sha.as_str())
            })
            .collect();
        rounds.sort_by_key(|r| std::cmp::Reverse((r.created_millis(), r.id.clone())));
        let transfer = rounds.iter().find(|r| {
            pb::TaskSpec::decode(r.spec.as_slice()).is_ok_and(|s| s.template == "transfer")
        });
        if let Some(round) = transfer {
            let mut tasks = self.store.round_tasks(round)?;
            tasks.sort_by(|a, b| a.site.cmp(&b.site));
            for t in tasks.iter().filter(|t| !t.source && t.state == TaskState::Succeeded) {
                let Some(bytes) = self.store.result(&t.id)? else { continue };
                let Ok(result) = pb::TaskResult::decode(bytes.as_slice()) else { continue };
                let Some((i, arm)) = result.arms.iter().enumerate().rev().find(|(_, a)| {
                    a.spec.as_ref().is_some_and(|s| s.kind == pb::ArmKind::Finetune as i32)
                }) else {
                    continue;
                };
                let label = format!("{}/{}", crate::report::MODEL_ST, t.site);
                let tail = t.uploads.get(&(i as u32)).map(|sha| self.model_ref(sha)).transpose()?;
                out.push(pb::EvalModel {
                    label,
                    base: Some(base.clone()),
                    shared: tail.is_some(),
                    tail,
                    owner: t.site.clone(),
                    local_task_id: t.id.clone(),
                    local_arm: i as u32,
                    weights_sha256: arm.weights_sha256.clone(),
                    local_bn_round: String::new(),
                });
            }
        }
        if let Some(round) = rounds.iter().find(|r| r.fed.is_some())
            && let Some(fed) = &round.fed
            && let Some(last) = fed.aggregates.last()
        {
            out.push(pb::EvalModel {
                label: crate::report::MODEL_FT.into(),
                base: Some(base),
                tail: Some(self.model_ref(&last.tail_sha256)?),
                shared: true,
                local_bn_round: if fed.keep_local_bn { round.id.clone() } else { String::new() },
                ..Default::default()
            });
        }
        Ok(out)
    }
}
