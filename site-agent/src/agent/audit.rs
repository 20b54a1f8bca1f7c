//! The site's audit log: every message the agent sent, in the agent's own sled database.
//!
//! Each entry holds the time, the RPC, the encoded message (so hospital IT can read exactly
//! what left), its size and sha256, and the hash of the previous entry; an entry's own hash
//! covers all of that, so `site-agent audit --verify` finds an altered or removed entry.
//! Each entry is also appended to `audit.jsonl` beside the database, which `site-agent audit`
//! reads while a running agent holds the database's lock.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One outbound message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: i64,
    /// `fedtune.v1.SiteService/NAME`.
    pub rpc: String,
    pub bytes: u64,
    /// sha256 of the encoded message, hex.
    pub sha256: String,
    /// The encoded protobuf message, hex.
    pub message_hex: String,
    /// `hash` of the previous entry; zeros for the first.
    pub prev_hash: String,
    /// sha256 over seq, time, rpc, sha256 and prev_hash.
    pub hash: String,
}

impl AuditEntry {
    /// The message as it was sent (empty if `message_hex` was altered into non-hex).
    pub fn message(&self) -> Vec<u8> {
        hex::decode(&self.message_hex).unwrap_or_default()
    }
}

impl AuditEntry {
    /// When it was sent, UTC, to the millisecond: `2026-12-02 19:44:33.123Z`.
    pub fn time_utc(&self) -> String {
        let t =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.time_ms) * 1_000_000);
        match t {
            Ok(t) => format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            ),
            Err(_) => format!("{} ms", self.time_ms),
        }
    }

    /// The message in words: its fields as the protocol names them, a weights chunk by its
    /// size only. An error names what could not be read.
    pub fn decoded(&self) -> Result<String, String> {
        use prost::Message;
        use proto::pb;
        let bytes = hex::decode(&self.message_hex).map_err(|e| format!("message_hex: {e}"))?;
        let b = bytes.as_slice();
        let method = self.rpc.rsplit('/').next().unwrap_or_default();
        let text = match method {
            "Hello" => pb::HelloRequest::decode(b).map(|m| format!("{m:?}")),
            "NextTask" => pb::NextTaskRequest::decode(b).map(|m| format!("{m:?}")),
            "FetchModel" => pb::FetchModelRequest::decode(b).map(|m| format!("{m:?}")),
            "Heartbeat" => pb::HeartbeatRequest::decode(b).map(|m| format!("{m:?}")),
            "SubmitResult" => pb::SubmitResultRequest::decode(b).map(|m| format!("{m:?}")),
            "UploadModel" => pb::UploadModelRequest::decode(b).map(|m| match m.part {
                Some(pb::upload_model_request::Part::Chunk(c)) => {
                    format!("weights chunk of {} bytes", c.len())
                }
                other => format!("{other:?}"),
            }),
            other => return Err(format!("no decoder for the RPC {other:?}")),
        };
        text.map_err(|e| format!("{method}: {e}"))
    }
}

fn entry_hash(seq: u64, time_ms: i64, rpc: &str, sha256: &str, prev: &str) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_be_bytes());
    h.update(time_ms.to_be_bytes());
    h.update(rpc.as_bytes());
    h.update([0]);
    h.update(sha256.as_bytes());
    h.update(prev.as_bytes());
    hex::encode(h.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log: {0}")]
    Sled(#[from] sled::Error),
    #[error("audit log entry {0} is unreadable: {1}")]
    Corrupt(u64, String),
}

/// The audit log.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tree: sled::Tree,
    db: sled::Db,
    /// `audit.jsonl`, the readable mirror.
    mirror: std::path::PathBuf,
    /// Serialises appends, so sequence numbers and the hash chain stay in order.
    append: std::sync::Arc<std::sync::Mutex<()>>,
}

impl AuditLog {
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let db = sled::Config::new().path(dir.join("audit")).open()?;
        Ok(Self {
            tree: db.open_tree("outbound")?,
            db,
            mirror: dir.join("audit.jsonl"),
            append: Default::default(),
        })
    }

    /// The entries of the log in `dir`, from the database, or from its `audit.jsonl` mirror
    /// when a running agent holds the database.
    pub fn read(dir: &Path) -> Result<(Vec<AuditEntry>, &'static str), AuditError> {
        match Self::open(dir) {
            Ok(log) => Ok((log.entries()?, "database")),
            Err(AuditError::Sled(e)) if e.to_string().contains("lock") => {
                let path = dir.join("audit.jsonl");
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| AuditError::Sled(sled::Error::Io(e)))?;
                let entries = text
                    .lines()
                    .enumerate()
                    .map(|(i, l)| {
                        serde_json::from_str(l)
                            .map_err(|e| AuditError::Corrupt(i as u64, e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
                Ok((entries, "audit.jsonl (the agent is running)"))
            }
            Err(e) => Err(e),
        }
    }

    /// Records one outbound message before it is sent, durably.
    pub fn record(&self, rpc: &str, message: &[u8]) -> Result<AuditEntry, AuditError> {
        let _guard = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.tree.last()?;
        let (seq, prev_hash) = match last {
            Some((_, v)) => {
                let e: AuditEntry = serde_json::from_slice(&v)
                    .map_err(|e| AuditError::Corrupt(u64::MAX, e.to_string()))?;
                (e.seq + 1, e.hash)
            }
            None => (0, "0".repeat(64)),
        };
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let sha256 = hex::encode(Sha256::digest(message));
        let hash = entry_hash(seq, time_ms, rpc, &sha256, &prev_hash);
        let entry = AuditEntry {
            seq,
            time_ms,
            rpc: rpc.into(),
            bytes: message.len() as u64,
            sha256,
            message_hex: hex::encode(message),
            prev_hash,
            hash,
        };
        let json = serde_json::to_string(&entry).expect("entries serialize");
        self.tree.insert(seq.to_be_bytes(), json.as_bytes())?;
        self.db.flush()?;
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.mirror)
            .map_err(sled::Error::Io)?;
        writeln!(f, "{json}").map_err(sled::Error::Io)?;
        Ok(entry)
    }

    pub fn entries(&self) -> Result<Vec<AuditEntry>, AuditError> {
        self.tree
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let seq = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0xff; 8]));
                serde_json::from_slice(&v).map_err(|e| AuditError::Corrupt(seq, e.to_string()))
            })
            .collect()
    }

    /// Checks the hash chain; returns the problems found (empty when intact).
    pub fn verify(&self) -> Result<Vec<String>, AuditError> {
        Ok(verify(&self.entries()?))
    }
}

/// Checks the hash chain of `entries`; returns the problems found (empty when intact).
pub fn verify(entries: &[AuditEntry]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut prev = "0".repeat(64);
    let mut expected_seq = 0;
    for e in entries {
        if e.seq != expected_seq {
            problems.push(format!("entry {expected_seq} is missing (next is {})", e.seq));
        }
        let message = e.message();
        if hex::encode(Sha256::digest(&message)) != e.sha256 || message.len() as u64 != e.bytes {
            problems.push(format!("entry {}: the message does not match its hash", e.seq));
        }
        if e.prev_hash != prev {
            problems.push(format!("entry {}: the chain is broken before it", e.seq));
        }
        if entry_hash(e.seq, e.time_ms, &e.rpc, &e.sha256, &e.prev_hash) != e.hash {
            problems.push(format!("entry {}: altered", e.seq));
        }
        prev = e.hash.clone();
        expected_seq = e.seq + 1;
    }
    problems
}

/// Compares `entries` with the head the coordinator kept (`seq`, `head`): the problem found,
/// if any. A log cut after that entry, or rewritten up to it (even with a consistent chain),
/// no longer holds that hash at that position.
pub fn check_anchor(entries: &[AuditEntry], seq: u64, head: &str) -> Option<String> {
    match entries.iter().find(|e| e.seq == seq) {
        None => {
            let last = entries.last().map_or("the log is empty".to_owned(), |e| {
                format!("the log ends at entry {}", e.seq)
            });
            Some(format!(
                "the coordinator holds entry {seq} of this log, but {last}: entries were removed \
                 from the end"
            ))
        }
        Some(e) if e.hash != head => Some(format!(
            "entry {seq} is not the entry the coordinator was told of (hash {}.. there, {}.. \
             here): the log was rewritten",
            &head[..head.len().min(12)],
            &e.hash[..e.hash.len().min(12)]
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(n: usize) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        for i in 0..n {
            log.record("fedtune.v1.SiteService/Heartbeat", &[i as u8, 1, 2]).expect("record");
        }
        (dir, log)
    }

    fn rewrite(log: &AuditLog, seq: u64, change: impl FnOnce(&mut AuditEntry)) {
        let v = log.tree.get(seq.to_be_bytes()).expect("get").expect("entry");
        let mut e: AuditEntry = serde_json::from_slice(&v).expect("json");
        change(&mut e);
        let json = serde_json::to_vec(&e).expect("json");
        log.tree.insert(seq.to_be_bytes(), json).expect("insert");
    }

    #[test]
    fn entries_read_in_words_with_utc_times() {
        use prost::Message;
        use proto::pb;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("open");
        let beat = pb::HeartbeatRequest { task_id: "r1-abc.site-a".into(), ..Default::default() };
        log.record("fedtune.v1.SiteService/Heartbeat", &beat.encode_to_vec()).expect("record");
        let chunk = pb::UploadModelRequest {
            part: Some(pb::upload_model_request::Part::Chunk(vec![7; 4096])),
        };
        log.record("fedtune.v1.SiteService/UploadModel", &chunk.encode_to_vec()).expect("record");
        log.record("fedtune.v1.SiteService/Hello", &[0xff, 0xff]).expect("record");
        let mut e = log.entries().expect("entries");
        let text = e[0].decoded().expect("a heartbeat decodes");
        assert!(text.contains("task_id: \"r1-abc.site-a\""), "{text}");
        assert_eq!(e[1].decoded().expect("a chunk decodes"), "weights chunk of 4096 bytes");
        let bad = e[2].decoded().expect_err("garbage is not a HelloRequest");
        assert!(bad.starts_with("Hello: "), "{bad}");
        e[0].time_ms = 1_764_704_673_123;
        assert_eq!(e[0].time_utc(), "2025-12-02 19:44:33.123Z");
    }

    #[test]
    fn an_intact_log_verifies_and_survives_reopening() {
        let (dir, log) = log_with(4);
        assert_eq!(log.verify().expect("verify"), Vec::<String>::new());
        drop(log);
        let again = AuditLog::open(dir.path()).expect("reopen");
        again.record("fedtune.v1.SiteService/SubmitResult", b"r").expect("append after reopen");
        let entries = again.entries().expect("entries");
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[4].prev_hash, entries[3].hash, "the chain continues");
        assert!(verify(&entries).is_empty());
    }

    /// Each kind of tampering is found and named by entry.
    #[test]
    fn altered_and_removed_entries_are_detected() {
        // The message replaced (hash of the message no longer matches).
        let (_d, log) = log_with(4);
        rewrite(&log, 1, |e| e.message_hex = hex::encode([9u8, 9, 9]));
        assert_eq!(log.verify().expect("verify"), ["entry 1: the message does not match its hash"]);

        // The message and its sha256 replaced together: the entry's own hash no longer fits.
        let (_d, log) = log_with(4);
        rewrite(&log, 2, |e| {
            e.message_hex = hex::encode([7u8]);
            e.bytes = 1;
            e.sha256 = hex::encode(Sha256::digest([7u8]));
        });
        assert_eq!(log.verify().expect("verify"), ["entry 2: altered"]);

        // The RPC or time changed.
        let (_d, log) = log_with(3);
        rewrite(&log, 0, |e| e.time_ms += 1);
        assert_eq!(log.verify().expect("verify"), ["entry 0: altered"]);

        // An entry removed from the middle.
        let (_d, log) = log_with(4);
        log.tree.remove(2u64.to_be_bytes()).expect("remove");
        let problems = log.verify().expect("verify");
        assert!(problems.contains(&"entry 2 is missing (next is 3)".to_owned()), "{problems:?}");
        assert!(problems.contains(&"entry 3: the chain is broken before it".to_owned()));

        // The link to the previous entry changed: the link and the entry's own hash break.
        let (_d, log) = log_with(2);
        rewrite(&log, 1, |e| e.prev_hash = "f".repeat(64));
        let problems = log.verify().expect("verify");
        assert!(problems.contains(&"entry 1: the chain is broken before it".to_owned()));
        assert!(problems.contains(&"entry 1: altered".to_owned()), "{problems:?}");
    }

    #[test]
    fn the_head_and_the_coordinators_anchor() {
        let (_d, log) = log_with(4);
        let entries = log.entries().expect("entries");
        let head = entries[3].hash.clone();
        // Intact, and the coordinator knew an earlier entry: both fine.
        assert_eq!(check_anchor(&entries, 3, &head), None);
        assert_eq!(check_anchor(&entries, 1, &entries[1].hash), None);
        // The tail cut after the anchored entry.
        let cut = check_anchor(&entries[..2], 3, &head).expect("a cut tail");
        assert!(cut.contains("ends at entry 1"), "{cut}");
        let empty = check_anchor(&[], 0, &entries[0].hash).expect("an emptied log");
        assert!(empty.contains("the log is empty"), "{empty}");
        // A different entry at the anchored position.
        let other = check_anchor(&entries, 2, &head).expect("a rewrite");
        assert!(other.contains("entry 2 is not the entry the coordinator was told of"), "{other}");
    }
}
