//! Backups of a coordinator's state: a tar archive with the database's every tree
//! (`db.records`), every model blob (`blobs/<sha256>`) and a manifest (`manifest.json`, last)
//! that lists each file with its size and sha256, the schema version and when it was made.
//!
//! `coordinator backup` asks the running server (`AdminService.Backup`), which writes the
//! archive under the write lock that every change of state holds, so the database part is
//! one consistent state; blobs are immutable once stored, so those the state names are there.
//! `coordinator restore` rebuilds a data dir from an archive: it refuses a data dir that holds
//! anything, checks every file against the manifest (and the manifest's own list against the
//! archive) before it writes a record, and leaves nothing behind when a check fails.
//!
//! `db.records` is a sequence of records, each a little-endian u32 length and that many bytes:
//! a tree's name, then its number of entries as a u64 (8 bytes, little-endian), then key and
//! value per entry. (sled's own export/import panics on errors; this one returns them.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{SCHEMA_VERSION, Store, StoreError};

/// What is in an archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `fedtune-coordinator-backup`.
    pub format: String,
    pub schema_version: u32,
    pub created_unix: i64,
    pub coordinator_version: String,
    /// Every file but the manifest, with its size and sha256.
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

const FORMAT: &str = "fedtune-coordinator-backup";

/// Backup and restore errors, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("{archive}: {why}; it is not a whole fedtune backup, nothing was restored")]
    Bad { archive: PathBuf, why: String },
    #[error(
        "{0} holds files already; restore into a new or empty folder (nothing was changed there)"
    )]
    NotEmpty(PathBuf),
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T, BackupError> {
    r.map_err(|source| BackupError::Io { path: path.to_owned(), source })
}

/// A database's trees: (name, entries in key order).
type Trees = Vec<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)>;

/// Every tree of `store` with its entries.
fn trees(store: &Store) -> Result<Trees, StoreError> {
    let db = store.db();
    let mut out = Vec::new();
    for name in db.tree_names() {
        let entries = db
            .open_tree(&name)?
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<Vec<_>, _>>()?;
        out.push((name.to_vec(), entries));
    }
    Ok(out)
}

/// `trees` as `db.records` bytes.
fn dump(trees: &Trees) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    for (name, entries) in trees {
        put(name);
        put(&(entries.len() as u64).to_le_bytes());
        for (k, v) in entries {
            put(k);
            put(v);
        }
    }
    out
}

fn parse_dump(bytes: &[u8]) -> Result<Trees, String> {
    let mut at = 0usize;
    let mut take = || -> Result<&[u8], String> {
        let len = bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
            .ok_or("db.records ends inside a record")?;
        let rec = bytes.get(at + 4..at + 4 + len).ok_or("db.records ends inside a record")?;
        at += 4 + len;
        Ok(rec)
    };
    let mut trees = Vec::new();
    loop {
        let name = match take() {
            Ok(n) => n.to_vec(),
            Err(_) if at == bytes.len() => return Ok(trees),
            Err(e) => return Err(e),
        };
        let count: [u8; 8] = take()?.try_into().map_err(|_| "a tree's count is not 8 bytes")?;
        let count = u64::from_le_bytes(count);
        let mut entries = Vec::new();
        for _ in 0..count {
            entries.push((take()?.to_vec(), take()?.to_vec()));
        }
        trees.push((name, entries));
    }
}

/// Writes a whole archive of `store` and the blobs in `blobs` to `out`; the caller holds the
/// coordinator's write lock. Returns the manifest.
pub fn write_archive(
    store: &Store,
    blobs: &Path,
    out: impl Write,
) -> Result<Manifest, BackupError> {
    let mut tar = tar::Builder::new(out);
    let mut files = Vec::new();
    // Each file hashed as it is read into the archive: one pass over each blob.
    let add = |tar: &mut tar::Builder<_>, path: &str, size: u64, data: &mut dyn Read| {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o600);
        header.set_cksum();
        let (mut hash, mut read) = (Sha256::new(), 0u64);
        let mut reader = HashRead { inner: data, hash: &mut hash, size: &mut read };
        tar.append_data(&mut header, path, &mut reader)?;
        Ok::<_, std::io::Error>(FileEntry {
            path: path.to_owned(),
            size: read,
            sha256: hex::encode(hash.finalize()),
        })
    };
    let db = dump(&trees(store)?);
    let records = Path::new("db.records");
    files.push(io(records, add(&mut tar, "db.records", db.len() as u64, &mut db.as_slice()))?);
    let mut names: Vec<String> = io(blobs, std::fs::read_dir(blobs))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    for name in names {
        let path = blobs.join(&name);
        let mut f = io(&path, std::fs::File::open(&path))?;
        let size = io(&path, f.metadata())?.len();
        let entry = io(&path, add(&mut tar, &format!("blobs/{name}"), size, &mut f))?;
        if entry.sha256 != name {
            return Err(BackupError::Io {
                path,
                source: std::io::Error::other(format!(
                    "the stored blob's bytes hash to {}: the blob store is damaged",
                    entry.sha256
                )),
            });
        }
        files.push(entry);
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        created_unix: shared::cert::now_unix(),
        coordinator_version: env!("CARGO_PKG_VERSION").into(),
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o600);
    header.set_cksum();
    let m = Path::new("manifest.json");
    io(m, tar.append_data(&mut header, "manifest.json", json.as_slice()))?;
    io(m, tar.into_inner().and_then(|mut w| w.flush()))?;
    Ok(manifest)
}

struct HashRead<'a> {
    inner: &'a mut dyn Read,
    hash: &'a mut Sha256,
    size: &'a mut u64,
}

impl Read for HashRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        *self.size += n as u64;
        Ok(n)
    }
}

/// Rebuilds a data dir (`db/` and `blobs/`) from `archive` into `data_dir`, which must not
/// exist or be empty. Returns the archive's manifest.
pub fn restore(archive: &Path, data_dir: &Path) -> Result<Manifest, BackupError> {
    if data_dir.exists() {
        let mut entries = io(data_dir, std::fs::read_dir(data_dir))?;
        if entries.next().is_some() {
            return Err(BackupError::NotEmpty(data_dir.to_owned()));
        }
    }
    io(data_dir, std::fs::create_dir_all(data_dir))?;
    let result = restore_into(archive, data_dir);
    if result.is_err() {
        // Only what this call wrote: the folder was empty.
        let _ = std::fs::remove_dir_all(data_dir.join("db"));
        let _ = std::fs::remove_dir_all(data_dir.join("blobs"));
        let _ = std::fs::remove_dir_all(data_dir.join(".restoring"));
    }
    result
}

fn restore_into(archive: &Path, data_dir: &Path) -> Result<Manifest, BackupError> {
    let bad = |why: String| BackupError::Bad { archive: archive.to_owned(), why };
    let staging = data_dir.join(".restoring");
    io(&staging, std::fs::create_dir_all(staging.join("blobs")))?;
    let file = io(archive, std::fs::File::open(archive))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut found: Vec<FileEntry> = Vec::new();
    let mut manifest: Option<Manifest> = None;
    for entry in tar.entries().map_err(|e| bad(format!("not a tar archive ({e})")))? {
        let mut entry = entry.map_err(|e| bad(format!("unreadable entry ({e})")))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
        if path == "manifest.json" {
            let mut json = Vec::new();
            io(archive, entry.by_ref().take(16 << 20).read_to_end(&mut json))?;
            manifest =
                Some(serde_json::from_slice(&json).map_err(|e| bad(format!("manifest: {e}")))?);
            continue;
        }
        let target = match path.strip_prefix("blobs/") {
            Some(name) if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) => {
                staging.join("blobs").join(name)
            }
            None if path == "db.records" => staging.join("db.records"),
            _ => return Err(bad(format!("unexpected entry {path:?}"))),
        };
        let mut out = io(&target, std::fs::File::create(&target))?;
        let (mut hash, mut size) = (Sha256::new(), 0u64);
        let mut reader = HashRead { inner: &mut entry, hash: &mut hash, size: &mut size };
        io(&target, std::io::copy(&mut reader, &mut out))?;
        io(&target, out.sync_all())?;
        found.push(FileEntry { path, size, sha256: hex::encode(hash.finalize()) });
    }
    let manifest = manifest.ok_or_else(|| bad("no manifest.json (a cut archive?)".into()))?;
    if manifest.format != FORMAT {
        return Err(bad(format!("format {:?}", manifest.format)));
    }
    if manifest.schema_version > SCHEMA_VERSION {
        return Err(bad(format!(
            "schema version {} is newer than this coordinator's ({SCHEMA_VERSION}): restore \
             with the version that made it",
            manifest.schema_version
        )));
    }
    let mut listed = manifest.files.clone();
    listed.sort_by(|a, b| a.path.cmp(&b.path));
    found.sort_by(|a, b| a.path.cmp(&b.path));
    if listed != found {
        let differ = listed
            .iter()
            .filter(|l| !found.contains(l))
            .map(|l| l.path.as_str())
            .chain(found.iter().filter(|f| !listed.contains(f)).map(|f| f.path.as_str()))
            .collect::<Vec<_>>();
        return Err(bad(format!("these files do not match the manifest: {}", differ.join(", "))));
    }
    if let Some(b) =
        found.iter().find(|f| f.path.strip_prefix("blobs/").is_some_and(|n| *n != f.sha256))
    {
        return Err(bad(format!("{} does not hash to its name", b.path)));
    }
    let records = staging.join("db.records");
    let bytes = io(&records, std::fs::read(&records))?;
    let trees = parse_dump(&bytes).map_err(bad)?;
    let db_path = data_dir.join("db");
    {
        let db = sled::Config::new().path(&db_path).open().map_err(StoreError::from)?;
        for (name, entries) in trees {
            let tree = db.open_tree(&name).map_err(StoreError::from)?;
            for (k, v) in entries {
                tree.insert(k, v).map_err(StoreError::from)?;
            }
        }
        db.flush().map_err(StoreError::from)?;
    }
    // Opens as a store: the schema version is checked (and written where it was not kept).
    drop(Store::open(&db_path)?);
    let blobs = data_dir.join("blobs");
    io(&blobs, std::fs::rename(staging.join("blobs"), &blobs))?;
    io(&staging, std::fs::remove_dir_all(&staging))?;
    Ok(manifest)
}

/// Every tree of the database at `db_path` with its entries, sorted: what a restore must give
/// back (tests compare two data dirs with it).
pub fn contents(db_path: &Path) -> Result<Trees, BackupError> {
    let mut all = trees(&Store::open(db_path)?)?;
    all.sort();
    Ok(all)
}
