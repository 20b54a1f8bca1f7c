//! The task indexes, so that no call scans every task: unfinished tasks by site and by round,
//! and leases by when they end. Each is a sled tree of keys with empty values, written in the
//! same transaction as the tasks they index ([`super::Store::commit`]), and rebuilt from the
//! tasks when a database of schema version 1 (before they were kept) is opened.

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::{StoreResult, TaskRecord, TaskState, decode};

/// The three index trees.
#[derive(Clone, Debug)]
pub(super) struct Indexes {
    /// `site \0 task_id`: unfinished tasks (waiting, pending, leased) of a site.
    pub(super) by_site: sled::Tree,
    /// `round_id \0 task_id`: unfinished tasks of a round.
    pub(super) by_round: sled::Tree,
    /// `deadline (8 bytes, ordered) task_id`: leased tasks by when their lease ends.
    pub(super) leases: sled::Tree,
}

/// Key of an index entry: a prefix and the task id after a NUL (names and ids never hold
/// one).
pub(super) fn under(prefix: &str, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 1 + task_id.len());
    k.extend_from_slice(prefix.as_bytes());
    k.push(0);
    k.extend_from_slice(task_id.as_bytes());
    k
}

/// The prefix of every entry under `prefix`.
pub(super) fn prefix(prefix: &str) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.push(0);
    k
}

/// Key of a lease entry: the deadline as 8 bytes that sort as the signed number does.
pub(super) fn lease_key(deadline_ms: i64, task_id: &str) -> Vec<u8> {
    let mut k = ((deadline_ms as u64) ^ (1 << 63)).to_be_bytes().to_vec();
    k.extend_from_slice(task_id.as_bytes());
    k
}

/// The task id of an index key (after the NUL, or after a lease key's 8 bytes).
pub(super) fn task_of(key: &[u8], lease: bool) -> String {
    let rest = if lease {
        key.get(8..).unwrap_or_default()
    } else {
        key.iter().position(|&b| b == 0).map_or(&[][..], |i| &key[i + 1..])
    };
    String::from_utf8_lossy(rest).into_owned()
}

/// The entries a task has in each index (by site, by round, lease).
fn entries(t: &TaskRecord) -> [Option<Vec<u8>>; 3] {
    if t.state.is_final() {
        return [None, None, None];
    }
    let lease = match t.state {
        TaskState::Leased { deadline_ms } => Some(lease_key(deadline_ms, &t.id)),
        _ => None,
    };
    [Some(under(&t.site, &t.id)), Some(under(&t.round_id, &t.id)), lease]
}

/// Moves a task's index entries from what `old` (its stored bytes, if any) had to what `new`
/// has, inside a transaction.
pub(super) fn reindex(
    trees: [&TransactionalTree; 3],
    old: Option<&[u8]>,
    new: &TaskRecord,
) -> Result<(), UnabortableTransactionError> {
    let before = old
        .and_then(|b| serde_json::from_slice::<TaskRecord>(b).ok())
        .map(|t| entries(&t))
        .unwrap_or_default();
    let after = entries(new);
    for ((tree, b), a) in trees.iter().zip(before).zip(after) {
        if b != a {
            if let Some(b) = b {
                tree.remove(b)?;
            }
            if let Some(a) = a {
                tree.insert(a, &[])?;
            }
        }
    }
    Ok(())
}

impl Indexes {
    /// Clears the indexes and writes them again from every task.
    pub(super) fn rebuild(&self, tasks: &sled::Tree) -> StoreResult<()> {
        for tree in [&self.by_site, &self.by_round, &self.leases] {
            tree.clear()?;
        }
        for kv in tasks.iter() {
            let (k, v) = kv?;
            let t: TaskRecord = decode("tasks", &k, &v)?;
            for (tree, key) in [&self.by_site, &self.by_round, &self.leases].iter().zip(entries(&t))
            {
                if let Some(key) = key {
                    tree.insert(key, &[])?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{SCHEMA_VERSION, Store};
    use super::*;

    fn task(id: &str, site: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            round_id: "r1".into(),
            site: site.into(),
            state,
            ..Default::default()
        }
    }

    #[test]
    fn the_indexes_follow_every_change_and_are_rebuilt_for_an_older_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = Store::open(&path).expect("open");
        let a1 = task("r1.a", "a", TaskState::Pending);
        let b1 = task("r1.b", "b", TaskState::Leased { deadline_ms: 2_000 });
        let a0 = task("r0.a", "a", TaskState::Leased { deadline_ms: -5 });
        store.commit(None, &[&a1, &b1, &a0], None).expect("commit");
        assert_eq!(store.open_tasks_of_site("a").expect("a"), ["r0.a", "r1.a"], "in id order");
        assert_eq!(store.open_tasks_of_site("b").expect("b"), ["r1.b"]);
        assert!(store.open_tasks_of_site("ab").expect("ab").is_empty(), "a whole name only");
        assert_eq!(
            store.expired_leases(1_999).expect("leases"),
            ["r0.a"],
            "a negative time sorts first"
        );
        assert_eq!(store.expired_leases(2_000).expect("leases"), ["r0.a", "r1.b"]);
        assert!(store.round_has_open_tasks("r1", "r1.a").expect("open"));
        assert_take_woken(&store, &["a"]);

        // A renewed lease moves; a finished task leaves every index.
        let b1 = task("r1.b", "b", TaskState::Leased { deadline_ms: 9_000 });
        let a0 = task("r0.a", "a", TaskState::Succeeded);
        store.commit(None, &[&b1, &a0], None).expect("commit");
        assert_eq!(store.expired_leases(8_999).expect("leases"), Vec::<String>::new());
        assert_eq!(store.expired_leases(9_000).expect("leases"), ["r1.b"]);
        assert_eq!(store.open_tasks_of_site("a").expect("a"), ["r1.a"]);
        let a1 = task("r1.a", "a", TaskState::Failed { reason: "x".into() });
        store.commit(None, &[&a1], None).expect("commit");
        assert!(!store.round_has_open_tasks("r1", "r1.b").expect("open"), "r1.b is the last");
        assert!(store.round_has_open_tasks("r1", "other").expect("open"));
        assert_take_woken(&store, &[]);
        drop(store);

        // A version-1 database (no indexes, no version): the indexes are built at open.
        let raw = retry(|| sled::open(&path));
        for t in ["index_site_tasks", "index_round_tasks", "index_leases"] {
            raw.drop_tree(t).expect("drop");
        }
        raw.open_tree("meta").expect("meta").remove("schema_version").expect("remove");
        raw.flush().expect("flush");
        drop(raw);
        let store = retry(|| Store::open(&path));
        assert_eq!(store.open_tasks_of_site("b").expect("b"), ["r1.b"]);
        assert_eq!(store.expired_leases(i64::MAX - 1).expect("leases"), ["r1.b"]);
        assert!(store.open_tasks_of_site("a").expect("a").is_empty());
        let v = store.db().open_tree("meta").expect("meta").get("schema_version").expect("get");
        assert_eq!(v.as_deref(), Some(&SCHEMA_VERSION.to_be_bytes()[..]));
    }

    fn assert_take_woken(store: &Store, sites: &[&str]) {
        let mut got: Vec<String> = store.take_woken().into_iter().collect();
        got.sort();
        assert_eq!(got, sites);
    }

    /// sled's threads may hold the file lock of a handle just dropped for a moment.
    fn retry<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> T {
        for _ in 0..100 {
            match open() {
                Ok(v) => return v,
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("open: {e}"),
            }
        }
        panic!("the database stayed locked")
    }
}
