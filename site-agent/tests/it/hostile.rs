//! Hostile and damaged input never panics: the NIfTI reader, the site manifest parser and the
//! weights-file parser each answer every input with a value or an error.
//!
//! Inputs are valid files with bytes overwritten, removed or appended, and arbitrary bytes.
//! CI runs `FEDTUNE_FUZZ_CASES` (default 64) cases per target; `bench/fuzz.sh` runs many more
//! and prints the executions.

use candle_core::Device;
use proptest::prelude::*;
use site_agent::data::{Manifest, Volume, read_image, read_labels, write_image, write_labels};

/// Cases per property: `FEDTUNE_FUZZ_CASES`, default 64.
fn cases() -> u32 {
    std::env::var("FEDTUNE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
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

/// A mutation of a valid input: byte overwrites, then an optional cut or appended tail.
#[derive(Clone, Debug)]
struct Mutation {
    writes: Vec<(usize, u8)>,
    cut: Option<usize>,
    tail: Vec<u8>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..12),
        prop::option::of(any::<usize>()),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(writes, cut, tail)| Mutation { writes, cut, tail })
}

fn apply(valid: &[u8], m: &Mutation, header_bias: usize) -> Vec<u8> {
    let mut b = valid.to_vec();
    for (i, &(at, v)) in m.writes.iter().enumerate() {
        // Half of the writes land in the first `header_bias` bytes, where parsers decide.
        let span = if i % 2 == 0 { header_bias.min(b.len()) } else { b.len() };
        if span > 0 {
            b[at % span] = v;
        }
    }
    if let Some(cut) = m.cut {
        b.truncate(cut % (b.len() + 1));
    }
    b.extend_from_slice(&m.tail);
    b
}

fn valid_nifti(gz: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join(if gz { "v.nii.gz" } else { "v.nii" });
    let img =
        Volume::new([3, 4, 2], [1.0, 1.5, 2.0], (0..24).map(|i| i as f32 * 10.0 - 100.0).collect());
    write_image(&p, &img).expect("write");
    std::fs::read(&p).expect("read")
}

fn valid_labels() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("l.nii");
    let lab = Volume::new([3, 4, 2], [1.0; 3], (0..24).map(|i| i % 3).collect());
    write_labels(&p, &lab).expect("write");
    std::fs::read(&p).expect("read")
}

const MANIFEST: &str = "[organs]\n1 = \"brainstem\"\n2 = \"mandible\"\n\n\
    [[cases]]\nid = \"c001\"\nimage = \"images/c001.nii.gz\"\nlabel = \"labels/c001.nii.gz\"\n\
    split = \"train\"\n\n[[cases]]\nid = \"c002\"\nimage = \"i2.nii\"\nlabel = \"l2.nii\"\nsplit = \"test\"\n";

fn valid_weights() -> Vec<u8> {
    let cfg = site_agent::model::ModelConfig::preset("tiny").expect("preset");
    let net =
        site_agent::model::Net::new(&cfg, &site_agent::data::phantom::organ_map(), 1, &Device::Cpu)
            .expect("net");
    site_agent::weights::to_bytes(&net, &Default::default()).expect("bytes")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn nifti_reader_answers_damaged_files(m in mutation(), gz in any::<bool>(), labels in any::<bool>()) {
        ran();
        thread_local! {
            static VALID: [Vec<u8>; 3] = [valid_nifti(false), valid_nifti(true), valid_labels()];
        }
        let bytes = VALID.with(|v| {
            let src = if labels { &v[2] } else if gz { &v[1] } else { &v[0] };
            apply(src, &m, 352)
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(if gz && !labels { "f.nii.gz" } else { "f.nii" });
        std::fs::write(&p, &bytes).expect("write");
        let _ = read_image(&p);
        let _ = read_labels(&p);
    }

    #[test]
    fn nifti_reader_answers_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        ran();
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.nii");
        std::fs::write(&p, &bytes).expect("write");
        let _ = read_image(&p);
    }

    #[test]
    fn manifest_parser_answers_damaged_text(m in mutation(), text in ".{0,200}") {
        ran();
        let damaged = apply(MANIFEST.as_bytes(), &m, MANIFEST.len());
        let path = std::path::Path::new("/site/manifest.toml");
        if let Ok(s) = std::str::from_utf8(&damaged) {
            let _ = Manifest::parse(s, path);
        }
        let _ = Manifest::parse(&text, path);
    }

    #[test]
    fn weights_parser_answers_damaged_files(m in mutation()) {
        ran();
        thread_local! { static VALID: Vec<u8> = valid_weights(); }
        let bytes = VALID.with(|v| {
            // The safetensors header (length prefix and JSON) comes first.
            let header = 8 + u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) as usize;
            apply(v, &m, header)
        });
        let _ = site_agent::weights::read_manifest(&bytes);
        let _ = site_agent::weights::from_bytes(&bytes, &Device::Cpu);
    }
}
