//! Every request the coordinator decodes answers arbitrary and damaged bytes with a message or
//! a decode error, never a panic. Damaged inputs start from a populated, valid encoding.
//! `FEDTUNE_FUZZ_CASES` (default 64) sets the cases per property; `bench/fuzz.sh` runs more.

use proptest::prelude::*;
use prost::Message;
use proto::pb;

fn cases() -> u32 {
    std::env::var("FEDTUNE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// Decodes `bytes` as every request type of both services.
fn decode_all(bytes: &[u8]) {
    macro_rules! each {
        ($($t:ty),*) => { $( let _ = <$t>::decode(bytes); )* };
    }
    each!(
        pb::HelloRequest,
        pb::NextTaskRequest,
        pb::FetchModelRequest,
        pb::HeartbeatRequest,
        pb::UploadModelRequest,
        pb::SubmitResultRequest,
        pb::AuditAnchorRequest,
        pb::PushModelRequest,
        pb::ListModelsRequest,
        pb::ListSitesRequest,
        pb::SiteRequest,
        pb::CreateStudyRequest,
        pb::ListStudiesRequest,
        pb::StartRoundRequest,
        pb::RoundRequest,
        pb::ListRoundsRequest,
        pb::StudyRequest
    );
}

/// Valid encodings with nested messages, repeated fields and bytes, to damage.
fn seeds() -> Vec<Vec<u8>> {
    let spec = pb::TaskSpec {
        kind: pb::TaskKind::TransferTarget as i32,
        epochs: 3,
        learning_rate: 0.01,
        arms: vec![pb::ArmSpec { kind: 3, trainable_layers: 2, ..Default::default() }],
        template: "transfer".into(),
        ..Default::default()
    };
    let result = pb::TaskResult { arms: vec![pb::ArmResult::default(); 2], ..Default::default() };
    vec![
        pb::StartRoundRequest { study: "npc".into(), spec: Some(spec), ..Default::default() }
            .encode_to_vec(),
        pb::SubmitResultRequest {
            task_id: "r1.site-a".into(),
            attempt: 1,
            outcome: Some(pb::submit_result_request::Outcome::Result(result)),
            ..Default::default()
        }
        .encode_to_vec(),
        pb::PushModelRequest { part: Some(pb::push_model_request::Part::Chunk(vec![7u8; 64])) }
            .encode_to_vec(),
        pb::HelloRequest::default().encode_to_vec(),
    ]
}

/// Counts a case that ran: with `FEDTUNE_FUZZ_TALLY=FILE` (set by `bench/fuzz.sh`) each case
/// appends one byte to FILE, so the script reports the executions that happened, shrinking
/// included, rather than the number it asked for.
fn ran() {
    if let Some(path) = std::env::var_os("FEDTUNE_FUZZ_TALLY") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(b".");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn requests_decode_arbitrary_bytes_or_refuse(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        ran();
        decode_all(&bytes);
    }

    #[test]
    fn requests_decode_damaged_encodings_or_refuse(
        seed in 0usize..4,
        writes in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<usize>()),
    ) {
        ran();
        let mut b = seeds().swap_remove(seed);
        for (at, v) in writes {
            let n = b.len();
            if n > 0 {
                b[at % n] = v;
            }
        }
        if let Some(c) = cut {
            b.truncate(c % (b.len() + 1));
        }
        decode_all(&b);
    }
}
