//! The server's embedded database: what must survive a restart or a crash.
//!
//! One [redb](https://docs.rs/redb) file, `<state_dir>/sandpool.redb`, with one table per kind
//! of record. Values are JSON documents, so the crates that own a record's shape (the pool
//! definitions, the session table, the event log, the signing keys) keep it next to their
//! code, and a record written by an older server still reads as long as its fields do.
//!
//! Crash safety is redb's: every write is one transaction that commits durably (copy-on-write
//! pages, then an fsync'd commit slot) or not at all, so `kill -9` or a power cut leaves the
//! last committed state. A full disk fails the write with [`StoreError::Full`] and leaves the
//! previous state intact; redb then refuses further use of that handle, so the store reopens
//! the file before the next operation.
//!
//! Architecture invariant: nothing else in the workspace opens the database file; everything
//! goes through [`Store`], which is safe to share between threads (redb serialises writers,
//! readers see committed snapshots). Calls block on disk I/O: use them from blocking threads
//! (or accept a short fsync on the async path for rare writes such as pool changes).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The database file's name in the state directory.
pub const FILE_NAME: &str = "sandpool.redb";

/// A table of JSON documents keyed by a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Pool definitions, by pool name.
    Pools,
    /// The session table, by `<pool>/<identifier>`.
    Sessions,
    /// Signing keys and other secrets of the server, by name.
    Keys,
}

impl Table {
    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Pools => TableDefinition::new("pools"),
            Table::Sessions => TableDefinition::new("sessions"),
            Table::Keys => TableDefinition::new("keys"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Table::Pools => "pools",
            Table::Sessions => "sessions",
            Table::Keys => "keys",
        }
    }
}

/// The event log: JSON events by sequence number, oldest first.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("the disk holding {path} is full; nothing was changed (free some space and retry)")]
    Full { path: PathBuf },
    #[error("database {path}: {detail}")]
    Storage { path: PathBuf, detail: String },
    #[error("record {key:?} in table {table} is not valid JSON for its type: {detail}")]
    Decode { table: &'static str, key: String, detail: String },
}

/// The embedded database.
pub struct Store {
    path: PathBuf,
    /// Replaced by a freshly opened handle after an I/O failure (redb refuses a handle once a
    /// write failed half-way; the file itself still holds the last commit).
    db: RwLock<Database>,
    /// Set after an I/O failure: reopen before the next operation.
    broken: AtomicBool,
}

impl Store {
    /// Opens (creating if needed) `<state_dir>/sandpool.redb` and its tables.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join(FILE_NAME);
        let db = open_database(&path)?;
        let store = Store { path, db: RwLock::new(db), broken: AtomicBool::new(false) };
        // Create every table up front so that reads never meet a missing one.
        store.write(|txn| {
            for table in [Table::Pools, Table::Sessions, Table::Keys] {
                txn.open_table(table.definition())?;
            }
            txn.open_table(EVENTS)?;
            Ok(())
        })?;
        Ok(store)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record `key` of `table`, if there is one.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>, StoreError> {
        let bytes = self.read(|txn| {
            let opened = txn.open_table(table.definition())?;
            Ok(opened.get(key)?.map(|value| value.value().to_vec()))
        })?;
        bytes.map(|bytes| decode(table.name(), key, &bytes)).transpose()
    }

    /// Every record of `table`, ordered by key.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, StoreError> {
        let rows = self.read(|txn| {
            let opened = txn.open_table(table.definition())?;
            let mut rows = Vec::new();
            for row in opened.iter()? {
                let (key, value) = row?;
                rows.push((key.value().to_owned(), value.value().to_vec()))
            }
            Ok(rows)
        })?;
        rows.into_iter().map(|(key, bytes)| decode(table.name(), &key, &bytes).map(|value| (key, value))).collect()
    }

    /// Writes (creates or replaces) one record, durably.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        self.apply(&[Change::put(table, key, value)])
    }

    /// Removes one record; true if it existed.
    pub fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        self.write(|txn| {
            let mut opened = txn.open_table(table.definition())?;
            let existed = opened.remove(key)?.is_some();
            Ok(existed)
        })
    }

    /// Applies several changes in one transaction: all of them or none.
    pub fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        self.write(|txn| {
            for change in changes {
                let mut opened = txn.open_table(change.table.definition())?;
                match &change.value {
                    Some(bytes) => {
                        opened.insert(change.key.as_str(), bytes.as_slice())?;
                    }
                    None => {
                        opened.remove(change.key.as_str())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Appends events to the log in one transaction; returns the first one's sequence number.
    pub fn append_events<T: Serialize>(&self, events: &[T]) -> Result<u64, StoreError> {
        let encoded: Vec<Vec<u8>> = events.iter().map(|event| serde_json::to_vec(event).expect("events serialise")).collect();
        self.write(|txn| {
            let mut table = txn.open_table(EVENTS)?;
            let first = table.last()?.map(|(key, _)| key.value() + 1).unwrap_or(1);
            for (offset, bytes) in encoded.iter().enumerate() {
                table.insert(first + offset as u64, bytes.as_slice())?;
            }
            Ok(first)
        })
    }

    /// Up to `limit` events with a sequence number above `after`, oldest first.
    pub fn events_after<T: DeserializeOwned>(&self, after: u64, limit: usize) -> Result<Vec<(u64, T)>, StoreError> {
        let rows = self.read(|txn| {
            let table = txn.open_table(EVENTS)?;
            let mut rows = Vec::new();
            for row in table.range(after + 1..)?.take(limit) {
                let (key, value) = row?;
                rows.push((key.value(), value.value().to_vec()));
            }
            Ok(rows)
        })?;
        rows.into_iter().map(|(seq, bytes)| decode("events", &seq.to_string(), &bytes).map(|event| (seq, event))).collect()
    }

    /// Deletes the oldest events so that at most `keep` remain; returns how many went.
    pub fn trim_events(&self, keep: u64) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(EVENTS)?;
            let len = table.len()?;
            if len <= keep {
                return Ok(0);
            }
            let Some(first) = table.first()?.map(|(key, _)| key.value()) else { return Ok(0) };
            let excess = len - keep;
            table.retain_in(first..first + excess, |_, _| false)?;
            Ok(excess)
        })
    }

    fn read<R>(&self, body: impl FnOnce(&redb::ReadTransaction) -> Result<R, redb::Error>) -> Result<R, StoreError> {
        self.with_handle(|db| {
            let txn = db.begin_read()?;
            body(&txn)
        })
    }

    fn write<R>(&self, body: impl FnOnce(&redb::WriteTransaction) -> Result<R, redb::Error>) -> Result<R, StoreError> {
        self.with_handle(|db| {
            let txn = db.begin_write()?;
            let result = body(&txn)?;
            txn.commit()?;
            Ok(result)
        })
    }

    /// Runs `op` on a usable handle: after an I/O failure redb refuses the handle it
    /// happened on, so the next operation reopens the file first.
    fn with_handle<R>(&self, op: impl FnOnce(&Database) -> Result<R, redb::Error>) -> Result<R, StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        let result = {
            let db = self.db.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            op(&db)
        };
        result.map_err(|err| {
            if matches!(err, redb::Error::Io(_) | redb::Error::PreviousIo) {
                self.broken.store(true, Ordering::SeqCst);
            }
            self.classify(err)
        })
    }

    fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        tracing::warn!(path = %self.path.display(), "reopening the database after an I/O failure");
        // redb holds an exclusive lock on the file: the old handle must close first. A
        // throwaway in-memory database stands in for it meanwhile.
        let placeholder =
            Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(|e| self.storage(e.to_string()))?;
        drop(std::mem::replace(&mut *db, placeholder));
        *db = open_database(&self.path)?;
        self.broken.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn classify(&self, err: redb::Error) -> StoreError {
        if let redb::Error::Io(io) = &err {
            if io.raw_os_error() == Some(libc_enospc()) || io.kind() == std::io::ErrorKind::StorageFull {
                return StoreError::Full { path: self.path.clone() };
            }
        }
        self.storage(err.to_string())
    }

    fn storage(&self, detail: String) -> StoreError {
        StoreError::Storage { path: self.path.clone(), detail }
    }
}

/// ENOSPC, without a libc dependency for one constant.
const fn libc_enospc() -> i32 {
    28
}

fn open_database(path: &Path) -> Result<Database, StoreError> {
    Database::create(path).map_err(|err| StoreError::Open { path: path.to_owned(), detail: err.to_string() })
}

fn decode<T: DeserializeOwned>(table: &'static str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Decode { table, key: key.to_owned(), detail: err.to_string() })
}

/// One change of a multi-record transaction ([`Store::apply`]).
#[derive(Debug, Clone)]
pub struct Change {
    table: Table,
    key: String,
    /// `None` deletes.
    value: Option<Vec<u8>>,
}

impl Change {
    pub fn put<T: Serialize>(table: Table, key: &str, value: &T) -> Change {
        Change { table, key: key.to_owned(), value: Some(serde_json::to_vec(value).expect("records serialise")) }
    }

    pub fn delete(table: Table, key: &str) -> Change {
        Change { table, key: key.to_owned(), value: None }
    }
}

#[cfg(test)]
mod tests;
