//! What the protocol's messages can carry, read from the generated descriptors: the only bytes
//! fields are weights chunks (and the coordinator's own backup, to the study lead), and no field is named like a path, a file, an image, a label
//! volume or a case identifier.

use prost::Message;
use prost_types::{FileDescriptorSet, field_descriptor_proto::Type};

fn fields() -> Vec<(String, String, Type)> {
    let set = FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "fedtune.v1") {
        let mut stack: Vec<(String, &prost_types::DescriptorProto)> =
            file.message_type.iter().map(|m| (m.name().to_owned(), m)).collect();
        while let Some((name, m)) = stack.pop() {
            for f in &m.field {
                out.push((name.clone(), f.name().to_owned(), f.r#type()));
            }
            stack.extend(m.nested_type.iter().map(|n| (format!("{name}.{}", n.name()), n)));
        }
    }
    out
}

#[test]
fn only_weights_chunks_are_bytes() {
    let mut bytes: Vec<String> = fields()
        .into_iter()
        .filter(|(_, _, t)| *t == Type::Bytes)
        .map(|(m, f, _)| format!("{m}.{f}"))
        .collect();
    bytes.sort();
    // Weights chunks, and the coordinator's backup archive, which only AdminService sends
    // (to the study lead; no site message carries bytes but weights).
    assert_eq!(
        bytes,
        [
            "BackupChunk.data",
            "ModelChunk.data",
            "PushModelRequest.chunk",
            "UploadModelRequest.chunk"
        ]
    );
}

#[test]
fn no_field_is_named_for_patient_data() {
    let all = fields();
    assert!(all.len() > 50, "the descriptors were read ({} fields)", all.len());
    for (m, f, _) in all {
        for word in [
            "path",
            "file",
            "image",
            "voxel",
            "contour",
            "patient",
            "case_id",
            "identifier",
            "dicom",
            "mask",
        ] {
            assert!(!f.contains(word), "{m}.{f} looks like it could carry {word}");
        }
    }
}

/// The coordinator bounds every call but uploads by a total deadline; uploads, bounded per
/// chunk instead, are found by `proto::CLIENT_STREAMING_METHODS`, which must list exactly the
/// methods whose request is a stream.
#[test]
fn the_client_streaming_list_matches_the_services() {
    let set = FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut streaming = Vec::new();
    let mut methods = 0;
    for file in set.file.iter().filter(|f| f.package() == "fedtune.v1") {
        for service in &file.service {
            for m in &service.method {
                methods += 1;
                if m.client_streaming() {
                    streaming.push(format!("/fedtune.v1.{}/{}", service.name(), m.name()));
                }
            }
        }
    }
    assert!(methods > 15, "the services were read ({methods} methods)");
    let mut listed: Vec<String> =
        proto::CLIENT_STREAMING_METHODS.iter().map(|s| s.to_string()).collect();
    streaming.sort();
    listed.sort();
    assert_eq!(streaming, listed);
}
