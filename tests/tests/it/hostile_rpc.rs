//! Hostile requests to the coordinator: oversized messages, uploads with more bytes or chunks
//! than declared, negative, huge and not-a-number values, unknown task kinds. Each is refused
//! with a status that says what was wrong, and the server keeps answering.

use coordinator::identity::Role;
use proto::pb;
use tests::federation::Federation;

type R = anyhow::Result<()>;

fn push(header: Option<pb::ModelRef>, chunks: Vec<Vec<u8>>) -> Vec<pb::PushModelRequest> {
    header
        .map(|h| pb::PushModelRequest { part: Some(pb::push_model_request::Part::Header(h)) })
        .into_iter()
        .chain(
            chunks.into_iter().map(|c| pb::PushModelRequest {
                part: Some(pb::push_model_request::Part::Chunk(c)),
            }),
        )
        .collect()
}

/// Asserts `r` was refused with `code` and a message mentioning `words`.
fn expect<T>(
    refused: &mut Vec<String>,
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    words: &str,
) {
    assert!(!words.is_empty(), "{what}: name the refusal expected, or the test proves nothing");
    let s = match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(s) => s,
    };
    assert_eq!(s.code(), code, "{what}: {}", s.message());
    assert!(
        !s.message().is_empty() && s.message().to_ascii_lowercase().contains(words),
        "{what}: the message \"{}\" should mention \"{words}\"",
        s.message()
    );
    refused.push(what.to_owned());
}

fn model(size: u64) -> pb::ModelRef {
    pb::ModelRef { sha256: "ab".repeat(32), size, name: "hostile".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_server_stays_up() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    fed.study("hostile", "tiny").await?;
    // A client that will send messages past the server's limit.
    let mut admin = fed.admin().await?.max_encoding_message_size(64 << 20);
    let mut refused = Vec::new();
    // Uploads.
    let r = admin.push_model(tokio_stream::iter(push(Some(model(8)), vec![vec![0; 16]]))).await;
    expect(
        &mut refused,
        "more bytes than declared",
        r,
        tonic::Code::InvalidArgument,
        "more bytes than the header's size 8",
    );
    let r = admin
        .push_model(tokio_stream::iter(push(Some(model(4 << 20)), vec![vec![0; (1 << 20) + 1]])))
        .await;
    expect(
        &mut refused,
        "a chunk over 1 MiB",
        r,
        tonic::Code::InvalidArgument,
        "chunk of 1048577 bytes; at most 1048576",
    );
    let r = admin.push_model(tokio_stream::iter(push(None, vec![vec![0; 4]]))).await;
    expect(
        &mut refused,
        "chunks without a header",
        r,
        tonic::Code::InvalidArgument,
        "an upload starts with its header",
    );
    let r = admin
        .push_model(tokio_stream::iter(push(
            Some(model(proto::limits::MAX_MODEL_BYTES + 1)),
            vec![],
        )))
        .await;
    expect(
        &mut refused,
        "a model over the size limit",
        r,
        tonic::Code::InvalidArgument,
        "model size 2147483649 is outside 1..=2147483648",
    );
    let r = admin
        .push_model(tokio_stream::iter(push(Some(model(8 << 20)), vec![vec![0; 8 << 20]])))
        .await;
    expect(&mut refused, "a message over 4 MiB", r, tonic::Code::InvalidArgument, "too large");

    // Task specs.
    let round = |spec: pb::TaskSpec| pb::StartRoundRequest {
        study: "hostile".into(),
        spec: Some(spec),
        ..Default::default()
    };
    let finetune = pb::TaskSpec {
        kind: pb::TaskKind::Finetune as i32,
        trainable_layers: 2,
        ..Default::default()
    };
    let r = admin.start_round(round(pb::TaskSpec { kind: 99, ..Default::default() })).await;
    expect(&mut refused, "an unknown task kind", r, tonic::Code::InvalidArgument, "kind");
    let r = admin.start_round(round(pb::TaskSpec { epochs: u32::MAX, ..finetune.clone() })).await;
    expect(&mut refused, "u32::MAX epochs", r, tonic::Code::InvalidArgument, "epochs");
    let r = admin
        .start_round(round(pb::TaskSpec { learning_rate: f64::NAN, ..finetune.clone() }))
        .await;
    expect(&mut refused, "a NaN learning rate", r, tonic::Code::InvalidArgument, "learning_rate");
    let r =
        admin.start_round(round(pb::TaskSpec { learning_rate: -1.0, ..finetune.clone() })).await;
    expect(
        &mut refused,
        "a negative learning rate",
        r,
        tonic::Code::InvalidArgument,
        "learning_rate",
    );
    let r =
        admin.start_round(round(pb::TaskSpec { batch_size: u32::MAX, ..finetune.clone() })).await;
    expect(&mut refused, "a huge batch", r, tonic::Code::InvalidArgument, "batch_size");
    let r = admin
        .start_round(pb::StartRoundRequest { quorum: u32::MAX, ..round(finetune.clone()) })
        .await;
    expect(&mut refused, "a quorum above the sites", r, tonic::Code::InvalidArgument, "quorum");
    let r = admin
        .start_round(pb::StartRoundRequest {
            deadline_seconds: u32::MAX,
            ..round(finetune.clone())
        })
        .await;
    expect(&mut refused, "a deadline of 136 years", r, tonic::Code::InvalidArgument, "deadline");

    // Names.
    let r = admin
        .approve_site(pb::SiteRequest { name: "../../etc".into(), ..Default::default() })
        .await;
    expect(
        &mut refused,
        "a path as a site name",
        r,
        tonic::Code::InvalidArgument,
        "\"../../etc\" is not a valid site name",
    );
    // With a valid base and site, so that only the name can be what is refused.
    let r = admin
        .create_study(pb::CreateStudyRequest {
            name: "x".repeat(10_000),
            base_model: "base-tiny".into(),
            sites: vec!["site-a".into()],
        })
        .await;
    expect(
        &mut refused,
        "a 10 000-character study name",
        r,
        tonic::Code::InvalidArgument,
        "... (10000 characters) is not a valid study name",
    );

    // A request that does not decode: field 1 of RoundRequest is a string, sent as a number.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotARoundRequest {
        #[prost(uint64, tag = "1")]
        round_id: u64,
    }
    let mut raw = tonic::client::Grpc::new(fed.channel(Some(&fed.bundle(Role::Admin, "lead"))));
    raw.ready().await?;
    let r: Result<tonic::Response<pb::RoundInfo>, _> = raw
        .unary(
            tonic::Request::new(NotARoundRequest { round_id: 7 }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/fedtune.v1.AdminService/GetRound",
            ),
            tonic_prost::ProstCodec::<NotARoundRequest, pb::RoundInfo>::default(),
        )
        .await;
    expect(
        &mut refused,
        "a request that does not decode",
        r,
        tonic::Code::InvalidArgument,
        "not a valid fedtune.v1.roundrequest",
    );

    // Still serving.
    let sites = fed.admin().await?.list_sites(pb::ListSitesRequest {}).await?.into_inner();
    assert_eq!(sites.sites.len(), 1);
    eprintln!("{} hostile requests refused, server still answering: {refused:?}", refused.len());
    fed.shutdown().await
}

/// A site that floods the coordinator is slowed down with ResourceExhausted after its burst,
/// while the study lead (another identity) is served as usual; after a pause it is served
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_identity_is_rate_limited_alone() -> R {
    let fed = Federation::builder().sites(1).without_agents().start().await?;
    fed.study("flood", "tiny").await?;
    let mut link = tests::federation::site_link(&fed, "site-a").await?;
    let (mut ok, mut limited) = (0, 0);
    let mut message = String::new();
    for _ in 0..600 {
        match link.hello(pb::HelloRequest::default()).await {
            Ok(_) => ok += 1,
            Err(site_agent::agent::CallError::Status(s))
                if s.code() == tonic::Code::ResourceExhausted =>
            {
                limited += 1;
                message = s.message().to_owned();
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert!(limited > 0, "600 calls at once were all served");
    assert!(ok >= 200, "the burst of 200 is served: {ok}");
    assert!(message.contains("site-a") && message.contains("slow down"), "{message}");
    // The study lead is not affected by a site's flood.
    fed.admin().await?.list_sites(pb::ListSitesRequest {}).await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    link.hello(pb::HelloRequest::default()).await?;
    eprintln!("flood: {ok} served, {limited} refused with ResourceExhausted");
    fed.shutdown().await
}
