//! Host-side file operations on a session's `/mnt/data`, confined to it.
//!
//! The server holds a directory descriptor of the session's data tmpfs (opened through
//! `/proc/<pid>/root/mnt/data`). Every path is resolved from that descriptor with `openat2`
//! and `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`: the kernel refuses any
//! resolution that would leave the directory, whatever symlinks or `..` the session planted,
//! so the server can never be tricked into reading or writing a host file or another session's
//! file. Writes additionally refuse to follow any symlink. Files the server creates belong to
//! the session's user.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use sandpool_engine::backend::{FileEntry, FileError, FileKind, FileStore};
use sandpool_engine::path::DataPath;

/// Most entries one listing returns; keeps a session with millions of files from tying up
/// the server.
const MAX_LISTED: usize = 10_000;
const MAX_DEPTH: usize = 32;

/// The data directory of one session.
pub struct DataDirStore {
    root: OwnedFd,
    uid: u32,
    gid: u32,
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn rel(path: &DataPath) -> String {
    if path.is_root() {
        ".".to_owned()
    } else {
        path.as_relative()
    }
}

/// Maps an errno from resolving `path` to a client-facing error.
fn resolve_error(path: &DataPath, errno: Errno) -> FileError {
    let shown = path.as_relative();
    match errno {
        Errno::ENOENT => FileError::NotFound(shown),
        Errno::EXDEV | Errno::ELOOP => FileError::Escapes(shown),
        Errno::ENOTDIR => FileError::NotDirectory(shown),
        Errno::EISDIR => FileError::IsDirectory(shown),
        Errno::ENOSPC | Errno::EDQUOT => FileError::NoSpace,
        other => FileError::Io(io::Error::from(other)),
    }
}

impl DataDirStore {
    /// Wraps a directory descriptor; `uid`/`gid` own the files the server creates.
    pub fn new(root: OwnedFd, uid: u32, gid: u32) -> DataDirStore {
        DataDirStore { root, uid, gid }
    }

    fn open(&self, path: &DataPath, flags: OFlag, resolve: ResolveFlag) -> Result<OwnedFd, FileError> {
        let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(resolve);
        openat2(self.root.as_fd(), rel(path).as_str(), how).map_err(|e| resolve_error(path, e))
    }

    fn open_dir(&self, path: &DataPath) -> Result<OwnedFd, FileError> {
        self.open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, beneath())
    }

    fn entry_for(path: DataPath, meta: &std::fs::Metadata) -> Option<FileEntry> {
        let kind = if meta.is_dir() {
            FileKind::Directory
        } else if meta.is_file() {
            FileKind::File
        } else {
            return None;
        };
        Some(FileEntry { path, kind, size: if kind == FileKind::File { meta.len() } else { 0 }, modified: modified(meta) })
    }

    fn walk(&self, dir: &DataPath, recursive: bool, depth: usize, out: &mut Vec<FileEntry>) -> Result<(), FileError> {
        let fd = self.open_dir(dir)?;
        let mut subdirs = Vec::new();
        {
            let mut listing = nix::dir::Dir::from_fd(fd).map_err(|e| resolve_error(dir, e))?;
            let mut names = Vec::new();
            for item in listing.iter() {
                let item = item.map_err(|e| resolve_error(dir, e))?;
                let name = item.file_name().to_string_lossy().into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                names.push(name);
            }
            names.sort();
            for name in names {
                if out.len() >= MAX_LISTED {
                    return Ok(());
                }
                let child = dir.join(&name);
                // Stat through the store so that symlinks are followed only while they stay
                // inside the directory; others are left out of the listing.
                let Ok(meta) = self.metadata(&child) else {
                    continue;
                };
                let Some(entry) = Self::entry_for(child.clone(), &meta) else {
                    continue;
                };
                let is_dir = entry.kind == FileKind::Directory;
                let is_link = fstatat(&listing, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
                    .unwrap_or(true);
                out.push(entry);
                if recursive && is_dir && !is_link && depth < MAX_DEPTH {
                    subdirs.push(child);
                }
            }
        }
        for sub in subdirs {
            self.walk(&sub, recursive, depth + 1, out)?;
        }
        Ok(())
    }

    fn metadata(&self, path: &DataPath) -> Result<std::fs::Metadata, FileError> {
        let fd = self.open(path, OFlag::O_PATH, beneath())?;
        File::from(fd).metadata().map_err(FileError::Io)
    }

    /// Opens (creating as needed) the directory `dir`, refusing symlinks anywhere on the way.
    fn make_dirs(&self, dir: &DataPath) -> Result<OwnedFd, FileError> {
        let strict = beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS;
        let mut current = DataPath::default();
        let mut fd = self.open(&current, OFlag::O_PATH | OFlag::O_DIRECTORY, strict)?;
        for name in dir.components() {
            current = current.join(name);
            let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).resolve(strict);
            fd = match openat2(fd.as_fd(), name.as_str(), how) {
                Ok(next) => next,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(fd.as_fd(), name.as_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(resolve_error(&current, e)),
                    }
                    let next = openat2(fd.as_fd(), name.as_str(), how).map_err(|e| resolve_error(&current, e))?;
                    nix::unistd::fchownat(
                        fd.as_fd(),
                        name.as_str(),
                        Some(Uid::from_raw(self.uid)),
                        Some(Gid::from_raw(self.gid)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| resolve_error(&current, e))?;
                    next
                }
                Err(e) => return Err(resolve_error(&current, e)),
            };
        }
        Ok(fd)
    }
}

impl FileStore for DataDirStore {
    fn list(&self, dir: &DataPath, recursive: bool) -> Result<Vec<FileEntry>, FileError> {
        let mut out = Vec::new();
        self.walk(dir, recursive, 0, &mut out)?;
        out.sort_by(|a, b| a.path.components().cmp(b.path.components()));
        Ok(out)
    }

    fn stat(&self, path: &DataPath) -> Result<FileEntry, FileError> {
        let meta = self.metadata(path)?;
        Self::entry_for(path.clone(), &meta).ok_or_else(|| FileError::NotRegular(path.as_relative()))
    }

    fn open_read(&self, path: &DataPath) -> Result<(File, FileEntry), FileError> {
        if path.is_root() {
            return Err(FileError::IsDirectory("/mnt/data".into()));
        }
        // O_NONBLOCK: opening a FIFO the session planted must not hang the server.
        let fd = self.open(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY, beneath())?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(FileError::Io)?;
        if meta.is_dir() {
            return Err(FileError::IsDirectory(path.as_relative()));
        }
        if !meta.is_file() {
            return Err(FileError::NotRegular(path.as_relative()));
        }
        let entry = Self::entry_for(path.clone(), &meta).expect("regular file");
        Ok((file, entry))
    }

    fn create(&self, path: &DataPath) -> Result<File, FileError> {
        let Some(name) = path.file_name() else {
            return Err(FileError::IsDirectory("/mnt/data".into()));
        };
        let parent = self.make_dirs(&path.parent())?;
        let how = OpenHow::new()
            .flags(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(0o644))
            .resolve(beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS);
        let fd = openat2(parent.as_fd(), name, how).map_err(|e| resolve_error(path, e))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(FileError::Io)?;
        if !meta.is_file() {
            return Err(FileError::NotRegular(path.as_relative()));
        }
        nix::unistd::fchown(file.as_fd(), Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
            .map_err(|e| resolve_error(path, e))?;
        Ok(file)
    }

    fn delete(&self, path: &DataPath) -> Result<(), FileError> {
        let Some(name) = path.file_name() else {
            return Err(FileError::IsDirectory("/mnt/data".into()));
        };
        let parent = self.open(&path.parent(), OFlag::O_PATH | OFlag::O_DIRECTORY, beneath())?;
        let st = fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| resolve_error(path, e))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            remove_tree(&parent, name, 0).map_err(|e| resolve_error(path, e))
        } else {
            nix::unistd::unlinkat(parent.as_fd(), name, UnlinkatFlags::NoRemoveDir).map_err(|e| resolve_error(path, e))
        }
    }
}

/// Removes directory `name` under `parent` and everything in it, never following a symlink.
fn remove_tree(parent: &OwnedFd, name: &str, depth: usize) -> Result<(), Errno> {
    if depth > 256 {
        return Err(Errno::ELOOP);
    }
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let dir_fd = openat2(parent.as_fd(), name, how)?;
    let keep = dir_fd.try_clone().map_err(|_| Errno::EMFILE)?;
    let mut listing = nix::dir::Dir::from_fd(dir_fd)?;
    let mut children = Vec::new();
    for item in listing.iter() {
        let item = item?;
        let child = item.file_name().to_string_lossy().into_owned();
        if child != "." && child != ".." {
            children.push(child);
        }
    }
    for child in children {
        let st = fstatat(keep.as_fd(), child.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
            remove_tree(&keep, &child, depth + 1)?;
        } else {
            nix::unistd::unlinkat(keep.as_fd(), child.as_str(), UnlinkatFlags::NoRemoveDir)?;
        }
    }
    nix::unistd::unlinkat(parent.as_fd(), name, UnlinkatFlags::RemoveDir)
}

fn modified(meta: &std::fs::Metadata) -> SystemTime {
    let secs = meta.mtime().max(0) as u64;
    let nanos = meta.mtime_nsec().clamp(0, 999_999_999) as u32;
    UNIX_EPOCH + Duration::new(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, DataDirStore) {
        let dir = tempfile::tempdir().unwrap();
        let fd = nix::fcntl::open(dir.path(), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).unwrap();
        let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        (dir, DataDirStore::new(fd, uid, gid))
    }

    fn path(text: &str) -> DataPath {
        DataPath::parse(text).unwrap()
    }

    #[test]
    fn writes_lists_reads_and_deletes_nested_files() {
        let (_dir, store) = store();
        io::Write::write_all(&mut store.create(&path("sub/deeper/a.txt")).unwrap(), b"hello").unwrap();
        io::Write::write_all(&mut store.create(&path("b.bin")).unwrap(), &[0, 1, 2]).unwrap();
        let top: Vec<_> =
            store.list(&DataPath::default(), false).unwrap().into_iter().map(|e| (e.path.as_relative(), e.kind, e.size)).collect();
        assert_eq!(top, vec![("b.bin".into(), FileKind::File, 3), ("sub".into(), FileKind::Directory, 0)]);
        let all: Vec<_> = store.list(&DataPath::default(), true).unwrap().into_iter().map(|e| e.path.as_relative()).collect();
        assert_eq!(all, vec!["b.bin", "sub", "sub/deeper", "sub/deeper/a.txt"]);
        let (mut file, entry) = store.open_read(&path("sub/deeper/a.txt")).unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert_eq!((text.as_str(), entry.size), ("hello", 5));
        store.delete(&path("sub")).unwrap();
        assert!(matches!(store.stat(&path("sub/deeper/a.txt")), Err(FileError::NotFound(_))));
    }

    #[test]
    fn symlinks_never_lead_outside_the_directory() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let (dir, store) = store();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/passwd", dir.path().join("rel-link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("dir-link")).unwrap();
        for name in ["abs-link", "rel-link", "dir-link/secret"] {
            assert!(matches!(store.open_read(&path(name)), Err(FileError::Escapes(_))), "{name}");
        }
        // Writing through a link, even to a new file behind it, is refused too.
        assert!(store.create(&path("dir-link/new")).is_err());
        assert!(store.create(&path("abs-link")).is_err());
        assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "host secret");
        assert!(!outside.path().join("new").exists());
        // Deleting a link removes the link, not its target.
        store.delete(&path("abs-link")).unwrap();
        assert!(outside.path().join("secret").exists());
        // Escaping links are left out of listings.
        let names: Vec<_> = store.list(&DataPath::default(), true).unwrap().into_iter().map(|e| e.path.as_relative()).collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn links_inside_the_directory_are_followed_for_reading() {
        let (dir, store) = store();
        std::fs::write(dir.path().join("real.txt"), "inside").unwrap();
        std::os::unix::fs::symlink("real.txt", dir.path().join("alias.txt")).unwrap();
        let (mut file, _) = store.open_read(&path("alias.txt")).unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert_eq!(text, "inside");
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let (dir, store) = store();
        nix::unistd::mkfifo(&dir.path().join("pipe"), Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(store.open_read(&path("pipe")), Err(FileError::NotRegular(_))));
        assert!(matches!(store.open_read(&path("missing")), Err(FileError::NotFound(_))));
        assert!(matches!(store.open_read(&DataPath::default()), Err(FileError::IsDirectory(_))));
    }
}
