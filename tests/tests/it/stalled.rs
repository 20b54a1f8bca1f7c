//! Slow and stalled clients hold the coordinator's resources only up to a bound: a TLS
//! handshake that never finishes is cut at its deadline, connections past the cap are closed
//! at once, an upload that stops sending chunks and a download whose reader stops reading are
//! ended after the idle limit, while an upload that is slow but steady goes through. A
//! refused certificate is logged in words.

use std::path::Path;
use std::time::{Duration, Instant};

use coordinator::identity::Role;
use proto::pb::{self, site_service_client::SiteServiceClient};
use tests::federation::{Federation, site_link};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

/// Waits until the server closes `read` (end of stream or reset); returns when, from `t0`.
async fn closed_after(
    mut read: impl tokio::io::AsyncRead + Unpin,
    t0: Instant,
) -> anyhow::Result<Duration> {
    let mut buf = [0u8; 256];
    let wait = async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .map_err(|_| anyhow::anyhow!("the server kept a stalled connection open for 20 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_are_cut_at_the_deadline_and_connections_are_capped() -> R {
    let fed = Federation::builder()
        .sites(1)
        .without_agents()
        .coordinator_process()
        .limits(|l| {
            l.handshake_seconds = 2;
            l.max_connections = 6;
        })
        .start()
        .await?;

    // Five connections that never send a byte, and one that trickles a TLS record header
    // and then a byte every 100 ms (a 512-byte record would take 50 s).
    let mut waits = Vec::new();
    for _ in 0..5 {
        let s = TcpStream::connect(fed.addr).await?;
        waits.push(tokio::spawn(closed_after(s, Instant::now())));
    }
    let slow = TcpStream::connect(fed.addr).await?;
    let t_slow = Instant::now();
    let (r, mut w) = slow.into_split();
    waits.push(tokio::spawn(closed_after(r, t_slow)));
    let trickle = tokio::spawn(async move {
        for b in [0x16u8, 0x03, 0x01, 0x02, 0x00].into_iter().chain(std::iter::repeat(0)) {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The seventh is past the cap: closed at once, long before any handshake deadline.
    let over = TcpStream::connect(fed.addr).await?;
    let t_over = Instant::now();
    let over_closed = closed_after(over, t_over).await?;
    assert!(over_closed < Duration::from_millis(1500), "closed after {over_closed:?}");

    let mut cut = Vec::new();
    for w in waits {
        cut.push(w.await??);
    }
    trickle.abort();
    for d in &cut {
        assert!(
            *d >= Duration::from_millis(1800) && *d < Duration::from_secs(8),
            "a stalled connection was closed after {d:?}; the deadline is 2 s"
        );
    }
    let longest = cut.iter().max().expect("six connections");
    eprintln!(
        "stalled clients: 6 of 6 cut after {:.2}..{:.2} s (deadline 2 s); the 7th, past the cap \
         of 6, closed after {} ms",
        cut.iter().min().expect("six").as_secs_f64(),
        longest.as_secs_f64(),
        over_closed.as_millis()
    );

    // The slots are free again: the study lead is served.
    fed.admin().await?.list_models(pb::ListModelsRequest {}).await?;

    // An expired site certificate is refused, and the coordinator's log says whose, when it
    // expired and what to do.
    let expired = coordinator::pki::Pki::open(&fed.pki_dir)?.issue(Role::Site, "site-x", -1)?;
    let r = SiteServiceClient::new(fed.channel(Some(&expired)))
        .hello(pb::HelloRequest::default())
        .await;
    assert!(r.is_err(), "an expired certificate was accepted");
    let log_path = fed.root.join("coordinator.log");
    let log = wait_for_log(&log_path, "site certificate of \"site-x\"").await?;
    let line = log.lines().find(|l| l.contains("site-x")).unwrap_or_default();
    eprintln!("the coordinator's log: {line}");
    assert!(line.contains("it expired on") && line.contains("`site-agent init` at the site"));
    assert!(log.contains("TLS handshake did not finish in time"), "{log}");
    assert!(log.contains("connection cap reached"), "{log}");
    fed.shutdown().await
}

/// The coordinator's log once it has a line containing `words` (10 s at most).
async fn wait_for_log(path: &Path, words: &str) -> anyhow::Result<String> {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(words) {
            return Ok(log);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("no \"{words}\" in the coordinator's log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn header(bytes: &[u8], name: &str) -> pb::PushModelRequest {
    pb::PushModelRequest {
        part: Some(pb::push_model_request::Part::Header(pb::ModelRef {
            sha256: site_agent::weights::sha256_hex(bytes),
            size: bytes.len() as u64,
            name: name.into(),
        })),
    }
}

fn chunk(bytes: &[u8]) -> pb::PushModelRequest {
    pb::PushModelRequest { part: Some(pb::push_model_request::Part::Chunk(bytes.to_vec())) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_pass_stalled_uploads_and_readers_are_ended_after_the_idle_limit() -> R {
    // Single-message calls are bounded by max_poll + idle = 3 s; uploads by 2 s per chunk.
    let fed = Federation::builder()
        .sites(1)
        .without_agents()
        .limits(|l| {
            l.max_poll_seconds = 1;
            l.idle_seconds = 2;
        })
        .start()
        .await?;
    let mut admin = fed.admin().await?;
    let bytes = std::fs::read(fed.base_model("tiny")?)?;

    // Slow but steady: six pieces 0.8 s apart, 4.8 s in all, longer than any single call may
    // take, is stored.
    let pieces: Vec<Vec<u8>> = bytes.chunks(bytes.len().div_ceil(6)).map(<[u8]>::to_vec).collect();
    assert_eq!(pieces.len(), 6);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let feeder = {
        let msgs: Vec<_> = std::iter::once(header(&bytes, "slow"))
            .chain(pieces.iter().map(|p| chunk(p)))
            .collect();
        tokio::spawn(async move {
            for m in msgs {
                tokio::time::sleep(Duration::from_millis(800)).await;
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        })
    };
    let t0 = Instant::now();
    let info =
        admin.push_model(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    feeder.await?;
    let slow_took = t0.elapsed();
    assert!(slow_took > Duration::from_secs(4), "{slow_took:?}");
    assert_eq!(info.model.expect("stored model").size, bytes.len() as u64);

    // Stalled: a header and one piece, then nothing while the stream stays open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(header(&bytes, "stalled")).await?;
    tx.send(chunk(&pieces[0])).await?;
    let t0 = Instant::now();
    let r = admin.push_model(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    let stalled_after = t0.elapsed();
    drop(tx);
    let s = r.expect_err("a stalled upload was accepted");
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{}", s.message());
    assert!(s.message().contains("no chunk for 2 s"), "{}", s.message());
    assert!(stalled_after < Duration::from_secs(6), "{stalled_after:?}");
    let models = admin.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
    assert!(
        models.iter().all(|m| m.model.as_ref().is_none_or(|r| r.name != "stalled")),
        "a stalled upload was stored"
    );

    // A download whose reader stops: a model of many chunks, a client that takes one and
    // then waits. The coordinator ends the stream; what the client read before is intact.
    let big = fed.base_model("resnet103")?;
    coordinator::lead::push_model(&mut admin, &big, "base-big", false).await?;
    admin.approve_site(pb::SiteRequest { name: "site-a".into(), ..Default::default() }).await?;
    admin
        .create_study(pb::CreateStudyRequest {
            name: "big".into(),
            base_model: "base-big".into(),
            sites: vec!["site-a".into()],
        })
        .await?;
    fed.start_round(
        "big",
        pb::TaskSpec { kind: pb::TaskKind::Evaluate as i32, ..Default::default() },
    )
    .await?;
    let mut link = site_link(&fed, "site-a").await?;
    link.hello(pb::HelloRequest::default()).await?;
    let task = link.next_task(2).await?.expect("a task for site-a");
    let model = task.base.expect("the task's model");
    let chunks = model.size.div_ceil(proto::limits::CHUNK_BYTES as u64);
    assert!(chunks >= 12, "the model has {chunks} chunks; the test needs a dozen");
    let ch = fed.channel_with(Some(&fed.bundle(Role::Site, "site-a")), |e| {
        e.initial_stream_window_size(Some(64 << 10)).http2_adaptive_window(false)
    });
    let mut site =
        SiteServiceClient::new(ch).max_decoding_message_size(proto::limits::MAX_MESSAGE_BYTES);
    let mut stream = site
        .fetch_model(pb::FetchModelRequest { sha256: model.sha256.clone(), offset: 0 })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first chunk");
    assert_eq!(first.offset, 0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut received = first.data.len() as u64;
    let end = loop {
        match stream.message().await {
            Ok(Some(c)) => {
                assert_eq!(c.offset, received, "chunks arrive in order");
                received += c.data.len() as u64;
            }
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    let s = end.expect("a stalled reader's stream ends with an error, not as if complete");
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{}", s.message());
    assert!(received < model.size, "{received} of {} bytes", model.size);
    eprintln!(
        "idle limit 2 s: a 6-piece upload over {:.1} s stored; a stalled upload ended after \
         {:.1} s; a stalled reader got {} of {} chunks, then DEADLINE_EXCEEDED",
        slow_took.as_secs_f64(),
        stalled_after.as_secs_f64(),
        received.div_ceil(proto::limits::CHUNK_BYTES as u64),
        chunks
    );
    fed.shutdown().await
}

/// One certificate may hold only so many connections: a site opening more gets the extra
/// ones closed, everyone else is served, and a closed connection gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_take_every_connection() -> R {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let fed = Federation::builder()
        .sites(1)
        .without_agents()
        .limits(|l| l.max_connections_per_identity = 2)
        .start()
        .await?;
    let site = fed.bundle(Role::Site, "site-a");
    let check = |ch: tonic::transport::Channel| async move {
        HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await
    };
    let first = fed.channel(Some(&site));
    let second = fed.channel(Some(&site));
    check(first.clone()).await?;
    check(second.clone()).await?;
    let third = check(fed.channel(Some(&site))).await;
    assert!(third.is_err(), "a third connection of one site was served");
    check(fed.channel(Some(&fed.bundle(Role::Admin, "lead")))).await?;
    // The first connection closes; its slot comes back.
    drop(first);
    let t0 = Instant::now();
    loop {
        match check(fed.channel(Some(&site))).await {
            Ok(_) => break,
            Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(second);
    fed.shutdown().await
}
