//! What the coordinator refuses over real mTLS: another CA's certificate, a revoked site, a site
//! touching another site's task or result, a site certificate on the admin service, an
//! unapproved site.

use coordinator::identity::Role;
use proto::pb;
use tests::federation::{Federation, site_link};

use crate::federation::evaluate;

type R = anyhow::Result<()>;

/// What the coordinator refuses: another CA's certificate, a revoked site, a site touching
/// another site's task or result, a site certificate on the admin service, an unapproved
/// site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() -> R {
    let fed = Federation::builder().sites(3).without_agents().start().await?;
    fed.study("refusals", "tiny").await?;
    fed.start_round("refusals", evaluate()).await?;

    // A certificate from another consortium's CA: the TLS handshake fails.
    let other = coordinator::pki::Pki::init(&fed.root.join("other-pki"), &["localhost".into()])?;
    let stranger = other.issue(Role::Site, "site-a", 30)?;
    let mut conn = fed.conn(Role::Site, "site-a");
    conn.bundle = stranger;
    // The stranger trusts the real CA (so the server is accepted) but presents its own cert.
    std::fs::copy(fed.pki_dir.join("ca.pem"), conn.bundle.join("ca.pem"))?;
    let err = coordinator::lead::connect(&conn).await;
    let refused = match err {
        Err(_) => true,
        Ok(mut c) => c.list_sites(pb::ListSitesRequest {}).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");

    // site-a leases its task; site-b may neither heartbeat it nor submit its result.
    let mut a = site_link(&fed, "site-a").await?;
    let task = a.next_task(2).await?.expect("task");
    let mut b = site_link(&fed, "site-b").await?;
    let hb = b
        .heartbeat(pb::HeartbeatRequest {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            progress: None,
        })
        .await;
    assert_code(hb.map(|_| ()), tonic::Code::PermissionDenied, "heartbeat on another site's task");
    let submit = b
        .submit(pb::SubmitResultRequest {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            outcome: Some(pb::submit_result_request::Outcome::Result(pb::TaskResult::default())),
            ..Default::default()
        })
        .await;
    assert_code(
        submit.map(|_| ()),
        tonic::Code::PermissionDenied,
        "submitting another site's result",
    );
    // site-b may not fetch a model it holds no task for... it holds one, so use a wrong hash.
    let fetch = b
        .fetch_model(
            &pb::ModelRef { sha256: "0".repeat(64), size: 1, name: "x".into() },
            &fed.root.join("b"),
            None,
            &mut |_, _| {},
        )
        .await;
    assert_code(fetch.map(|_| ()), tonic::Code::PermissionDenied, "fetching a model of no task");

    // A site certificate on the admin service.
    let mut as_admin = coordinator::lead::connect(&fed.conn(Role::Site, "site-a")).await?;
    let r = as_admin.list_sites(pb::ListSitesRequest {}).await;
    assert_eq!(r.expect_err("site on admin").code(), tonic::Code::PermissionDenied);

    // An unapproved site: a fresh bundle that the study lead has not approved.
    coordinator::pki::Pki::open(&fed.pki_dir)?.issue(Role::Site, "site-z", 30)?;
    let mut cfg = fed.site_config("site-a")?;
    cfg.tls.bundle = fed.bundle(Role::Site, "site-z");
    let audit = site_agent::agent::audit::AuditLog::open(&fed.root.join("z-audit"))?;
    let mut z = site_agent::agent::Link::connect(&cfg, audit).await?;
    let hello = z.hello(pb::HelloRequest::default()).await?;
    assert!(!hello.approved);
    assert_code(
        z.next_task(1).await.map(|_| ()),
        tonic::Code::FailedPrecondition,
        "unapproved site",
    );

    // A revoked site: by the study lead through the admin API, and by `pki revoke`.
    fed.admin()
        .await?
        .revoke_site(pb::SiteRequest { name: "site-b".into(), ..Default::default() })
        .await?;
    assert_code(
        b.next_task(1).await.map(|_| ()),
        tonic::Code::PermissionDenied,
        "site revoked by the admin API",
    );
    coordinator::pki::Pki::open(&fed.pki_dir)?.revoke(Role::Site, "site-c")?;
    let mut c = {
        // The revoked bundle was archived by `revoke`; find it.
        let sites = fed.pki_dir.join("sites");
        let archived = std::fs::read_dir(&sites)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("site-c.revoked"))
            })
            .expect("archived bundle");
        let mut cfg = fed.site_config("site-a")?;
        cfg.tls.bundle = archived;
        let audit = site_agent::agent::audit::AuditLog::open(&fed.root.join("c-audit"))?;
        (site_agent::agent::Link::connect(&cfg, audit).await?, cfg)
    };
    // A certificate on the CA's CRL is refused at the handshake (TLS 1.3: the client hears it
    // at its first request), and the agent's diagnosis names the alert.
    let refused = c.0.hello(pb::HelloRequest::default()).await.expect_err("on the CRL");
    let why = refused.diagnose(&c.1).await.unwrap_or_default();
    assert!(why.contains("CertificateRevoked"), "certificate on the CRL: {refused}: {why}");
    fed.shutdown().await
}

fn assert_code(r: Result<(), site_agent::agent::CallError>, code: tonic::Code, what: &str) {
    match r {
        Err(site_agent::agent::CallError::Status(s)) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message())
        }
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}
