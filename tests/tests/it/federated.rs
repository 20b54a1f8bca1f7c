//! Federated fine-tuning of the tail over real mTLS on 127.0.0.1: a transfer round whose
//! targets share their Model_ST tails (one site's policy does not), FedAvg of the tails over
//! the sharing targets, and the cross-site matrix; the bytes each task moved; and a
//! coordinator killed between federated steps.

use coordinator::lead::templates::{self, FedOptions, Template, TemplateOptions};
use coordinator::report;
use proto::pb;
use site_agent::data::phantom::Center;
use tests::federation::Federation;

type R = anyhow::Result<()>;

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn tiny(k: u32, seed: u64) -> TemplateOptions {
    TemplateOptions {
        trainable_layers: vec![k],
        epochs: env("FT_T", 6),
        finetune_epochs: env("FT_ST", 20),
        learning_rate: 1e-2,
        finetune_learning_rate: 1e-2,
        batch_size: 8,
        seed,
        config: "tiny".into(),
        ..Default::default()
    }
}

async fn start(
    fed: &Federation,
    study: &str,
    spec: pb::TaskSpec,
    source: Option<pb::TaskSpec>,
    sites: &[&str],
    quorum: u32,
) -> anyhow::Result<pb::RoundInfo> {
    let r = fed
        .admin()
        .await?
        .start_round(pb::StartRoundRequest {
            study: study.into(),
            spec: Some(spec),
            source_site: if source.is_some() { "site-a".into() } else { String::new() },
            source_spec: source,
            sites: sites.iter().map(|s| s.to_string()).collect(),
            quorum,
            ..Default::default()
        })
        .await?
        .into_inner();
    let info = fed.wait_round(&r.round_id, 400).await?;
    assert_eq!(info.state, pb::RoundState::Completed as i32, "{info:?}");
    Ok(info)
}

fn task<'a>(info: &'a pb::RoundInfo, site: &str, step: u32) -> &'a pb::TaskInfo {
    info.tasks.iter().find(|t| t.site == site && t.fed_step == step).expect("the site's task")
}

/// A source and three targets (target-a protocol); site-d's policy does not share weights.
/// Transfer: b and c upload only their Model_ST tails, d uploads nothing. FedAvg (k = 2, 20
/// steps of one epoch) over b, c, d: d refuses, b and c average; the base model is not downloaded again
/// (the sites have it from the transfer round) and a step moves tails only, under a fifth of
/// a full-model step. Cross-eval: every site scores Model_S, the shared Model_ST and
/// Model_FT; Model_ST/site-d only at site-d, its other cells absent with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_travel_average_and_every_model_meets_every_site() -> R {
    let mut fed = Federation::builder()
        .centers(vec![
            (Center::Source, 4, 1),
            (Center::TargetA, 5, 3),
            (Center::TargetA, 5, 3),
            (Center::TargetA, 5, 3),
        ])
        .without_agents()
        .start()
        .await?;
    for (i, name) in fed.sites.clone().iter().enumerate() {
        let mut cfg = fed.site_config(name)?;
        cfg.policy.share_weights = i != 3;
        fed.start_agent_with(name, cfg)?;
    }
    let mut admin = fed.admin().await?;
    // Every agent said hello, so approval finds each site.
    for s in &fed.sites {
        loop {
            if admin
                .approve_site(pb::SiteRequest { name: s.clone(), ..Default::default() })
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    admin
        .create_study(pb::CreateStudyRequest {
            name: "fl".into(),
            base_model: String::new(),
            sites: fed.sites.clone(),
        })
        .await?;

    // 1. Transfer: Model_S at the source, Model_T and Model_ST at each target.
    let o = tiny(2, env("FT_SEED", 17) as u64);
    let transfer = start(
        &fed,
        "fl",
        templates::target_spec(Template::Transfer, &o).map_err(anyhow::Error::msg)?,
        Some(templates::source_spec(&o, env("FT_S", 24))),
        &[],
        0,
    )
    .await?;
    let models = admin.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
    let model_s = models.iter().find(|m| m.tail_of.is_empty()).expect("Model_S").clone();
    let full = model_s.model.as_ref().expect("ref").size;
    let results = fed.results(&transfer.round_id).await?;
    for site in ["site-b", "site-c", "site-d"] {
        let res = results.results.iter().find(|r| r.site == site).and_then(|r| r.result.as_ref());
        let st = &res.expect("result").arms[2];
        let t = task(&transfer, site, 0);
        if site == "site-d" {
            assert!(st.tail_sha256.is_empty(), "site-d's policy keeps Model_ST");
            assert_eq!(t.bytes_up, 0, "site-d uploaded nothing");
        } else {
            let tail = models
                .iter()
                .find(|m| m.model.as_ref().is_some_and(|r| r.sha256 == st.tail_sha256))
                .expect("the shared tail is stored");
            assert_eq!(tail.tail_of, model_s.model.as_ref().unwrap().sha256);
            assert_eq!(tail.tail_layers, 2);
            assert_eq!(t.bytes_up, tail.model.as_ref().unwrap().size, "only the tail went up");
            assert!(t.bytes_up * 5 < full, "a k = 2 tail of tiny is under a fifth of the model");
        }
        assert_eq!(t.bytes_down, full, "Model_S went down once");
    }

    // 2. FedAvg over the targets: site-d refuses, b and c average.
    // As many local epochs in all (20 steps of 1) as Model_ST trained; one epoch a step keeps
    // the sites' tails close between averages.
    let fo = TemplateOptions { epochs: env("FT_E", 1), ..tiny(2, env("FT_SEED", 17) as u64) };
    let spec =
        templates::fedavg_spec(&fo, FedOptions { rounds: env("FT_R", 20), ..Default::default() })
            .map_err(anyhow::Error::msg)?;
    let fl = start(&fed, "fl", spec, None, &["site-b", "site-c", "site-d"], 2).await?;
    let f = fl.fed.as_ref().expect("federated progress");
    assert_eq!(f.aggregates.len() as u32, env("FT_R", 20));
    for a in &f.aggregates {
        assert_eq!(a.sites, ["site-b", "site-c"]);
        assert_eq!(a.cases, [2, 2], "weighted by training cases");
    }
    let refused = task(&fl, "site-d", 1);
    assert_eq!(refused.state, pb::TaskState::Refused as i32);
    assert!(refused.reason.contains("sharing not allowed"), "{}", refused.reason);
    assert!(fl.tasks.iter().all(|t| t.site != "site-d" || t.fed_step == 1), "asked once");
    let tail_bytes = f.aggregates[0].tail_bytes;
    for site in ["site-b", "site-c"] {
        let (one, two) = (task(&fl, site, 1), task(&fl, site, 2));
        assert_eq!(one.bytes_down, 0, "{site} had Model_S already");
        assert_eq!(two.bytes_down, tail_bytes, "step 2 sends the averaged tail only");
        assert!(two.bytes_up > 0 && two.bytes_up <= tail_bytes + 1024);
        // A full-model FedAvg step moves the model down and up.
        assert!((two.bytes_down + two.bytes_up) * 5 < 2 * full, "{two:?} vs {full}");
    }
    let ft = f.model.as_ref().expect("Model_FT");
    assert_eq!(Some(&ft.sha256), f.aggregates.last().map(|a| &a.tail_sha256));

    // 3. Cross-eval at every site.
    let cross = start(&fed, "fl", templates::cross_eval_spec(), None, &[], 0).await?;
    let results = fed.results(&cross.round_id).await?;
    let labels = |site: &str| -> Vec<String> {
        let r = results.results.iter().find(|r| r.site == site).and_then(|r| r.result.as_ref());
        r.expect("result").arms.iter().map(|a| a.model.clone()).collect()
    };
    let shared = ["Model_S", "Model_ST/site-b", "Model_ST/site-c", "Model_FT"];
    for site in ["site-a", "site-b", "site-c"] {
        assert_eq!(labels(site), shared, "{site}");
    }
    assert_eq!(
        labels("site-d"),
        ["Model_S", "Model_ST/site-b", "Model_ST/site-c", "Model_ST/site-d", "Model_FT"]
    );
    for site in ["site-a", "site-b", "site-c", "site-d"] {
        // Every site has Model_S (the source made it) and gets only the tails it lacks.
        let down = task(&cross, site, 0).bytes_down;
        assert!(down > 0 && down * 5 < full, "{site}: {down} bytes");
    }
    let study = admin.get_study_results(pb::StudyRequest { name: "fl".into() }).await?.into_inner();
    let rep = report::build(&study);
    let m = rep.cross_eval.as_ref().expect("the matrix");
    assert_eq!(m.models.len(), 5);
    assert_eq!(m.sites, ["site-a", "site-b", "site-c", "site-d"]);
    let cells = m.cells.len();
    assert_eq!(cells, 5 * 4 - 3, "one cell per model and site but d's Model_ST elsewhere");
    let absent: Vec<&report::crosseval::AbsentCell> = m.absent.iter().collect();
    assert_eq!(absent.len(), 3);
    assert!(
        absent.iter().all(|a| a.model == "Model_ST/site-d" && a.reason.contains("does not share"))
    );

    // Model_FT against the local Model_STs on the pooled target test cases (9 cases: 3 per
    // target): the mean Dice over organs and cases.
    let mean = |model: &str, own: bool| -> f64 {
        let v: Vec<f64> = rep
            .cases
            .iter()
            .filter(|c| c.template == "cross-eval" && c.site != "site-a")
            .filter(|c| if own { c.arm == format!("Model_ST/{}", c.site) } else { c.arm == model })
            .map(|c| c.dice)
            .collect();
        assert_eq!(v.len(), 9 * 9, "{model}: 9 organs on 9 cases");
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (ft_mean, st_mean) = (mean("Model_FT", false), mean("", true));
    if std::env::var("FT_DEBUG").is_ok() {
        eprintln!("{}", report::render(&rep, report::Format::Table));
    }
    eprintln!("pooled target Dice: Model_FT {ft_mean:.4}, local Model_ST {st_mean:.4}");
    // Measured on the 2-vCPU development VM (FT_SEED = 17, 18, 19 with these settings):
    // Model_FT - Model_ST = -0.007, -0.005, +0.019. One averaged model serves every target
    // about as well as each target's own fine-tuning does its own cases, at this scale (two
    // training cases a site); the bound allows that difference, not more.
    assert!(
        ft_mean >= st_mean - 0.02,
        "Model_FT {ft_mean:.4} is below the local Model_ST {st_mean:.4} by more than 0.02"
    );
    fed.shutdown().await
}

/// A federated round of three steps whose coordinator is killed once the first average is
/// made: restarted, it finishes, and its Model_FT is byte for byte the one an uninterrupted
/// round of the same spec makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_between_steps_finishes_with_the_same_model() -> R {
    let mut fed =
        Federation::builder().sites(2).coordinator_process().without_agents().start().await?;
    for name in fed.sites.clone() {
        let mut cfg = fed.site_config(&name)?;
        cfg.policy.share_weights = true;
        fed.start_agent_with(&name, cfg)?;
    }
    fed.study("k", "tiny").await?;
    let spec = templates::fedavg_spec(
        &TemplateOptions { epochs: 1, batch_size: 8, ..tiny(2, 3) },
        FedOptions { rounds: 3, ..Default::default() },
    )
    .map_err(anyhow::Error::msg)?;
    let killed = fed.start_round("k", spec.clone()).await?;
    // Wait for the first average, then kill the coordinator.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let info = fed.round(&killed).await?;
        if info.fed.as_ref().is_some_and(|f| !f.aggregates.is_empty()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no average within 4 minutes");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    fed.stop_coordinator().await?;
    fed.restart_coordinator().await?;
    let a = fed.wait_round(&killed, 300).await?;
    assert_eq!(a.state, pb::RoundState::Completed as i32, "{a:?}");
    let fa = a.fed.expect("fed");
    let steps: Vec<u32> = fa.aggregates.iter().map(|x| x.step).collect();
    assert_eq!(steps, [1, 2, 3], "every step averaged once");
    let again = fed.start_round("k", spec).await?;
    let b = fed.wait_round(&again, 300).await?;
    let fb = b.fed.expect("fed");
    let (ma, mb) = (fa.model.expect("Model_FT"), fb.model.expect("Model_FT"));
    // The files differ in their provenance (each names its round); the tensors must not.
    let blob = |sha: &str| std::fs::read(fed.data_dir.join("blobs").join(sha));
    for (x, y) in fa.aggregates.iter().zip(&fb.aggregates) {
        assert_eq!(
            tensors(&blob(&x.tail_sha256)?),
            tensors(&blob(&y.tail_sha256)?),
            "step {}: the same average",
            x.step
        );
    }
    assert_eq!(tensors(&blob(&ma.sha256)?), tensors(&blob(&mb.sha256)?), "the same Model_FT");
    fed.shutdown().await
}

/// A weights file's tensors by name: (shape, bytes).
fn tensors(bytes: &[u8]) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("a weights file");
    st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// A site that names another site's tail by its sha256 (which cross-eval lets it learn) does
/// not get it counted as its own: the coordinator wants the bytes, and an upload without them
/// is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_another_sites_tail_is_not_uploading_it() -> R {
    use coordinator::identity::Role;
    use proto::pb::site_service_client::SiteServiceClient;
    let mut fed = Federation::builder().sites(2).without_agents().start().await?;
    // site-b is played by hand: it says it shares weights.
    let mut b = SiteServiceClient::new(fed.channel(Some(&fed.bundle(Role::Site, "site-b"))));
    b.hello(pb::HelloRequest {
        capabilities: Some(pb::Capabilities { share_weights: true, ..Default::default() }),
        dataset: Some(pb::DatasetSummary { train_cases: 2, ..Default::default() }),
        agent_version: "test".into(),
    })
    .await?;
    let mut cfg = fed.site_config("site-a")?;
    cfg.policy.share_weights = true;
    fed.start_agent_with("site-a", cfg)?;
    fed.study("fr", "tiny").await?;
    let spec = templates::fedavg_spec(
        &TemplateOptions { epochs: 1, batch_size: 8, ..tiny(2, 3) },
        FedOptions { rounds: 1, ..Default::default() },
    )
    .map_err(anyhow::Error::msg)?;
    let round = fed.start_round("fr", spec).await?;
    let task = loop {
        let t = b.next_task(pb::NextTaskRequest { wait_seconds: 2 }).await?.into_inner().task;
        if let Some(t) = t {
            break t;
        }
    };
    // site-a trains and uploads its tail.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let a_tail = loop {
        let results = fed.results(&round).await?;
        if let Some(r) = results.results.iter().find(|r| r.site == "site-a") {
            break r.result.as_ref().expect("result").arms[1].tail_sha256.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "site-a did not finish");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let models = fed.admin().await?.list_models(pb::ListModelsRequest {}).await?.into_inner();
    let size = models
        .models
        .iter()
        .filter_map(|m| m.model.as_ref())
        .find(|m| m.sha256 == a_tail)
        .expect("site-a's tail is stored")
        .size;
    let header = pb::UploadModelRequest {
        part: Some(pb::upload_model_request::Part::Header(pb::UploadHeader {
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            model: Some(pb::ModelRef { sha256: a_tail.clone(), size, name: String::new() }),
            arm: 1,
        })),
    };
    let refused =
        b.upload_model(tokio_stream::iter([header])).await.expect_err("no bytes, no tail");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("upload ended at 0"), "{}", refused.message());
    let info = fed.round(&round).await?;
    let mine = info.tasks.iter().find(|t| t.site == "site-b").expect("site-b's task");
    assert_eq!(mine.bytes_up, 0, "nothing was counted as site-b's");
    fed.shutdown().await
}
