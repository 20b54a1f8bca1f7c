//! `site-agent doctor --config site.toml`: hospital IT's preflight. One line per check, in the
//! order a connection needs them; a failed check says what to do, and the command exits 1 when
//! any failed. Nothing about the site's data is sent: the coordinator is asked only for its
//! clock and how it sees this site's certificate (`Ping`, not audited: the request is empty).
//!
//! Checks: the config; the certificate (readable, its key, issued by the bundle's CA, its name,
//! its dates); the route (direct or through a proxy); the coordinator reachable over TCP; the
//! TLS handshake and the identity the coordinator accepts; the clock against the
//! coordinator's; the data manifest and its cases; the training device; free disk space for
//! models.

use std::path::Path;
use std::time::{Duration, Instant};

use super::config::SiteConfig;
use super::link::Link;
use super::{diagnose, proxy};

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Warn,
    Fail,
}

/// One check's line.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        };
        write!(f, "{tag}  {:<12} {}", self.name, self.detail)
    }
}

/// Clock differences beyond these are reported (certificates carry five minutes of slack;
/// task deadlines and the audit log's times are read across machines).
const SKEW_WARN: Duration = Duration::from_secs(2);
const SKEW_FAIL: Duration = Duration::from_secs(30);
/// Free space under `storage.dir` below which a check fails, and below which it warns.
const DISK_FAIL: u64 = 1 << 30;
const DISK_WARN: u64 = 5 << 30;

/// Runs every check; `emit` gets each line as it is known (a slow network check shows the
/// lines before it at once).
pub async fn run(config: &Path, mut emit: impl FnMut(&Check)) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |c: Check| {
        emit(&c);
        out.push(c);
    };
    let check = |name, outcome, detail: String| Check { name, outcome, detail };
    let cfg = match SiteConfig::load(config) {
        Ok(c) => {
            push(check("config", Outcome::Ok, format!("{} reads as version 1", config.display())));
            c
        }
        Err(e) => {
            push(check("config", Outcome::Fail, format!("{e}; fix it, then run doctor again")));
            return out;
        }
    };
    let cert_ok = certificate(&cfg).into_iter().fold(true, |ok, c| {
        let good = c.outcome != Outcome::Fail;
        push(c);
        ok && good
    });
    let route = match cfg.route() {
        Ok(r) => {
            push(check("route", Outcome::Ok, format!("to {} {r}", cfg.coordinator.address)));
            Some(r)
        }
        Err(e) => {
            push(check("route", Outcome::Fail, e));
            None
        }
    };
    if let Some(route) = route {
        let reached = reach(&cfg, &route).await;
        let up = reached.outcome == Outcome::Ok;
        push(reached);
        if up && cert_ok {
            for c in handshake_and_clock(&cfg).await {
                push(c);
            }
        } else if up {
            push(check("tls", Outcome::Fail, "not tried: the certificate checks failed".into()));
        }
    }
    push(data(&cfg));
    push(device(&cfg));
    push(disk(&cfg.storage.dir));
    out
}

/// The bundle: key, certificate, CA, name, dates.
fn certificate(cfg: &SiteConfig) -> Vec<Check> {
    let bundle = &cfg.tls.bundle;
    let fail = |detail: String| vec![Check { name: "certificate", outcome: Outcome::Fail, detail }];
    let read = |f: &str| {
        std::fs::read(bundle.join(f)).map_err(|e| format!("{}: {e}", bundle.join(f).display()))
    };
    let (cert, key, ca) = match (read("cert.pem"), read("key.pem"), read("ca.pem")) {
        (Ok(c), Ok(k), Ok(a)) => (c, k, a),
        (c, k, a) => {
            let missing: Vec<String> = [c.err(), k.err(), a.err()].into_iter().flatten().collect();
            return fail(format!(
                "{}; the bundle folder needs key.pem (from `site-agent init`) and the cert.pem \
                 and ca.pem the CA operator sent back (`coordinator pki sign`)",
                missing.join("; ")
            ));
        }
    };
    if let Err(e) = key_matches(&cert, &key) {
        return fail(format!(
            "cert.pem and key.pem in {} are not a pair ({e}): the certificate was signed for \
             another key; send this folder's request.csr to be signed again",
            bundle.display()
        ));
    }
    if let Err(e) = shared::cert::check_issued_by(&cert, &ca) {
        return fail(format!(
            "cert.pem was not issued by the CA in ca.pem ({e}): the bundle mixes two \
             consortia's files; ask the study lead for their ca.pem and a certificate it signed"
        ));
    }
    let name = match shared::cert::identity_of(&cert) {
        Ok((role, name)) if role == "site" => name,
        Ok((role, name)) => {
            return fail(format!(
                "cert.pem is the {role} certificate of \"{name}\", not a site's: use the site's bundle"
            ));
        }
        Err(e) => return fail(format!("cert.pem: {e}")),
    };
    let renew =
        "make a new request (`site-agent init`) and have it signed (`coordinator pki sign`)";
    match shared::cert::check_own(&bundle.join("cert.pem"), "site", renew) {
        Err(e) => fail(e),
        Ok(days) => {
            let v = shared::cert::Validity::from_pem(&cert).map(|v| v.not_after).unwrap_or(0);
            vec![Check {
                name: "certificate",
                outcome: if days.is_some() { Outcome::Warn } else { Outcome::Ok },
                detail: format!(
                    "site \"{name}\", issued by the bundle's CA, key matches, valid until {}{}",
                    shared::cert::utc(v),
                    days.map(|d| format!(" (only {d} days left: {renew})")).unwrap_or_default()
                ),
            }]
        }
    }
}

fn key_matches(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key.pem: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A TCP connection to the coordinator (through the proxy where there is one).
async fn reach(cfg: &SiteConfig, route: &proxy::Route) -> Check {
    let address = &cfg.coordinator.address;
    let Some((host, port)) = host_port(address) else {
        return Check {
            name: "reach",
            outcome: Outcome::Fail,
            detail: format!("{address} has no host"),
        };
    };
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(10), proxy::dial(route, &host, port)).await {
        Ok(Ok(_)) => Check {
            name: "reach",
            outcome: Outcome::Ok,
            detail: format!(
                "{host}:{port} answered {route} in {} ms",
                started.elapsed().as_millis()
            ),
        },
        Ok(Err(e)) => Check {
            name: "reach",
            outcome: Outcome::Fail,
            detail: format!(
                "{host}:{port} {route}: {e}; check coordinator.address, that the coordinator \
                 runs, and that the firewall lets this machine out to it"
            ),
        },
        Err(_) => Check {
            name: "reach",
            outcome: Outcome::Fail,
            detail: format!(
                "{host}:{port} {route}: no answer in 10 s; a firewall may drop the connection"
            ),
        },
    }
}

fn host_port(address: &str) -> Option<(String, u16)> {
    let uri: tonic::codegen::http::Uri = address.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned();
    Some((host, uri.port_u16().unwrap_or(443)))
}

/// The handshake, the identity the coordinator accepts, and the clock.
async fn handshake_and_clock(cfg: &SiteConfig) -> Vec<Check> {
    if let Some(e) = diagnose::probe_handshake(cfg).await {
        return vec![Check {
            name: "tls",
            outcome: Outcome::Fail,
            detail: diagnose::describe_tls(&e, cfg),
        }];
    }
    let t0 = now_ms();
    let answer = Link::ping(cfg).await;
    let t1 = now_ms();
    let ping = match answer {
        Ok(p) => p,
        Err(e) => {
            let why = e.diagnose(cfg).await.unwrap_or_else(|| e.to_string());
            return vec![Check { name: "tls", outcome: Outcome::Fail, detail: why }];
        }
    };
    let standing = match (ping.known, ping.approved) {
        (true, true) => "approved",
        (true, false) => "waiting for the study lead's approval (`coordinator site approve`)",
        (false, _) => "not yet known: `site-agent run` says hello, then the study lead approves it",
    };
    let tls = Check {
        name: "tls",
        outcome: Outcome::Ok,
        detail: format!(
            "handshake done; the coordinator (version {}) accepts this certificate as site \
             \"{}\", {standing}",
            ping.version, ping.site
        ),
    };
    // The coordinator's clock at the middle of the round trip, against ours.
    let mid = t0 + (t1 - t0) / 2;
    let skew_ms = ping.server_time_unix_ms - mid;
    let skew = Duration::from_millis(skew_ms.unsigned_abs());
    let (ahead, behind) = ("ahead of", "behind");
    let words = format!(
        "this machine's clock is {:.1} s {} the coordinator's (± {} ms round trip)",
        skew.as_secs_f64(),
        if skew_ms > 0 { behind } else { ahead },
        t1 - t0
    );
    let clock = if skew > SKEW_FAIL {
        Check {
            name: "clock",
            outcome: Outcome::Fail,
            detail: format!(
                "{words}: set up time synchronisation (chrony or systemd-timesyncd against the \
                 hospital's NTP server); certificate dates and task deadlines depend on it"
            ),
        }
    } else {
        Check {
            name: "clock",
            outcome: if skew > SKEW_WARN { Outcome::Warn } else { Outcome::Ok },
            detail: words,
        }
    };
    vec![tls, clock]
}

/// Unix milliseconds on this machine's clock (moved by the test hook
/// `FEDTUNE_TEST_CLOCK_SKEW_MS` in a `test-hooks` build).
fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    #[cfg(feature = "test-hooks")]
    let now = now
        + std::env::var("FEDTUNE_TEST_CLOCK_SKEW_MS")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
    now
}

/// The manifest and every case it lists (as `check-data`).
fn data(cfg: &SiteConfig) -> Check {
    let path = &cfg.data.manifest;
    let m = match crate::data::Manifest::load(path) {
        Ok(m) => m,
        Err(e) => {
            return Check {
                name: "data",
                outcome: Outcome::Fail,
                detail: format!(
                    "{e}; fix data.manifest (`site-agent import-dicom` writes one), then run \
                     `site-agent check-data --manifest {}`",
                    path.display()
                ),
            };
        }
    };
    let errors = m.check();
    if let Some(first) = errors.first() {
        return Check {
            name: "data",
            outcome: Outcome::Fail,
            detail: format!(
                "{} of {} cases fail validation, first: {first}; `site-agent check-data \
                 --manifest {}` lists them all",
                errors.len(),
                m.cases.len(),
                path.display()
            ),
        };
    }
    let train = m.cases_in(crate::data::Split::Train).count();
    Check {
        name: "data",
        outcome: Outcome::Ok,
        detail: format!(
            "{}: {} cases ({train} train, {} test), {} organs",
            path.display(),
            m.cases.len(),
            m.cases.len() - train,
            m.organs.len()
        ),
    }
}

/// The device `agent.device` opens, with its memory.
fn device(cfg: &SiteConfig) -> Check {
    match cfg.device_choice().select() {
        Ok(s) => {
            let memory = crate::device::total_memory_bytes(&s.device)
                .map(|b| format!(", {:.1} GiB", b as f64 / f64::from(1u32 << 30)))
                .unwrap_or_default();
            Check { name: "device", outcome: Outcome::Ok, detail: format!("{}{memory}", s.info) }
        }
        Err(e) => Check { name: "device", outcome: Outcome::Fail, detail: e.to_string() },
    }
}

/// Free space where models and the audit log go.
fn disk(dir: &Path) -> Check {
    // The folder may not exist yet: its nearest existing parent holds it.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("."));
    match fs4::available_space(existing) {
        Ok(free) => {
            let gib = free as f64 / f64::from(1u32 << 30);
            let outcome = if free < DISK_FAIL {
                Outcome::Fail
            } else if free < DISK_WARN {
                Outcome::Warn
            } else {
                Outcome::Ok
            };
            let advice = match outcome {
                Outcome::Ok => String::new(),
                _ => format!(
                    "; models, fine-tuned weights and the audit log need a few GiB: free space \
                     or set storage.dir elsewhere (at least {} GiB, {} recommended)",
                    DISK_FAIL >> 30,
                    DISK_WARN >> 30
                ),
            };
            Check {
                name: "disk",
                outcome,
                detail: format!("{gib:.1} GiB free for {}{advice}", dir.display()),
            }
        }
        Err(e) => Check {
            name: "disk",
            outcome: Outcome::Fail,
            detail: format!("{}: {e}", existing.display()),
        },
    }
}
