//! What each study-lead command does: one call (or a few) through [`AdminClient`], then the
//! printing.

use anyhow::{Context, Result, bail};
use proto::pb;

use super::client::AdminClient;
use super::show::{device_summary, last_seen, print_results, print_round, results_json};
use super::show::{round_line, round_state};
use super::templates::{self, FedOptions, Template, TemplateOptions};
use super::watch::eprintln_note;
use super::{Command, ModelCommand, RoundCommand, SiteCommand, StudyCommand, TaskArg, out};
use crate::report::{self, Format};

/// A round that ended without completing, as `round start --watch`, `round watch` and `round
/// status` report it: the process exits with [`RoundNotCompleted::exit_code`], so that a script
/// or scheduler can tell a failed round from a good one.
#[derive(Debug, thiserror::Error)]
#[error("round {round} {state}{reason}")]
pub struct RoundNotCompleted {
    pub round: String,
    pub state: &'static str,
    /// ` (why)`, or empty.
    pub reason: String,
}

impl RoundNotCompleted {
    /// 2 for a failed round, 3 for a cancelled one.
    pub fn exit_code(&self) -> u8 {
        if self.state == "cancelled" { 3 } else { 2 }
    }
}

/// `Err` for a round that failed or was cancelled; a running or completed round is `Ok`.
fn ended_well(r: &pb::RoundInfo) -> Result<()> {
    match pb::RoundState::try_from(r.state) {
        Ok(pb::RoundState::Failed | pb::RoundState::Cancelled) => Err(RoundNotCompleted {
            round: r.round_id.clone(),
            state: round_state(r.state),
            reason: if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) },
        }
        .into()),
        _ => Ok(()),
    }
}

/// With `--json`, prints `answer` in the protocol's JSON mapping and says so (true).
fn json<T: serde::Serialize>(on: bool, answer: &T) -> Result<bool> {
    if on {
        out(&serde_json::to_string_pretty(answer)?);
    }
    Ok(on)
}

/// Runs a parsed command (`serve` is the binary's: it owns signals and the listener).
pub async fn run_admin(command: Command) -> Result<()> {
    match command {
        Command::Serve { .. } => unreachable!("serve is handled by main"),
        Command::Doctor { .. } | Command::Restore { .. } => {
            unreachable!("the server's machine's commands are handled by main")
        }
        Command::Backup { out: path, conn } => super::ops::backup(&path, &conn).await,
        Command::Completions { shell } => {
            super::ops::completions(shell);
            Ok(())
        }
        Command::Pki(p) => super::pki::run(p),
        Command::Model(ModelCommand::Push { file, name, conn }) => {
            let info = AdminClient::connect(&conn).await?.push_model(&file, &name, true).await?;
            if json(conn.json, &info)? {
                return Ok(());
            }
            let m = info.model.unwrap_or_default();
            out(&format!(
                "stored model {} ({} bytes, sha256 {}, config {}, {} layers)",
                m.name, m.size, m.sha256, info.config, info.layers
            ));
            Ok(())
        }
        Command::Model(ModelCommand::List { conn }) => {
            let models =
                AdminClient::connect(&conn).await?.list_models(pb::ListModelsRequest {}).await?;
            if json(conn.json, &models)? {
                return Ok(());
            }
            for info in models.models {
                let m = info.model.unwrap_or_default();
                out(&format!(
                    "{:<20} {} {:>10} bytes  {} ({} layers)",
                    m.name, m.sha256, m.size, info.config, info.layers
                ));
            }
            Ok(())
        }
        Command::Site(SiteCommand::List { conn }) => {
            let sites =
                AdminClient::connect(&conn).await?.list_sites(pb::ListSitesRequest {}).await?;
            if json(conn.json, &sites)? {
                return Ok(());
            }
            let now = shared::cert::now_unix();
            for s in sites.sites {
                let state = if s.certificate_revoked {
                    "revoked (its certificate is on the revocation list)"
                } else if s.revoked {
                    "revoked"
                } else if s.approved {
                    "approved"
                } else {
                    "waiting for approval"
                };
                let days = (s.certificate_not_after_unix - now) / 86_400;
                let cert = if s.certificate_not_after_unix == 0 {
                    String::new()
                } else if s.certificate_not_after_unix < now {
                    format!(
                        "  EXPIRED: its certificate expired on {} and it cannot connect; the \
                         site makes a new key and request (`site-agent init`), you sign it \
                         (`pki sign REQUEST --site {n} --force`)",
                        shared::cert::utc(s.certificate_not_after_unix),
                        n = s.name
                    )
                } else if days < 30 {
                    format!("  WARNING: certificate expires in {days} days")
                } else {
                    format!("  certificate valid {days} more days")
                };
                let data = s
                    .dataset
                    .map(|d| {
                        format!(
                            "  {} train / {} test cases, {} organs",
                            d.train_cases,
                            d.test_cases,
                            d.organs.len()
                        )
                    })
                    .unwrap_or_default();
                let device = s.capabilities.as_ref().map(device_summary).unwrap_or_default();
                let seen = last_seen(now, s.last_seen_unix);
                out(&format!("{:<16} {state}  {seen}{device}{data}{cert}", s.name));
            }
            Ok(())
        }
        Command::Site(SiteCommand::Approve { name, reinstate, conn }) => {
            let s = AdminClient::connect(&conn)
                .await?
                .approve_site(pb::SiteRequest { name, reinstate })
                .await?;
            if json(conn.json, &s)? {
                return Ok(());
            }
            out(&format!("site {} approved", s.name));
            Ok(())
        }
        Command::Site(SiteCommand::Revoke { name, conn }) => {
            let s = AdminClient::connect(&conn)
                .await?
                .revoke_site(pb::SiteRequest { name, reinstate: false })
                .await?;
            if json(conn.json, &s)? {
                return Ok(());
            }
            out(&format!("site {} revoked", s.name));
            Ok(())
        }
        Command::Study(StudyCommand::Create { name, base, sites, conn }) => {
            let s = AdminClient::connect(&conn)
                .await?
                .create_study(pb::CreateStudyRequest { name, base_model: base, sites })
                .await?;
            if json(conn.json, &s)? {
                return Ok(());
            }
            out(&format!(
                "study {} on base model {} with sites {}",
                s.name,
                s.base.map(|b| b.name).unwrap_or_default(),
                s.sites.join(",")
            ));
            Ok(())
        }
        Command::Study(StudyCommand::List { conn }) => {
            let studies =
                AdminClient::connect(&conn).await?.list_studies(pb::ListStudiesRequest {}).await?;
            if json(conn.json, &studies)? {
                return Ok(());
            }
            for s in studies.studies {
                out(&format!(
                    "{:<20} base {:<16} sites {}",
                    s.name,
                    s.base.map(|b| b.name).unwrap_or_default(),
                    s.sites.join(",")
                ));
            }
            Ok(())
        }
        Command::Round(RoundCommand::Start {
            study,
            task,
            trainable_layers,
            train_cases,
            source,
            source_epochs,
            epochs,
            finetune_epochs,
            finetune_lr,
            batch_size,
            lr,
            seed,
            config,
            quorum,
            deadline_seconds,
            max_attempts,
            sites,
            rounds,
            local_epochs,
            fedbn,
            prox_mu,
            replicates,
            watch: follow,
            conn,
        }) => {
            let template = match task {
                TaskArg::Transfer => Some(Template::Transfer),
                TaskArg::Sweep => Some(Template::Sweep),
                TaskArg::CasesSweep => Some(Template::CasesSweep),
                _ => None,
            };
            if task != TaskArg::Fedavg
                && (rounds.is_some() || local_epochs.is_some() || fedbn || prox_mu.is_some())
            {
                bail!("--rounds, --local-epochs, --fedbn and --prox-mu are for --task fedavg");
            }
            if template.is_none() && replicates > 1 {
                bail!("--replicates is for --task transfer, sweep or cases-sweep");
            }
            let o = TemplateOptions {
                trainable_layers: trainable_layers.clone(),
                train_cases,
                epochs: epochs.unwrap_or(0),
                finetune_epochs: finetune_epochs.or(epochs).unwrap_or(0),
                learning_rate: lr.unwrap_or(0.0),
                finetune_learning_rate: finetune_lr.or(lr).unwrap_or(0.0),
                batch_size: batch_size.unwrap_or(0),
                seed: seed.unwrap_or(0),
                config: config.clone().unwrap_or_default(),
            };
            let (spec, source_spec) = match template {
                Some(t) => {
                    let spec = templates::target_spec(t, &o).map_err(anyhow::Error::msg)?;
                    let ss = source
                        .is_some()
                        .then(|| templates::source_spec(&o, source_epochs.or(epochs).unwrap_or(0)));
                    (spec, ss)
                }
                None => {
                    if source.is_some() {
                        bail!("--source is for --task transfer, sweep or cases-sweep");
                    }
                    let spec = match task {
                        TaskArg::Fedavg => templates::fedavg_spec(
                            &TemplateOptions { epochs: local_epochs.or(epochs).unwrap_or(0), ..o },
                            FedOptions {
                                rounds: rounds.unwrap_or(0),
                                keep_local_bn: fedbn,
                                prox_mu: prox_mu.unwrap_or(0.0),
                            },
                        )
                        .map_err(anyhow::Error::msg)?,
                        TaskArg::CrossEval => templates::cross_eval_spec(),
                        _ => {
                            let kind = match task {
                                TaskArg::Evaluate => pb::TaskKind::Evaluate,
                                TaskArg::Finetune => pb::TaskKind::Finetune,
                                _ => pb::TaskKind::Train,
                            };
                            let k = match (task, trainable_layers.as_slice()) {
                                (TaskArg::Finetune, [k]) => *k,
                                (TaskArg::Finetune, _) => {
                                    bail!("--task finetune needs one --trainable-layers K")
                                }
                                _ => 0,
                            };
                            pb::TaskSpec {
                                kind: kind as i32,
                                trainable_layers: k,
                                epochs: epochs.unwrap_or(0),
                                batch_size: batch_size.unwrap_or(0),
                                learning_rate: lr.unwrap_or(0.0),
                                seed: seed.unwrap_or(0),
                                config: config.unwrap_or_default(),
                                ..Default::default()
                            }
                        }
                    };
                    (spec, None)
                }
            };
            let mut c = AdminClient::connect(&conn).await?;
            // One round per replicate, each with its own seed, all of one series.
            let series = format!("{:08x}", rand::random::<u32>());
            let mut started = Vec::new();
            for i in 0..replicates {
                let (spec, source_spec) = if replicates > 1 {
                    templates::replicate(&spec, source_spec.as_ref(), i, replicates, &series)
                } else {
                    (spec.clone(), source_spec.clone())
                };
                let r = c
                    .start_round(pb::StartRoundRequest {
                        study: study.clone(),
                        spec: Some(spec),
                        quorum: quorum.unwrap_or(0),
                        deadline_seconds: deadline_seconds.unwrap_or(0),
                        max_attempts: max_attempts.unwrap_or(0),
                        source_site: source.clone().unwrap_or_default(),
                        source_spec,
                        sites: sites.clone(),
                    })
                    .await?;
                if replicates > 1 {
                    out(&format!(
                        "round {} started (replicate {} of {replicates})",
                        r.round_id,
                        i + 1
                    ));
                } else {
                    out(&format!("round {} started", r.round_id));
                }
                for w in &r.warnings {
                    eprintln_note(&format!("warning: {w}"));
                }
                started.push(r.round_id);
            }
            if follow {
                let mut worst = Ok(());
                for id in &started {
                    let r = c.watch(id).await?;
                    print_round(&r);
                    if worst.is_ok() {
                        worst = ended_well(&r);
                    }
                }
                return worst;
            }
            Ok(())
        }
        Command::Round(RoundCommand::List { study, conn }) => {
            let list = AdminClient::connect(&conn)
                .await?
                .list_rounds(pb::ListRoundsRequest { study: study.unwrap_or_default() })
                .await?;
            if json(conn.json, &list)? {
                return Ok(());
            }
            if list.rounds.is_empty() {
                out("no rounds");
            }
            for r in &list.rounds {
                out(&round_line(r));
            }
            Ok(())
        }
        Command::Round(RoundCommand::Status { round, conn }) => {
            let r = AdminClient::connect(&conn)
                .await?
                .get_round(pb::RoundRequest { round_id: round })
                .await?;
            if !json(conn.json, &r)? {
                print_round(&r);
            }
            ended_well(&r)
        }
        Command::Round(RoundCommand::Watch { round, conn }) => {
            let r = AdminClient::connect(&conn).await?.watch(&round).await?;
            if !json(conn.json, &r)? {
                print_round(&r);
            }
            ended_well(&r)
        }
        Command::Round(RoundCommand::Cancel { round, conn }) => {
            let r = AdminClient::connect(&conn)
                .await?
                .cancel_round(pb::RoundRequest { round_id: round })
                .await?;
            if !json(conn.json, &r)? {
                print_round(&r);
            }
            Ok(())
        }
        Command::Report { study, format, out: path, conn } => {
            let results = AdminClient::connect(&conn)
                .await?
                .get_study_results(pb::StudyRequest { name: study })
                .await?;
            let text = report::render(&report::build(&results), format);
            match path {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
                    out(&format!("report written to {}", p.display()));
                }
                None => out(text.trim_end()),
            }
            Ok(())
        }
        Command::Demo(a) => {
            let rep = super::demo::run(&a).await?;
            out(report::render(&rep, Format::Table).trim_end());
            Ok(())
        }
        Command::Results { round, conn } => {
            let r = AdminClient::connect(&conn)
                .await?
                .get_results(pb::RoundRequest { round_id: round })
                .await?;
            if conn.json {
                out(&serde_json::to_string_pretty(&results_json(&r))?);
            } else {
                print_results(&r);
            }
            Ok(())
        }
    }
}
