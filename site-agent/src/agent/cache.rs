//! Which files of the model cache were found to match their sha256, and when: a download is
//! hashed once on its way in, a cached copy once per run of the agent (and again when its
//! size or modification time changes), not at every task that uses it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use shared::weights::HashStamp;

fn verified() -> &'static Mutex<HashMap<PathBuf, HashStamp>> {
    static V: OnceLock<Mutex<HashMap<PathBuf, HashStamp>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

fn stamp(path: &Path) -> Option<HashStamp> {
    std::fs::metadata(path).ok().map(|m| HashStamp::of(&m))
}

/// Remembers that `path` as it is now matches its name (it was hashed on the way in).
pub(super) fn note_verified(path: &Path, _sha256: &str) {
    if let Some(s) = stamp(path) {
        verified().lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_owned(), s);
    }
}

/// Whether the cached file `path` holds the bytes of `sha256`: hashed (a piece at a time)
/// unless this run found it so before and it has not changed since ([`HashStamp::still`]).
pub(super) async fn verify(path: &Path, sha256: &str) -> std::io::Result<bool> {
    let now = stamp(path);
    let known = verified().lock().unwrap_or_else(|e| e.into_inner()).get(path).copied();
    if let (Some(k), Some(n)) = (known, now)
        && k.still(&n)
    {
        return Ok(true);
    }
    let p = path.to_owned();
    let (got, _) = tokio::task::spawn_blocking(move || shared::weights::sha256_file(&p))
        .await
        .map_err(std::io::Error::other)??;
    let ok = got == sha256;
    let mut v = verified().lock().unwrap_or_else(|e| e.into_inner());
    match (ok, now) {
        (true, Some(n)) => v.insert(path.to_owned(), n),
        _ => v.remove(path),
    };
    Ok(ok)
}
