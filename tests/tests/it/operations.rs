//! Running fedtune as a hospital service, as an operator would, with the real binaries:
//! the site makes its own key and request (`site-agent init`), the CA signs it (`pki sign`)
//! without ever holding the key, the configuration comes from `deploy/`, the agent reaches the
//! coordinator through an HTTP CONNECT proxy, `doctor` passes, a round runs, both Prometheus
//! endpoints are scraped and parsed, and a backup taken while serving restores to an identical
//! coordinator.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use tests::{coordinator, site_agent};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Proc {
    /// SIGTERM, as systemd stops a service, and waits for the exit.
    fn terminate(mut self) -> Result<()> {
        Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status()?;
        let status = self.0.wait()?;
        ensure!(status.success(), "stopped with {status}");
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `coordinator serve --config`; returns the process, its address and its metrics address.
async fn serve(config: &Path, log: &Path) -> Result<(Proc, String, String)> {
    let mut child = Command::new(tests::bin("coordinator")?)
        .args(["serve", "--config", s(config)])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line).await???;
    // "listening on A, metrics on http://M/metrics"
    let rest = line.trim().strip_prefix("listening on ").with_context(|| format!("{line:?}"))?;
    let (addr, metrics) = rest.split_once(", metrics on http://").context("no metrics address")?;
    Ok((proc, addr.to_owned(), metrics.trim_end_matches("/metrics").to_owned()))
}

/// An HTTP CONNECT proxy on loopback that records the targets it tunnelled to.
async fn proxy() -> Result<(String, Arc<Mutex<Vec<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut request = String::new();
                if client.read_line(&mut request).await.is_err() {
                    return;
                }
                loop {
                    let mut header = String::new();
                    match client.read_line(&mut header).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if header == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let mut parts = request.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
                    let _ = client
                        .get_mut()
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                log.lock().unwrap().push(target.to_owned());
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    let _ = client.get_mut().write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(client.get_mut(), &mut upstream).await;
                }
            });
        }
    });
    Ok((format!("http://{addr}"), seen))
}

/// GET `path` from a plain-HTTP endpoint: (status, body).
async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((status, body.to_owned()))
}

/// The samples of a Prometheus text page: `name{labels}` -> value. Every line must be a
/// comment or a sample whose value parses.
fn samples(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) =
            line.rsplit_once(' ').with_context(|| format!("not a sample: {line:?}"))?;
        let value: f64 = value.parse().with_context(|| format!("not a number: {line:?}"))?;
        out.insert(key.to_owned(), value);
    }
    ensure!(!out.is_empty(), "no samples in {text:?}");
    Ok(out)
}

fn sample(all: &BTreeMap<String, f64>, key: &str) -> f64 {
    *all.get(key).unwrap_or_else(|| panic!("no sample {key} in {all:#?}"))
}

/// A free port on loopback (bound and let go: the agent's metrics listener takes it next).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `deploy/NAME` with `changes` (whole lines) made: what an operator does with the example.
fn from_deploy(name: &str, changes: &[(&str, String)]) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = std::fs::read_to_string(root.join("deploy").join(name))?;
    for (line, new) in changes {
        ensure!(text.contains(line), "deploy/{name} has no line {line:?}");
        text = text.replace(line, new);
    }
    Ok(text)
}

async fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok()? {
        ensure!(Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_joins_with_its_own_key_through_a_proxy_is_watched_and_backed_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let (pki, admin, bundle) = (root.join("pki"), root.join("admin"), root.join("site/bundle"));
    coordinator(&["pki", "init", "--dir", s(&pki)])?.ok()?;

    // Keys stay where they are made: the site's and the study lead's.
    let init = site_agent(&["init", "--name", "hospital-a", "--out", s(&bundle)])?.ok()?;
    assert!(init.stdout.contains("pki sign"), "{}", init.stdout);
    coordinator(&["pki", "request", "--admin", "lead", "--out", s(&admin)])?.ok()?;
    let csr = bundle.join("request.csr");
    let wrong = coordinator(&["pki", "sign", s(&csr), "--site", "hospital-b", "--dir", s(&pki)])?;
    assert_eq!(wrong.code, Some(1));
    assert!(wrong.stderr.contains("names site \"hospital-a\""), "{}", wrong.stderr);
    let as_admin =
        coordinator(&["pki", "sign", s(&csr), "--admin", "hospital-a", "--dir", s(&pki)])?;
    assert!(as_admin.stderr.contains("not admin \"hospital-a\""), "{}", as_admin.stderr);
    coordinator(&["pki", "sign", s(&csr), "--site", "hospital-a", "--dir", s(&pki)])?.ok()?;
    let admin_csr = admin.join("request.csr");
    coordinator(&["pki", "sign", s(&admin_csr), "--admin", "lead", "--dir", s(&pki)])?.ok()?;
    for (signed, to) in [(pki.join("sites/hospital-a"), &bundle), (pki.join("admins/lead"), &admin)]
    {
        assert!(!signed.join("key.pem").exists(), "the CA never holds a party's key");
        for f in ["cert.pem", "ca.pem"] {
            std::fs::copy(signed.join(f), to.join(f))?;
        }
    }

    // The coordinator from deploy/coordinator.toml, with a metrics endpoint.
    let data_dir = root.join("coordinator-data");
    let ctoml = root.join("coordinator.toml");
    std::fs::write(
        &ctoml,
        from_deploy(
            "coordinator.toml",
            &[
                ("listen = \"0.0.0.0:7443\"", "listen = \"127.0.0.1:0\"".into()),
                (
                    "data_dir = \"/var/lib/fedtune-coordinator\"",
                    format!("data_dir = {:?}", s(&data_dir)),
                ),
                (
                    "# metrics_listen = \"127.0.0.1:9463\"",
                    "metrics_listen = \"127.0.0.1:0\"".into(),
                ),
                ("/etc/fedtune/pki", s(&pki).to_owned()),
                ("# tick_ms = 1000", "tick_ms = 200".into()),
            ],
        )?,
    )?;
    coordinator(&["doctor", "--config", s(&ctoml)])?.ok()?;
    let (server, addr, cmetrics) = serve(&ctoml, &root.join("coordinator.log")).await?;

    // The site from deploy/site.toml, through the proxy, with its metrics.
    site_agent(&[
        "phantom",
        "--center",
        "target-a",
        "--cases",
        "3",
        "--test",
        "1",
        "--out",
        s(&root.join("site/data")),
    ])?
    .ok()?;
    let (proxy_url, tunnels) = proxy().await?;
    let ametrics = format!("127.0.0.1:{}", free_port()?);
    let stoml = root.join("site/site.toml");
    std::fs::write(
        &stoml,
        from_deploy(
            "site.toml",
            &[
                (
                    "address = \"https://coordinator.example.org:7443\"",
                    format!("address = \"https://{addr}\""),
                ),
                ("server_name = \"coordinator.example.org\"", "server_name = \"localhost\"".into()),
                (
                    "# proxy = \"http://proxy.hospital.local:3128\"",
                    format!("proxy = \"{proxy_url}\""),
                ),
                (
                    "manifest = \"/srv/fedtune/data/manifest.toml\"",
                    "manifest = \"data/manifest.toml\"".into(),
                ),
                ("dir = \"/var/lib/fedtune-site-agent\"", "dir = \"state\"".into()),
                (
                    "# metrics_listen = \"127.0.0.1:9464\"",
                    format!("metrics_listen = \"{ametrics}\""),
                ),
                ("# poll_seconds = 20", "poll_seconds = 2".into()),
                ("# heartbeat_seconds = 5", "heartbeat_seconds = 1".into()),
                ("# device = \"auto\"", "device = \"cpu\"".into()),
            ],
        )?,
    )?;
    let doctor = site_agent(&["doctor", "--config", s(&stoml)])?.ok()?;
    for says in
        ["through the proxy", "accepts this certificate as site \"hospital-a\"", "clock", "3 cases"]
    {
        assert!(doctor.stdout.contains(says), "{says}:\n{}", doctor.stdout);
    }
    let agent = Proc(
        Command::new(tests::bin("site-agent")?)
            .args(["run", "--config", s(&stoml)])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("agent.log"))?)
            .spawn()?,
    );
    let conn = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        v.extend([
            "--coordinator".into(),
            format!("https://{addr}"),
            "--bundle".into(),
            s(&admin).into(),
        ]);
        v
    };
    let lead = |args: &[&str]| -> Result<tests::Run> {
        let args = conn(args);
        coordinator(&args.iter().map(String::as_str).collect::<Vec<_>>())?.ok()
    };
    wait_for("the site says hello", 60, || {
        let v: serde_json::Value =
            serde_json::from_str(&lead(&["site", "list", "--json"])?.stdout)?;
        Ok(v["sites"].as_array().is_some_and(|a| !a.is_empty()))
    })
    .await?;
    lead(&["site", "approve", "hospital-a"])?;
    lead(&["study", "create", "ops", "--sites", "hospital-a"])?;
    let started = lead(&[
        "round", "start", "ops", "--task", "train", "--config", "tiny", "--epochs", "1", "--watch",
    ])?;
    let rounds: serde_json::Value =
        serde_json::from_str(&lead(&["round", "list", "--json"])?.stdout)?;
    assert_eq!(
        rounds["rounds"][0]["state"], "ROUND_STATE_COMPLETED",
        "{rounds}\n{}",
        started.stdout
    );
    let tunnelled = tunnels.lock().unwrap().clone();
    assert!(!tunnelled.is_empty() && tunnelled.iter().all(|t| *t == addr), "{tunnelled:?}");

    // A certificate the coordinator refuses is counted by reason.
    coordinator(&["pki", "issue-admin", "old", "--dir", s(&pki), "--days=-1"])?.ok()?;
    let mut refused = conn(&["site", "list"]);
    refused[5] = s(&pki.join("admins/old")).to_owned();
    let out = coordinator(&refused.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_ne!(out.code, Some(0), "an expired admin certificate is refused");

    // Both endpoints scraped and parsed.
    let (status, text) = http_get(&cmetrics, "/metrics").await?;
    assert_eq!(status, 200);
    let c = samples(&text)?;
    assert!(
        sample(
            &c,
            "fedtune_coordinator_rpcs_total{method=\"fedtune.v1.SiteService/Hello\",code=\"OK\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &c,
            "fedtune_coordinator_rpcs_total{method=\"fedtune.v1.AdminService/StartRound\",code=\"OK\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &c,
            "fedtune_coordinator_rpc_seconds_count{method=\"fedtune.v1.SiteService/NextTask\"}"
        ) >= 1.0
    );
    assert_eq!(sample(&c, "fedtune_coordinator_sites{state=\"approved\"}"), 1.0);
    assert_eq!(sample(&c, "fedtune_coordinator_sites_connected"), 1.0);
    assert_eq!(sample(&c, "fedtune_coordinator_tasks{state=\"succeeded\"}"), 1.0);
    assert_eq!(sample(&c, "fedtune_coordinator_rounds{state=\"completed\"}"), 1.0);
    assert_eq!(sample(&c, "fedtune_coordinator_store_up"), 1.0);
    assert!(sample(&c, "fedtune_coordinator_handshakes_refused_total{reason=\"expired\"}") >= 1.0);
    assert_eq!(http_get(&cmetrics, "/healthz").await?.0, 200);
    let a = samples(&http_get(&ametrics, "/metrics").await?.1)?;
    assert_eq!(sample(&a, "fedtune_agent_tasks_total{value=\"succeeded\"}"), 1.0);
    assert!(sample(&a, "fedtune_agent_train_step_seconds_count") >= 1.0);
    assert!(sample(&a, "fedtune_agent_train_images_per_second") > 0.0);
    assert!(sample(&a, "fedtune_agent_bytes_sent_total") > 0.0);
    assert!(sample(&a, "fedtune_agent_last_contact_timestamp_seconds") > 1.7e9);
    assert_eq!(sample(&a, "fedtune_agent_task_phase{value=\"idle\"}"), 1.0);

    // A backup taken while serving restores to an identical coordinator. (The agent stops
    // first: its calls would move its audit anchor on after the snapshot.)
    drop(agent);
    let archive = root.join("backup.tar");
    let taken = lead(&["backup", "--out", s(&archive)])?;
    assert!(taken.stdout.contains("backup written"), "{}", taken.stdout);
    let again = coordinator(
        &conn(&["backup", "--out", s(&archive)]).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    assert!(again.stderr.contains("never overwrites"), "{}", again.stderr);
    let listed = lead(&["round", "list", "--json"])?.stdout;
    server.terminate()?;
    let restored = root.join("restored");
    coordinator(&["restore", s(&archive), "--data-dir", s(&restored)])?.ok()?;
    let (was, now) = (
        coordinator::backup::contents(&data_dir.join("db"))?,
        coordinator::backup::contents(&restored.join("db"))?,
    );
    assert_eq!(was.len(), now.len(), "the same trees");
    for ((name, a), (_, b)) in was.iter().zip(&now) {
        let name = String::from_utf8_lossy(name);
        for ((ka, va), (kb, vb)) in a.iter().zip(b) {
            assert_eq!(ka, kb, "tree {name}");
            assert_eq!(String::from_utf8_lossy(va), String::from_utf8_lossy(vb), "tree {name}");
        }
        assert_eq!(a.len(), b.len(), "tree {name}");
    }
    let blobs = |d: &Path| -> Result<BTreeMap<String, Vec<u8>>> {
        std::fs::read_dir(d.join("blobs"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| Ok((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path())?)))
            .collect()
    };
    assert_eq!(blobs(&data_dir)?, blobs(&restored)?);
    let refused = coordinator(&["restore", s(&archive), "--data-dir", s(&restored)])?;
    assert!(refused.stderr.contains("holds files already"), "{}", refused.stderr);
    // A damaged archive restores nothing.
    let mut bytes = std::fs::read(&archive)?;
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    let damaged = root.join("damaged.tar");
    std::fs::write(&damaged, bytes)?;
    let out = coordinator(&["restore", s(&damaged), "--data-dir", s(&root.join("r2"))])?;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("nothing was restored"), "{}", out.stderr);
    assert!(!root.join("r2/db").exists());
    // The restored data dir serves the same state.
    let rtoml = root.join("restored.toml");
    std::fs::write(&rtoml, std::fs::read_to_string(&ctoml)?.replace(s(&data_dir), s(&restored)))?;
    let (server2, addr2, _) = serve(&rtoml, &root.join("restored.log")).await?;
    let mut args = conn(&["round", "list", "--json"]);
    args[4] = format!("https://{addr2}");
    let again = coordinator(&args.iter().map(String::as_str).collect::<Vec<_>>())?.ok()?;
    assert_eq!(again.stdout, listed);
    drop(server2);
    Ok(())
}

/// Completions list the subcommands.
#[test]
fn completions_name_the_commands() -> Result<()> {
    let bash = coordinator(&["completions", "bash"])?.ok()?;
    for word in ["backup", "restore", "doctor", "sign"] {
        assert!(bash.stdout.contains(word), "{word}");
    }
    let zsh = site_agent(&["completions", "zsh"])?.ok()?;
    for word in ["doctor", "init", "run"] {
        assert!(zsh.stdout.contains(word), "{word}");
    }
    if site_agent(&["completions", "nosuchshell"])?.code == Some(0) {
        bail!("an unknown shell is refused");
    }
    Ok(())
}
