//! Tests of the store: round trips, atomic multi-record changes, the event log, durability
//! across a `kill -9` of a writing process, and a full disk.

use std::process::Command;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pool {
    max: u32,
    image: String,
}

fn pool(max: u32) -> Pool {
    Pool { max, image: format!("img:{max}") }
}

#[test]
fn records_round_trip_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.put(Table::Pools, "web", &pool(5)).unwrap();
        store.put(Table::Pools, "api", &pool(7)).unwrap();
        store.put(Table::Pools, "web", &pool(6)).unwrap();
        assert_eq!(store.get::<Pool>(Table::Pools, "web").unwrap(), Some(pool(6)));
        assert_eq!(store.get::<Pool>(Table::Sessions, "web").unwrap(), None, "tables are separate");
        assert!(store.delete(Table::Pools, "api").unwrap());
        assert!(!store.delete(Table::Pools, "api").unwrap());
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.list::<Pool>(Table::Pools).unwrap(), vec![("web".to_owned(), pool(6))]);
}

#[test]
fn a_record_of_the_wrong_shape_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put(Table::Keys, "signing", &"not a pool").unwrap();
    let err = store.get::<Pool>(Table::Keys, "signing").unwrap_err();
    assert!(err.to_string().contains("\"signing\" in table keys"), "{err}");
}

#[test]
fn several_changes_apply_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put(Table::Pools, "old", &pool(1)).unwrap();
    store.apply(&[Change::put(Table::Pools, "new", &pool(2)), Change::delete(Table::Pools, "old")]).unwrap();
    let names: Vec<String> = store.list::<Pool>(Table::Pools).unwrap().into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["new"]);
}

#[test]
fn the_event_log_appends_reads_in_order_and_trims_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.append_events(&["a", "b"]).unwrap(), 1);
    assert_eq!(store.append_events(&["c"]).unwrap(), 3);
    let after_one: Vec<(u64, String)> = store.events_after(1, 10).unwrap();
    assert_eq!(after_one, vec![(2, "b".to_owned()), (3, "c".to_owned())]);
    assert_eq!(store.trim_events(1).unwrap(), 2);
    let left: Vec<(u64, String)> = store.events_after(0, 10).unwrap();
    assert_eq!(left, vec![(3, "c".to_owned())]);
    // Numbering continues after a trim, and after reopening.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.append_events(&["d"]).unwrap(), 4);
}

/// Not a test by itself: the writer process of the crash test. Commits numbered records
/// (each transaction writes the same number to two tables) and reports each commit on
/// stdout until it is killed.
#[test]
fn crash_writer() {
    let Ok(dir) = std::env::var("SANDPOOL_STORE_CRASH_DIR") else { return };
    let store = Store::open(Path::new(&dir)).unwrap();
    for n in 0u64.. {
        let value = vec![n; 64];
        store.apply(&[Change::put(Table::Sessions, &format!("s{n:08}"), &value), Change::put(Table::Pools, "counter", &n)]).unwrap();
        println!("committed {n}");
    }
}

#[test]
fn kill_9_during_writes_keeps_every_committed_record_and_a_consistent_file() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::crash_writer", "--nocapture", "--test-threads=1"])
        .env("SANDPOOL_STORE_CRASH_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_reported = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("committed ").and_then(|n| n.parse::<u64>().ok()) {
            last_reported = Some(n);
            if n >= 200 {
                break;
            }
        }
    }
    // Killed mid-stream: it is most likely inside a transaction right now.
    child.kill().unwrap();
    child.wait().unwrap();
    let last_reported = last_reported.expect("the writer committed something");
    let store = Store::open(dir.path()).unwrap();
    let counter: u64 = store.get(Table::Pools, "counter").unwrap().unwrap();
    assert!(counter >= last_reported, "commit {last_reported} was reported durable, but the file holds {counter}");
    let sessions: Vec<(String, Vec<u64>)> = store.list(Table::Sessions).unwrap();
    // Both tables come from the same transactions: exactly counter + 1 records, all whole.
    assert_eq!(sessions.len() as u64, counter + 1);
    for (index, (key, value)) in sessions.iter().enumerate() {
        assert_eq!(key, &format!("s{index:08}"));
        assert_eq!(value, &vec![index as u64; 64]);
    }
}

#[test]
fn a_full_disk_fails_writes_clearly_and_keeps_what_was_committed() {
    assert!(nix_is_root(), "this test mounts a small tmpfs; run the tests as root (scripts/test does)");
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"]).arg(dir.path()).status().unwrap();
    assert!(status.success(), "cannot mount a tmpfs for the full-disk test");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let store = Store::open(dir.path()).unwrap();
    store.put(Table::Pools, "kept", &pool(1)).unwrap();
    let big = "x".repeat(256 << 10);
    let mut full = None;
    for n in 0..64 {
        match store.put(Table::Sessions, &format!("big{n}"), &big) {
            Ok(()) => continue,
            Err(err) => {
                full = Some((n, err));
                break;
            }
        }
    }
    let (written, err) = full.expect("a 2 MiB disk filled up");
    assert!(matches!(err, StoreError::Full { .. }), "{err}");
    assert!(err.to_string().contains("disk holding"), "{err}");
    // Everything committed before is still there, through the same handle.
    assert_eq!(store.get::<Pool>(Table::Pools, "kept").unwrap(), Some(pool(1)));
    assert_eq!(store.list::<String>(Table::Sessions).unwrap().len(), written);
    // Free space: writes work again.
    for n in 0..written {
        store.delete(Table::Sessions, &format!("big{n}")).unwrap();
    }
    store.put(Table::Pools, "after", &pool(2)).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get::<Pool>(Table::Pools, "after").unwrap(), Some(pool(2)));
}

fn nix_is_root() -> bool {
    // The effective uid, from /proc/self/status (no libc call needed).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find(|line| line.starts_with("Uid:")).map(|line| line.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
