//! `SiteService`: what site certificates may call.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use proto::limits;
use proto::pb::{self, site_service_server::SiteService};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{
    Coordinator, Feed, ServiceError, check_result, identity_of, now_ms, now_s, reason_name,
};
use crate::rounds;
use crate::store::{RoundState, SiteRecord, TaskRecord, TaskState};

// === impl SiteService ===

/// `SiteService` over a shared coordinator.
#[derive(Clone, Debug)]
pub struct SiteApi(pub Arc<Coordinator>);

type ChunkStream = super::FedStream<pb::ModelChunk>;

#[tonic::async_trait]
impl SiteService for SiteApi {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let body = req.into_inner();
        let _w = c.write.lock().await;
        let mut site = c.store.site(&id.name)?.unwrap_or_else(|| {
            tracing::info!(site = %id.name, "new site registered; it gets tasks once approved");
            SiteRecord { name: id.name.clone(), ..Default::default() }
        });
        site.last_seen = now_s();
        site.cert_not_after = id.not_after;
        site.fingerprint = id.fingerprint.clone();
        site.serial = id.serial.clone();
        site.capabilities = body.capabilities.map(|m| m.encode_to_vec()).unwrap_or_default();
        site.dataset = body.dataset.map(|m| m.encode_to_vec()).unwrap_or_default();
        site.agent_version =
            body.agent_version.chars().filter(|ch| ch.is_ascii_graphic()).take(64).collect();
        c.store.put_site(&site)?;
        drop(_w);
        c.store.flush().await?;
        Ok(Response::new(pb::HelloResponse {
            site: id.name,
            approved: site.approved,
            certificate_days_left: (id.not_after - now_s()) / 86_400,
        }))
    }

    async fn next_task(
        &self,
        req: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let site = c.store.site(&id.name)?;
        if !site.as_ref().is_some_and(|s| s.approved) {
            return Err(ServiceError::FailedPrecondition(format!(
                "site \"{}\" is not approved; the study lead runs `coordinator site approve {}`",
                id.name, id.name
            ))
            .into());
        }
        let wait = req.get_ref().wait_seconds.min(c.limits.max_poll_seconds);
        let until = tokio::time::Instant::now() + Duration::from_secs(u64::from(wait));
        let waker = c.waker(&id.name);
        loop {
            // Registered before looking, so a task made pending meanwhile is not missed.
            let woken = waker.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(task) = c.lease_next(&id.name).await? {
                return Ok(Response::new(pb::NextTaskResponse { task: Some(task) }));
            }
            if tokio::time::timeout_at(until, woken).await.is_err() {
                return Ok(Response::new(pb::NextTaskResponse { task: None }));
            }
        }
    }

    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let id = identity_of(&req)?;
        let c = self.0.clone();
        let pb::FetchModelRequest { sha256, offset } = req.into_inner();
        // A site may fetch a model only while it holds a task that uses it; the bytes sent
        // are counted on that task.
        let mut holder = None;
        for task_id in c.store.open_tasks_of_site(&id.name)? {
            let Some(t) = c.store.task(&task_id)? else { continue };
            if matches!(t.state, TaskState::Leased { .. })
                && c.store
                    .round(&t.round_id)?
                    .is_some_and(|r| rounds::task_view(&r, &t).models().contains(&sha256))
            {
                holder = Some(t);
                break;
            }
        }
        let Some(holder) = holder.map(|t| t.id) else {
            return Err(ServiceError::PermissionDenied(format!(
                "site \"{}\" holds no task that uses model {sha256}",
                id.name
            ))
            .into());
        };
        let (path, total) = c.verified_blob(&sha256).await?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| ServiceError::Io { path: path.clone(), source })?;
        if offset > total {
            return Err(ServiceError::InvalidArgument(format!(
                "offset {offset} is past the end of model {sha256} ({total} bytes)"
            ))
            .into());
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|source| ServiceError::Io { path: path.clone(), source })?;
        // One chunk queued ahead of the one being sent: a download costs a few chunks of
        // memory whatever the model's size, and a cut one leaves little read for nothing.
        let (feed, stream) = Feed::new(c.limits.idle_seconds, 1);
        tokio::spawn(async move {
            let mut pos = offset;
            let mut buf = vec![0u8; limits::CHUNK_BYTES];
            while pos < total {
                let n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        feed.send(Err(Status::unavailable(format!("reading the model: {e}"))))
                            .await;
                        return;
                    }
                };
                let chunk =
                    pb::ModelChunk { offset: pos, data: buf[..n].to_vec(), total_size: total };
                if !feed.send(Ok(chunk)).await {
                    break; // the site went away or stopped reading
                }
                pos += n as u64;
            }
            c.note_bytes(&holder, pos - offset, 0).await;
        });
        Ok(Response::new(stream))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let body = req.into_inner();
        let w = c.write.lock().await;
        let (mut task, round) = c.owned_task(&id.name, &body.task_id)?;
        let lease = c.limits.lease_seconds;
        let current =
            matches!(task.state, TaskState::Leased { .. }) && task.attempt == body.attempt;
        if !current || round.state != RoundState::Running {
            return Ok(Response::new(pb::HeartbeatResponse { lease_seconds: 0, stop: true }));
        }
        task.state = TaskState::Leased { deadline_ms: now_ms() + i64::from(lease) * 1000 };
        if let Some(p) = body.progress {
            task.progress = p.encode_to_vec();
        }
        c.store.commit(None, &[&task], None)?;
        drop(w);
        c.durable().await?;
        Ok(Response::new(pb::HeartbeatResponse { lease_seconds: lease, stop: false }))
    }

    async fn get_audit_anchor(
        &self,
        req: Request<pb::AuditAnchorRequest>,
    ) -> Result<Response<pb::AuditAnchor>, Status> {
        let who = identity_of(&req)?;
        let anchor = match self.0.store.audit_anchor(&who.name)? {
            Some(a) => pb::AuditAnchor {
                present: true,
                seq: a.seq,
                head: a.head,
                recorded_unix: a.recorded,
            },
            None => pb::AuditAnchor::default(),
        };
        Ok(Response::new(anchor))
    }

    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let who = identity_of(&req)?;
        Ok(Response::new(super::records::ping(&self.0, who.name)?))
    }

    async fn submit_result(
        &self,
        req: Request<pb::SubmitResultRequest>,
    ) -> Result<Response<pb::SubmitResultResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let body = req.into_inner();
        let _w = c.write.lock().await;
        let (mut task, mut round) = c.owned_task(&id.name, &body.task_id)?;
        if task.state.is_final() {
            // A retried submission (or a late one from an earlier lease): counted once.
            return Ok(Response::new(pb::SubmitResultResponse { recorded: false }));
        }
        if body.attempt == 0 || body.attempt > task.attempt {
            return Err(ServiceError::InvalidArgument(format!(
                "attempt {} of task {} was never leased",
                body.attempt, task.id
            ))
            .into());
        }
        let mut result_bytes = None;
        match body.outcome {
            Some(pb::submit_result_request::Outcome::Result(r)) => {
                check_result(&r)?;
                if task.source {
                    // Model_S (the source's one arm) must have arrived (UploadModel) before
                    // the source's result.
                    let sha = r.arms.last().map(|a| a.weights_sha256.clone()).unwrap_or_default();
                    let uploaded = c.store.model(&sha)?;
                    if sha.is_empty() || uploaded.is_none() {
                        return Err(ServiceError::FailedPrecondition(format!(
                            "task {} trains Model_S: upload its weights ({sha}) before the result",
                            task.id
                        ))
                        .into());
                    }
                    round.base_sha256 = Some(sha);
                }
                // Tails the result says were shared must have arrived first; a federated
                // step's result is its tail.
                for (i, arm) in r.arms.iter().enumerate() {
                    let uploaded = task.uploads.get(&(i as u32));
                    if !arm.tail_sha256.is_empty() && uploaded != Some(&arm.tail_sha256) {
                        return Err(ServiceError::FailedPrecondition(format!(
                            "task {}: upload arm {i}'s tail ({}) before the result",
                            task.id, arm.tail_sha256
                        ))
                        .into());
                    }
                }
                if round.fed.is_some() && r.arms.get(1).is_none_or(|a| a.tail_sha256.is_empty()) {
                    return Err(ServiceError::InvalidArgument(format!(
                        "task {} is a federated step: its result is the scored model (arm 0) \
                         and the trained tail (arm 1)",
                        task.id
                    ))
                    .into());
                }
                result_bytes = Some(r.encode_to_vec());
                task.state = TaskState::Succeeded;
            }
            Some(pb::submit_result_request::Outcome::Failure(code)) => {
                let code = pb::FailureCode::try_from(code).unwrap_or(pb::FailureCode::Unspecified);
                task.state = if code == pb::FailureCode::AgentShutdown {
                    // Released, not failed: the lease does not count as an attempt.
                    task.attempt -= 1;
                    TaskState::Pending
                } else {
                    TaskState::Failed { reason: reason_name(code.as_str_name(), "FAILURE_CODE_") }
                };
            }
            Some(pb::submit_result_request::Outcome::Refusal(code)) => {
                let code = pb::RefusalCode::try_from(code).unwrap_or(pb::RefusalCode::Unspecified);
                let mut reason = reason_name(code.as_str_name(), "REFUSAL_CODE_");
                let detail = refusal_detail(&body.refusal_detail);
                if !detail.is_empty() {
                    reason = format!("{reason}: {detail}");
                }
                task.state = TaskState::Refused { reason };
            }
            None => {
                return Err(
                    ServiceError::InvalidArgument("a submission needs an outcome".into()).into()
                );
            }
        }
        // The round's other tasks are read only where they may change with this one: a
        // source's outcome releases the targets, a federated step is judged whole, and the
        // round settles when this was its last unfinished task. Otherwise this task alone is
        // written (a round of a thousand sites does not read a thousand tasks per result).
        let whole = task.source
            || round.fed.is_some()
            || !c.store.round_has_open_tasks(&round.id, &task.id)?;
        let mut tasks = if whole { c.store.round_tasks(&round)? } else { Vec::new() };
        if let Some(t) = tasks.iter_mut().find(|t| t.id == task.id) {
            *t = task.clone();
        }
        // A source's outcome releases (or fails) the targets waiting for Model_S.
        let released = rounds::release_waiting(&round, &mut tasks);
        let settled = whole && rounds::settle(&mut round, &tasks);
        let changed: Vec<&TaskRecord> = if released { tasks.iter().collect() } else { vec![&task] };
        c.store.commit(
            (settled || task.source).then_some(&round),
            &changed,
            result_bytes.as_deref().map(|b| (task.id.as_str(), b)),
        )?;
        if task.source
            && let Some(sha) = &round.base_sha256
            && let Some(mut study) = c.store.study(&round.study)?
            && study.base_sha256.is_empty()
        {
            // The study's first Model_S becomes its base model for later rounds.
            study.base_sha256 = sha.clone();
            c.store.put_study(&study)?;
        }
        drop(_w);
        c.durable().await?;
        tracing::info!(task = %task.id, site = %id.name, state = ?task.state, "result recorded");
        if round.fed.is_some() {
            // The step may be done: average now rather than at the next tick.
            c.advance_federated().await?;
        }
        Ok(Response::new(pb::SubmitResultResponse { recorded: true }))
    }

    async fn upload_model(
        &self,
        req: Request<Streaming<pb::UploadModelRequest>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::UploadModelRequest {
                part: Some(pb::upload_model_request::Part::Header(h)),
            })) => h,
            Some(Err(s)) => {
                return Err(ServiceError::InvalidArgument(format!("upload: {s}")).into());
            }
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "an upload starts with its header".into(),
                )
                .into());
            }
        };
        let model = header.model.clone().unwrap_or_default();
        // Only the lessee of a task that uploads (a source's Model_S, a federated step's
        // tail, a shared Model_ST's tail), whose own policy (as its Hello said) shares
        // weights, may upload, and only before the task's result.
        let (expect, round, sent_before) = {
            let (task, round) = c.owned_task(&id.name, &header.task_id)?;
            let leased = matches!(task.state, TaskState::Leased { .. })
                && task.attempt == header.attempt
                && round.state == RoundState::Running;
            let expect = rounds::upload_expected(&round, &task, header.arm);
            let Some(expect) = expect.filter(|_| leased) else {
                return Err(ServiceError::PermissionDenied(format!(
                    "task {} (attempt {}, arm {}) is not a task leased to \"{}\" that uploads \
                     that arm's weights; nothing to upload",
                    header.task_id, header.attempt, header.arm, id.name
                ))
                .into());
            };
            let site = c.store.site(&id.name)?.unwrap_or_default();
            let shares = pb::Capabilities::decode(site.capabilities.as_slice())
                .map(|cap| cap.share_weights)
                .unwrap_or(false);
            if !shares {
                return Err(ServiceError::PermissionDenied(format!(
                    "site \"{}\" said in its hello that its policy does not share weights",
                    id.name
                ))
                .into());
            }
            (expect, round, task.uploads)
        };
        let sha = model.sha256.to_ascii_lowercase();
        let (record, received) = match c.store.model(&sha)? {
            // A retried upload of what this task sent before. (Bytes another party sent are
            // received again: naming a stored sha256 is not proof of having the weights.)
            Some(m) if expect.fits(&m) && sent_before.values().any(|s| s == &sha) => (m, 0),
            Some(m) if !expect.fits(&m) => {
                return Err(ServiceError::InvalidArgument(format!(
                    "model {sha} is stored already, and it is not what task {} uploads",
                    header.task_id
                ))
                .into());
            }
            _ => {
                // A tail is checked against its base model's header, read from its blob.
                let base = match &expect {
                    rounds::Upload::Tail { .. } => {
                        let base = round.base_sha256.clone().unwrap_or_default();
                        let path = c.blob_path(&base);
                        let header = std::fs::File::open(&path)
                            .map_err(|source| ServiceError::Io { path: path.clone(), source })
                            .and_then(|mut f| {
                                shared::weights::read_header(&mut f).map_err(|e| {
                                    ServiceError::DataLoss(format!(
                                        "the coordinator's copy of base model {base} does not \
                                         read ({e}); the study lead must push it again"
                                    ))
                                })
                            })?;
                        Some((base, header))
                    }
                    rounds::Upload::Full => None,
                };
                let check = |m: &shared::weights::Inspected| -> Result<(), String> {
                    match (&expect, &base) {
                        (rounds::Upload::Tail { layers, .. }, Some((sha, b))) => {
                            rounds::fedavg::check_tail_header(m, b, sha, *layers as usize)
                                .map_err(|e| e.to_string())
                        }
                        _ if m.header.manifest.tail.is_some() => {
                            Err("a tail where the full Model_S was expected".into())
                        }
                        _ => Ok(()),
                    }
                };
                let name = expect.name(&header.task_id, header.arm);
                let record = c
                    .receive_blob(
                        name,
                        &model,
                        stream,
                        |m| match m.part {
                            Some(pb::upload_model_request::Part::Chunk(c)) => Some(c),
                            _ => None,
                        },
                        base.is_some(),
                        &check,
                    )
                    .await?;
                let size = record.size;
                (record, size)
            }
        };
        let _w = c.write.lock().await;
        c.store.put_model(&record)?;
        let (mut task, _) = c.owned_task(&id.name, &header.task_id)?;
        task.uploads.insert(header.arm, record.sha256.clone());
        task.bytes_up += received;
        c.store.commit(None, &[&task], None)?;
        c.store.flush().await?;
        tracing::info!(site = %id.name, task = %header.task_id, arm = header.arm, sha256 = %record.sha256, bytes = record.size, "weights uploaded");
        Ok(Response::new(super::model_info(&record)))
    }
}

/// Most characters of a site's refusal detail that are kept.
const MAX_REFUSAL_DETAIL: usize = 300;

/// A site's refusal detail as stored and shown: one line of printable characters, cut at
/// [`MAX_REFUSAL_DETAIL`] (the agent writes a sentence; a hostile one gets no more room).
fn refusal_detail(raw: &str) -> String {
    let one_line: String = raw
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REFUSAL_DETAIL)
        .collect();
    one_line.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_detail_is_one_bounded_line() {
        assert_eq!(
            refusal_detail("  the task asks 5000 epochs\n; max 200\u{7}  "),
            "the task asks 5000 epochs ; max 200"
        );
        assert_eq!(refusal_detail(&"x".repeat(10_000)).len(), MAX_REFUSAL_DETAIL);
        assert_eq!(refusal_detail(""), "");
    }
}
