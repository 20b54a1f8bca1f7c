//! The authorization matrix: every RPC of both services, called as every kind of identity,
//! is allowed or refused exactly as DESIGN.md says.
//!
//! "allowed" means the call got past authorization (its answer may still be NotFound or
//! InvalidArgument for the dummy request); "denied" is PermissionDenied or Unauthenticated;
//! "unapproved" is FailedPrecondition for a site the study lead has not approved; "no TLS"
//! means the handshake failed and no RPC ran.

use std::collections::BTreeMap;

use coordinator::identity::Role;
use proto::pb;
use proto::pb::admin_service_client::AdminServiceClient;
use proto::pb::site_service_client::SiteServiceClient;
use tests::federation::Federation;
use tonic::transport::Channel;

type R = anyhow::Result<()>;

const SITE_RPCS: [&str; 7] = [
    "Hello",
    "NextTask",
    "FetchModel",
    "Heartbeat",
    "SubmitResult",
    "UploadModel",
    "GetAuditAnchor",
];
const ADMIN_RPCS: [&str; 14] = [
    "PushModel",
    "ListModels",
    "ListSites",
    "ApproveSite",
    "RevokeSite",
    "CreateStudy",
    "ListStudies",
    "StartRound",
    "GetRound",
    "ListRounds",
    "WatchRound",
    "CancelRound",
    "GetResults",
    "GetStudyResults",
];

fn outcome<T>(r: Result<T, tonic::Status>) -> &'static str {
    match r {
        Ok(_) => "allowed",
        Err(s) => match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => "denied",
            tonic::Code::FailedPrecondition if s.message().contains("approve") => "unapproved",
            // A handler's own Unavailable (its storage failing) says so; otherwise these mean
            // the connection failed: a refused handshake shows up as a transport error or as
            // the call being cancelled.
            tonic::Code::Unavailable
                if s.message().contains("cannot write") || s.message().contains("reading the") =>
            {
                "allowed"
            }
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => "no TLS",
            _ => "allowed",
        },
    }
}

/// What the calls refer to: site-a's leased task and the study's base model, so that an
/// approved site's calls are about its own work and everyone else's about someone else's.
struct Target {
    task_id: String,
    attempt: u32,
    model: pb::ModelRef,
}

async fn call_all(ch: Channel, t: &Target) -> BTreeMap<&'static str, &'static str> {
    let mut site = SiteServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch);
    let round = || pb::RoundRequest { round_id: "r-none".into() };
    let mut out = BTreeMap::new();
    out.insert("Hello", outcome(site.hello(pb::HelloRequest::default()).await));
    out.insert("NextTask", outcome(site.next_task(pb::NextTaskRequest { wait_seconds: 0 }).await));
    out.insert(
        "FetchModel",
        outcome(
            site.fetch_model(pb::FetchModelRequest { sha256: t.model.sha256.clone(), offset: 0 })
                .await,
        ),
    );
    out.insert("GetAuditAnchor", outcome(site.get_audit_anchor(pb::AuditAnchorRequest {}).await));
    out.insert(
        "Heartbeat",
        outcome(
            site.heartbeat(pb::HeartbeatRequest {
                task_id: t.task_id.clone(),
                attempt: t.attempt,
                progress: None,
            })
            .await,
        ),
    );
    out.insert(
        "SubmitResult",
        outcome(
            // No outcome: refused as invalid once past authorization, so nothing is recorded.
            site.submit_result(pb::SubmitResultRequest {
                task_id: t.task_id.clone(),
                attempt: t.attempt,
                outcome: None,
                ..Default::default()
            })
            .await,
        ),
    );
    let header = pb::UploadModelRequest {
        part: Some(pb::upload_model_request::Part::Header(pb::UploadHeader {
            task_id: t.task_id.clone(),
            attempt: t.attempt,
            model: Some(pb::ModelRef { sha256: "0".repeat(64), size: 1, name: "m".into() }),
            arm: 0,
        })),
    };
    out.insert("UploadModel", outcome(site.upload_model(tokio_stream::iter([header])).await));
    let push = pb::PushModelRequest {
        part: Some(pb::push_model_request::Part::Header(pb::ModelRef {
            sha256: "0".repeat(64),
            size: 1,
            name: "m".into(),
        })),
    };
    out.insert("PushModel", outcome(admin.push_model(tokio_stream::iter([push])).await));
    out.insert("ListModels", outcome(admin.list_models(pb::ListModelsRequest {}).await));
    out.insert("ListSites", outcome(admin.list_sites(pb::ListSitesRequest {}).await));
    // Approving an already approved site and revoking an unknown one change nothing.
    out.insert(
        "ApproveSite",
        outcome(
            admin
                .approve_site(pb::SiteRequest { name: "site-a".into(), ..Default::default() })
                .await,
        ),
    );
    out.insert(
        "RevokeSite",
        outcome(
            admin
                .revoke_site(pb::SiteRequest { name: "nobody".into(), ..Default::default() })
                .await,
        ),
    );
    out.insert("CreateStudy", outcome(admin.create_study(pb::CreateStudyRequest::default()).await));
    out.insert("ListStudies", outcome(admin.list_studies(pb::ListStudiesRequest {}).await));
    out.insert("StartRound", outcome(admin.start_round(pb::StartRoundRequest::default()).await));
    out.insert("GetRound", outcome(admin.get_round(round()).await));
    out.insert("ListRounds", outcome(admin.list_rounds(pb::ListRoundsRequest::default()).await));
    out.insert("WatchRound", outcome(admin.watch_round(round()).await));
    out.insert("CancelRound", outcome(admin.cancel_round(round()).await));
    out.insert("GetResults", outcome(admin.get_results(round()).await));
    out.insert(
        "GetStudyResults",
        outcome(admin.get_study_results(pb::StudyRequest { name: "none".into() }).await),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_for_every_identity() -> R {
    let fed = Federation::builder().sites(3).without_agents().start().await?;
    fed.study("authz", "tiny").await?;
    fed.start_round(
        "authz",
        pb::TaskSpec { kind: pb::TaskKind::Evaluate as i32, ..Default::default() },
    )
    .await?;
    let task = tests::federation::site_link(&fed, "site-a")
        .await?
        .next_task(2)
        .await?
        .expect("site-a's task");
    let target = Target {
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        model: task.base.clone().expect("the study's base model"),
    };
    let pki = coordinator::pki::Pki::open(&fed.pki_dir)?;
    // Identities beyond the harness's admin and approved sites.
    let unapproved = pki.issue(Role::Site, "site-z", 30)?;
    let expired = pki.issue(Role::Site, "site-x", -1)?;
    fed.admin()
        .await?
        .revoke_site(pb::SiteRequest { name: "site-b".into(), ..Default::default() })
        .await?;
    let other = coordinator::pki::Pki::init(&fed.root.join("other-pki"), &["localhost".into()])?
        .issue(Role::Site, "site-a", 30)?;
    let identities: Vec<(&str, Option<std::path::PathBuf>)> = vec![
        ("admin", Some(fed.bundle(Role::Admin, "lead"))),
        ("approved site", Some(fed.bundle(Role::Site, "site-a"))),
        ("unapproved site", Some(unapproved)),
        ("revoked site", Some(fed.bundle(Role::Site, "site-b"))),
        ("other CA", Some(other)),
        ("no client certificate", None),
        ("expired certificate", Some(expired)),
    ];

    let (mut checked, mut mismatches) = (0, 0);
    let mut table = String::new();
    for (who, bundle) in &identities {
        let got = call_all(fed.channel(bundle.as_deref()), &target).await;
        for rpc in SITE_RPCS.iter().chain(&ADMIN_RPCS) {
            let want = expected(who, rpc);
            let have = got.get(rpc).copied().unwrap_or("missing");
            table.push_str(&format!("{who:<22} {rpc:<16} {have}\n"));
            if have != want {
                table.push_str(&format!("    ^ expected {want}\n"));
                mismatches += 1;
            }
            checked += 1;
        }
    }
    assert_eq!(mismatches, 0, "{mismatches} unexpected outcomes:\n{table}");
    assert_eq!(checked, 7 * 21);
    eprintln!("authorization matrix: {checked} identity x RPC pairs as expected");

    // The agent with the expired certificate does not dial: it stops with what to do.
    let mut cfg = fed.site_config("site-a")?;
    cfg.tls.bundle = fed.bundle(Role::Site, "site-x");
    cfg.storage.dir = fed.root.join("site-x-agent");
    let err = site_agent::agent::run(cfg, std::future::pending())
        .await
        .expect_err("an expired certificate stops the agent");
    let msg = err.to_string();
    assert!(
        msg.contains("expired on") && msg.contains("pki sign") && msg.contains("site-x"),
        "{msg}"
    );
    fed.shutdown().await
}

fn expected(who: &str, rpc: &str) -> &'static str {
    let site_rpc = SITE_RPCS.contains(&rpc);
    match who {
        "admin" => {
            if site_rpc {
                "denied"
            } else {
                "allowed"
            }
        }
        // Uploading weights is for the lessee of a transfer-source task whose policy shares
        // them (federation::weights_leave_a_site_only_where_its_policy_shares_them); site-a's
        // task here is an evaluation.
        "approved site" => match rpc {
            "UploadModel" => "denied",
            _ if site_rpc => "allowed",
            _ => "denied",
        },
        // Hello registers it and says it waits for approval; asking for work says so too; the
        // calls about another site's task or a model it holds no task for are denied.
        "unapproved site" => match rpc {
            // Its own audit head: nothing about another site or a task.
            "Hello" | "GetAuditAnchor" => "allowed",
            "NextTask" => "unapproved",
            _ => "denied",
        },
        "revoked site" => "denied",
        _ => "no TLS",
    }
}
