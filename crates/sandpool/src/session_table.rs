//! The session table: which identifier holds which sandbox, kept so that a restarted server
//! (after a crash or `kill -9`) gives every identifier its session back.
//!
//! It is an [`EventSink`] in front of the telemetry sink: allocations add a row, executions
//! and file changes move its last access, deletions remove it. The request path only appends
//! a line to a journal file (`<state>/sessions.journal`, one `write` per event, no fsync: the
//! sandboxes themselves do not survive a power cut, so surviving a process crash is what
//! counts, and the page cache survives that). Once a second the journal is folded into the
//! database's `sessions` table in one transaction and started afresh. At start the table and
//! whatever journal is left are read back, merged, and written to the database.
//!
//! The same fold copies the session event log's new events to the database (keeping the
//! newest `max_events`), and `open` puts them back into the log, so the log survives restarts
//! too (up to the last second before a crash).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sandpool_engine::events::{EventSink, PoolEvent, SessionEvent, SessionEventKind};
use sandpool_engine::pool::SessionRecord;
use sandpool_engine::Identifier;
use sandpool_store::{Change, Store, Table};
use sandpool_telemetry::{LoggedEvent, Telemetry};
use serde::{Deserialize, Serialize};

const JOURNAL: &str = "sessions.journal";
/// The journal being folded into the database (renamed away so appends go on meanwhile).
const FOLDING: &str = "sessions.journal.folding";
/// How often the journal is folded into the database.
const FOLD_EVERY: Duration = Duration::from_secs(1);

/// A row of the session table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    pool: String,
    identifier: String,
    sandbox_id: String,
    /// Milliseconds since the epoch.
    created_at: u64,
    last_access: u64,
}

/// A journal line: a row written, or a key removed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Put(Row),
    Delete(String),
}

pub struct SessionTable {
    store: Arc<Store>,
    dir: PathBuf,
    /// Every live row, by `<pool>/<identifier>`.
    rows: Mutex<HashMap<String, Row>>,
    /// Keys changed since the last fold.
    dirty: Mutex<HashMap<String, Option<Row>>>,
    journal: Mutex<File>,
    telemetry: Arc<Telemetry>,
    /// The last event-log sequence number copied to the database.
    events_saved: AtomicU64,
    /// The last journal write failed (a full disk): reported once.
    journal_failing: AtomicBool,
    /// Reads (a session GET, a file listing) move a session's last access without an event;
    /// each fold takes it from the engine.
    engine: std::sync::OnceLock<Arc<sandpool_engine::Engine>>,
    max_events: u64,
}

fn key(pool: &str, identifier: &str) -> String {
    format!("{pool}/{identifier}")
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn time(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

impl SessionTable {
    /// Reads the table (and any journal a crash left) and makes the database current.
    pub fn open(store: Arc<Store>, state_dir: &Path, telemetry: Arc<Telemetry>, max_events: usize) -> anyhow::Result<SessionTable> {
        let events: Vec<LoggedEvent> =
            store.events_after(0, max_events).context("cannot read the event log")?.into_iter().map(|(_, event)| event).collect();
        let events_saved = events.last().map(|event| event.sequence).unwrap_or(0);
        telemetry.events.restore(events);
        let mut rows: HashMap<String, Row> =
            store.list::<Row>(Table::Sessions).context("cannot read the session table")?.into_iter().collect();
        let stored: Vec<String> = rows.keys().cloned().collect();
        let mut replayed = 0;
        for name in [FOLDING, JOURNAL] {
            let path = state_dir.join(name);
            let Ok(file) = File::open(&path) else { continue };
            for line in BufReader::new(file).lines() {
                // A torn last line (the crash came mid-write) is skipped.
                let Ok(line) = line else { break };
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Put(row)) => {
                        rows.insert(key(&row.pool, &row.identifier), row);
                    }
                    Ok(Line::Delete(key)) => {
                        rows.remove(&key);
                    }
                    Err(_) => continue,
                }
                replayed += 1;
            }
        }
        let mut changes: Vec<Change> =
            stored.iter().filter(|key| !rows.contains_key(*key)).map(|key| Change::delete(Table::Sessions, key)).collect();
        changes.extend(rows.iter().map(|(key, row)| Change::put(Table::Sessions, key, row)));
        store.apply(&changes).context("cannot write the session table")?;
        for name in [FOLDING, JOURNAL] {
            let _ = std::fs::remove_file(state_dir.join(name));
        }
        if replayed > 0 || !rows.is_empty() {
            tracing::info!(sessions = rows.len(), journal_lines = replayed, "session table read");
        }
        let journal = open_journal(state_dir)?;
        Ok(SessionTable {
            store,
            dir: state_dir.to_owned(),
            rows: Mutex::new(rows),
            dirty: Mutex::new(HashMap::new()),
            journal: Mutex::new(journal),
            telemetry,
            events_saved: AtomicU64::new(events_saved),
            journal_failing: AtomicBool::new(false),
            engine: std::sync::OnceLock::new(),
            max_events: max_events as u64,
        })
    }

    /// The recorded sessions of `pool`, to restore when it starts.
    pub fn records(&self, pool: &str) -> Vec<SessionRecord> {
        let rows = self.rows.lock().expect("rows lock");
        rows.values()
            .filter(|row| row.pool == pool)
            .filter_map(|row| {
                Some(SessionRecord {
                    identifier: Identifier::parse(&row.identifier).ok()?,
                    sandbox_id: row.sandbox_id.clone(),
                    created_at: time(row.created_at),
                    last_access: time(row.last_access),
                })
            })
            .collect()
    }

    /// Journals one change. Called with the `rows` lock held, so the journal's order is the
    /// order of the changes.
    fn change(&self, key: String, row: Option<Row>) {
        let line = match &row {
            Some(row) => Line::Put(row.clone()),
            None => Line::Delete(key.clone()),
        };
        let mut text = serde_json::to_string(&line).expect("journal lines serialise");
        text.push('\n');
        {
            let mut journal = self.journal.lock().expect("journal lock");
            match journal.write_all(text.as_bytes()) {
                // Said once, not for every event while the disk is full.
                Err(err) if !self.journal_failing.swap(true, Ordering::SeqCst) => tracing::error!(
                    error = %err,
                    "cannot write the session journal; changes reach the database at the next fold (a crash before it loses them)"
                ),
                Err(_) => {}
                Ok(()) => {
                    if self.journal_failing.swap(false, Ordering::SeqCst) {
                        tracing::info!("the session journal is writable again");
                    }
                }
            }
        }
        self.dirty.lock().expect("dirty lock").insert(key, row);
    }

    /// Lets each fold take last accesses from the engine (see `engine`), and forgets the
    /// rows of pools the engine no longer has (deleted or no longer valid while the server
    /// was down: their sessions cannot come back).
    pub fn watch(&self, engine: Arc<sandpool_engine::Engine>) {
        let pools: Vec<String> = engine.pools().iter().map(|pool| pool.name().to_owned()).collect();
        let mut rows = self.rows.lock().expect("rows lock");
        let gone: Vec<String> = rows.iter().filter(|(_, row)| !pools.contains(&row.pool)).map(|(key, _)| key.clone()).collect();
        for key in gone {
            rows.remove(&key);
            self.change(key, None);
        }
        drop(rows);
        let _ = self.engine.set(engine);
    }

    /// Records last accesses that moved without an event.
    fn sync_last_access(&self) {
        let Some(engine) = self.engine.get() else { return };
        for pool in engine.pools() {
            for session in pool.sessions() {
                let key = key(pool.name(), session.identifier.as_str());
                let at = millis(session.last_access);
                let mut rows = self.rows.lock().expect("rows lock");
                let moved = rows.get_mut(&key).filter(|row| row.last_access < at).map(|row| {
                    row.last_access = at;
                    row.clone()
                });
                if let Some(row) = moved {
                    self.change(key, Some(row));
                }
            }
        }
    }

    /// Folds the journal into the database: one transaction for everything changed since
    /// the last fold. The journal is renamed first, so appends go on into a fresh one.
    pub fn fold(&self) -> anyhow::Result<()> {
        self.sync_last_access();
        let new_events = self.telemetry.events.since(self.events_saved.load(Ordering::SeqCst));
        if let Some(last) = new_events.last().map(|event| event.sequence) {
            self.store.append_events(&new_events).context("cannot save the event log")?;
            self.store.trim_events(self.max_events).context("cannot trim the event log")?;
            self.events_saved.store(last, Ordering::SeqCst);
        }
        if self.dirty.lock().expect("dirty lock").is_empty() {
            return Ok(());
        }
        // Rotate first, then take the changes: a change made in between is both in the new
        // journal and in the next fold, never only in memory.
        {
            let mut journal = self.journal.lock().expect("journal lock");
            let (current, folding) = (self.dir.join(JOURNAL), self.dir.join(FOLDING));
            if folding.exists() {
                // An earlier fold failed: its lines stay, these go after them.
                let lines = std::fs::read(&current).context("cannot read the session journal")?;
                OpenOptions::new()
                    .append(true)
                    .open(&folding)
                    .and_then(|mut f| f.write_all(&lines))
                    .context("cannot rotate the session journal")?;
                journal.set_len(0).context("cannot rotate the session journal")?;
            } else {
                std::fs::rename(&current, &folding).context("cannot rotate the session journal")?;
                *journal = open_journal(&self.dir)?;
            }
        }
        let changes: HashMap<String, Option<Row>> = std::mem::take(&mut *self.dirty.lock().expect("dirty lock"));
        let batch: Vec<Change> = changes
            .iter()
            .map(|(key, row)| match row {
                Some(row) => Change::put(Table::Sessions, key, row),
                None => Change::delete(Table::Sessions, key),
            })
            .collect();
        if let Err(err) = self.store.apply(&batch) {
            // Keep the rotated journal (it is replayed at start) and try again next time.
            let mut dirty = self.dirty.lock().expect("dirty lock");
            for (key, row) in changes {
                dirty.entry(key).or_insert(row);
            }
            return Err(err.into());
        }
        let _ = std::fs::remove_file(self.dir.join(FOLDING));
        Ok(())
    }

    /// Folds the journal once a second until the server stops.
    pub fn spawn_folding(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let table = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(FOLD_EVERY).await;
                let folding = table.clone();
                match tokio::task::spawn_blocking(move || folding.fold()).await {
                    Ok(Ok(())) => failing = false,
                    Ok(Err(err)) if !failing => {
                        tracing::error!("cannot update the session table in the database (the journal keeps the changes): {err:#}");
                        failing = true;
                    }
                    _ => {}
                }
            }
        })
    }
}

fn open_journal(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(JOURNAL);
    OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))
}

impl EventSink for SessionTable {
    fn session(&self, event: SessionEvent) {
        let key = key(&event.pool, event.identifier.as_str());
        let at = millis(event.at);
        {
            let mut rows = self.rows.lock().expect("rows lock");
            let row = match &event.kind {
                SessionEventKind::Allocated { .. } => event.sandbox_id.clone().map(|sandbox_id| {
                    let row = Row {
                        pool: event.pool.clone(),
                        identifier: event.identifier.as_str().to_owned(),
                        sandbox_id,
                        created_at: at,
                        last_access: at,
                    };
                    rows.insert(key.clone(), row.clone());
                    Some(row)
                }),
                SessionEventKind::Executed { .. } | SessionEventKind::FilesChanged(_) => rows.get_mut(&key).map(|row| {
                    row.last_access = at;
                    Some(row.clone())
                }),
                SessionEventKind::Deleted { .. } => rows.remove(&key).map(|_| None),
            };
            if let Some(row) = row {
                self.change(key, row);
            }
        }
        self.telemetry.session(event);
    }

    fn pool(&self, pool: &str, event: PoolEvent) {
        self.telemetry.pool(pool, event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpool_engine::events::DeletionReason;

    fn event(identifier: &str, sandbox: &str, kind: SessionEventKind) -> SessionEvent {
        SessionEvent {
            at: SystemTime::now(),
            pool: "main".into(),
            identifier: Identifier::parse(identifier).unwrap(),
            sandbox_id: Some(sandbox.into()),
            kind,
        }
    }

    fn open(dir: &Path) -> SessionTable {
        let store = Arc::new(Store::open(dir).unwrap());
        SessionTable::open(store, dir, Telemetry::new(Duration::from_secs(3600), 100), 100).unwrap()
    }

    #[test]
    fn the_journal_alone_brings_the_table_back_after_a_crash_and_a_fold_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let table = open(dir.path());
            let allocated = || SessionEventKind::Allocated { from_ready_queue: true, wait: Duration::ZERO };
            table.session(event("user-kept", "sb-1", allocated()));
            table.session(event("user-gone", "sb-2", allocated()));
            table.session(event("user-gone", "sb-2", SessionEventKind::Deleted { reason: DeletionReason::Explicit }));
            // Dropped without a fold: a crash.
        }
        let table = open(dir.path());
        let records = table.records("main");
        assert_eq!(records.iter().map(|r| (r.identifier.as_str(), r.sandbox_id.as_str())).collect::<Vec<_>>(), vec![("user-kept", "sb-1")]);
        assert!(table.records("other").is_empty());
        assert!(!dir.path().join(JOURNAL).exists() || std::fs::metadata(dir.path().join(JOURNAL)).unwrap().len() == 0);
        // The events went to the log and, with the next fold, to the database.
        table.session(event("user-kept", "sb-1", SessionEventKind::Deleted { reason: DeletionReason::Cooldown }));
        table.fold().unwrap();
        drop(table);
        let table = open(dir.path());
        assert!(table.records("main").is_empty());
        assert_eq!(table.telemetry.events.since(0).len(), 1, "the event folded before the restart is back");
    }
}
