//! Following a round: progress bars on a terminal, a line per change elsewhere, and
//! reconnection when the coordinator goes away for a while.

use anyhow::Result;
use proto::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::Channel;

use super::show::task_state;
use super::{out, status};

/// One line per change of a site's task (state, phase or epoch), for a watch whose output is
/// not a terminal (a cron job, CI log or pipe), where progress bars draw nothing.
#[derive(Debug, Default)]
struct ChangeLog {
    last: std::collections::BTreeMap<String, (i32, String, u32)>,
}

impl ChangeLog {
    fn lines(&mut self, info: &pb::RoundInfo, started: std::time::Instant) -> Vec<String> {
        let mut out = Vec::new();
        for t in &info.tasks {
            let p = t.progress.as_ref().filter(|_| t.state == pb::TaskState::Leased as i32);
            let key =
                (t.state, p.map(|p| p.phase.clone()).unwrap_or_default(), p.map_or(0, |p| p.epoch));
            if self.last.get(&t.site) == Some(&key) {
                continue;
            }
            let detail = match p {
                Some(p) if p.epochs > 0 => {
                    format!(" {} epoch {}/{} loss {:.3}", p.phase, p.epoch, p.epochs, p.loss)
                }
                Some(p) => format!(" {}", p.phase),
                None if !t.reason.is_empty() => format!(" ({})", t.reason),
                None => String::new(),
            };
            out.push(format!(
                "[{:>7.1} s] {}: {}{detail}",
                started.elapsed().as_secs_f64(),
                t.site,
                task_state(t.state)
            ));
            self.last.insert(t.site.clone(), key);
        }
        out
    }
}

/// How long a watch keeps trying to reach a coordinator that went away (a restart, a network
/// cut) before it gives up; the round goes on meanwhile.
pub const WATCH_RECONNECT_SECONDS: u64 = 600;

/// Whether a failed watch call may succeed again once the coordinator is back.
fn transient(s: &tonic::Status) -> bool {
    use tonic::Code as C;
    matches!(
        s.code(),
        C::Unavailable | C::Unknown | C::Cancelled | C::DeadlineExceeded | C::Aborted
    )
}

/// Follows a round until it ends: one progress bar per site on a terminal, else one line per
/// change of a site's task.
pub async fn watch(client: &mut AdminServiceClient<Channel>, round: &str) -> Result<pb::RoundInfo> {
    use std::io::IsTerminal;
    let (terminal, started) = (std::io::stderr().is_terminal(), std::time::Instant::now());
    let mut changes = ChangeLog::default();
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:<16} [{bar:30}] {msg}")
        .expect("valid template");
    let mut bars: std::collections::BTreeMap<String, indicatif::ProgressBar> = Default::default();
    let mut last: Option<pb::RoundInfo> = None;
    // Since when the coordinator has been out of reach, and how often we tried.
    let mut lost: Option<(std::time::Instant, u32)> = None;
    loop {
        let opened = client.watch_round(pb::RoundRequest { round_id: round.into() }).await;
        let broke = match opened {
            // Before the first state, an error is the answer (no such round, no access, no
            // coordinator at that address).
            Err(s) if last.is_none() || !transient(&s) => return Err(status(s)),
            Err(s) => s,
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(info)) => {
                            if lost.take().is_some() {
                                multi.suspend(|| eprintln_note("reconnected; the round went on"));
                            }
                            if terminal {
                                draw_bars(&multi, &style, &mut bars, &info);
                            } else {
                                for line in changes.lines(&info, started) {
                                    out(&line);
                                }
                            }
                            last = Some(info);
                        }
                        Ok(None) => break tonic::Status::unavailable("the watch stream ended"),
                        Err(s) if last.is_some() && transient(&s) => break s,
                        Err(s) => return Err(status(s)),
                    }
                }
            }
        };
        let state = last.as_ref().map(|r| r.state);
        if state.is_some_and(|s| s != pb::RoundState::Running as i32) {
            break;
        }
        let (since, tries) = lost.get_or_insert((std::time::Instant::now(), 0));
        if *tries == 0 {
            multi.suspend(|| {
                eprintln_note(&format!(
                    "lost the coordinator ({}); reconnecting for up to {WATCH_RECONNECT_SECONDS} s \
                     (the round goes on without the watch)",
                    broke.message()
                ))
            });
        }
        if since.elapsed() > std::time::Duration::from_secs(WATCH_RECONNECT_SECONDS) {
            anyhow::bail!(
                "lost the coordinator for {} s watching round {round} (last: {}); the round may \
                 still run: `coordinator round status {round}` when it is back",
                since.elapsed().as_secs(),
                broke.message()
            );
        }
        *tries += 1;
        let wait = std::time::Duration::from_millis(250u64 << (*tries).min(5))
            .min(std::time::Duration::from_secs(5));
        tokio::time::sleep(wait).await;
    }
    for b in bars.values() {
        b.finish();
    }
    last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch without a state"))
}

#[allow(clippy::print_stderr)]
pub(super) fn eprintln_note(s: &str) {
    eprintln!("{s}");
}

/// Progress bars per site, on a terminal.
fn draw_bars(
    multi: &indicatif::MultiProgress,
    style: &indicatif::ProgressStyle,
    bars: &mut std::collections::BTreeMap<String, indicatif::ProgressBar>,
    info: &pb::RoundInfo,
) {
    for t in &info.tasks {
        let bar = bars.entry(t.site.clone()).or_insert_with(|| {
            let b = multi.add(indicatif::ProgressBar::new(1000));
            b.set_style(style.clone());
            b.set_prefix(t.site.clone());
            b
        });
        let (pos, msg) = match (&t.progress, task_state(t.state)) {
            (_, "succeeded") => (1000, "succeeded".to_string()),
            (Some(p), "running") => (
                (p.fraction.clamp(0.0, 1.0) * 1000.0) as u64,
                format!("{} epoch {}/{} loss {:.3}", p.phase, p.epoch, p.epochs, p.loss),
            ),
            (_, s) => (bar.position(), format!("{s} {}", t.reason)),
        };
        bar.set_position(pos);
        bar.set_message(msg);
    }
}
