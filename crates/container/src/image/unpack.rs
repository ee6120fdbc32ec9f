//! Applying layer tarballs, in order, to a root filesystem directory: OCI whiteouts, ownership
//! and modes from the layers, and digests checked on the bytes actually unpacked.
//!
//! Security: a layer is untrusted input, and nothing it contains may write outside the root.
//! Entry paths with `..` are refused and a leading `/` is dropped; every parent directory of an
//! entry is checked with `lstat` (never followed) and an entry whose parent is a symbolic link
//! (placed by this or an earlier layer) is refused, naming the link. Files are created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` after removing what was there, hard link targets are resolved
//! the same way, and `chmod`/`utimes` go through descriptors opened with `O_NOFOLLOW`. The only
//! writer of the directory is this code, so checking and then acting is not racy.
//!
//! Not reproduced: device nodes (skipped with a debug log; runtimes provide `/dev`), extended
//! attributes (including file capabilities), and times of symbolic links.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use flate2::bufread::MultiGzDecoder;
use tar::EntryType;

use crate::image::digest::{Algorithm, Digest, HashingReader};
use crate::image::error::ImageError;
use crate::image::manifest::Compression;

/// One layer to apply: a byte range of a file (a blob, or a member of a docker-archive).
#[derive(Debug, Clone)]
pub(crate) struct LayerInput {
    /// "layer 2/5 (sha256:0123456789ab)", for logs and errors.
    pub(crate) label: String,
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    pub(crate) length: u64,
    pub(crate) compression: Compression,
    /// Digest of the stored bytes (compressed, if compressed), when known.
    pub(crate) digest: Option<Digest>,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`), when known.
    pub(crate) diff_id: Option<Digest>,
    /// The blob belongs to the store: delete it when it turns out corrupt, so that the next
    /// prepare fetches it again.
    pub(crate) remove_if_corrupt: bool,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// Other `.wh..wh.` names are aufs bookkeeping, not whiteouts.
const AUFS_META_PREFIX: &str = ".wh..wh.";

/// Applies `layers` in order to `rootfs` (an existing, empty directory).
/// With a non-zero `owner_offset`, every owner id is shifted by it (see
/// `ImageStore::with_owner_offset`).
pub(crate) fn unpack_layers(image: &str, rootfs: &Path, layers: &[LayerInput], owner_offset: u32) -> Result<(), ImageError> {
    let preserve_owners = nix::unistd::geteuid().is_root();
    if !preserve_owners {
        tracing::warn!(image, "not running as root: the unpacked files belong to the server's user, not to the owners in the image");
    }
    set_mode(image, rootfs, 0o755)?;
    if preserve_owners && owner_offset > 0 {
        // The root directory itself belongs to the namespace's root too (layers rarely
        // carry an entry for it), or the runtime could not create mount points in it.
        std::os::unix::fs::lchown(rootfs, Some(owner_offset), Some(owner_offset))
            .map_err(|err| ImageError::io(image, "change the owner of", rootfs, err))?;
    }
    let mut deferred_dirs = HashMap::new();
    for layer in layers {
        let started = Instant::now();
        let counts = unpack_layer(image, rootfs, layer, preserve_owners, owner_offset, &mut deferred_dirs).inspect_err(|err| {
            if layer.remove_if_corrupt && matches!(err, ImageError::DigestMismatch { .. }) {
                let _ = fs::remove_file(&layer.path);
            }
        })?;
        tracing::info!(
            image,
            layer = %layer.label,
            entries = counts.entries,
            bytes = counts.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layer unpacked"
        );
    }
    apply_directory_metadata(image, rootfs, deferred_dirs)
}

#[derive(Debug, Default)]
struct LayerCounts {
    entries: u64,
    bytes: u64,
}

/// Mode and time of a directory, applied after all layers: a read-only directory must stay
/// writable while later entries go into it, and every entry written changes its mtime.
#[derive(Debug, Clone, Copy)]
struct DirMetadata {
    mode: u32,
    mtime: SystemTime,
}

fn unpack_layer(
    image: &str,
    rootfs: &Path,
    layer: &LayerInput,
    preserve_owners: bool,
    owner_offset: u32,
    deferred_dirs: &mut HashMap<PathBuf, DirMetadata>,
) -> Result<LayerCounts, ImageError> {
    let corrupt = |detail: String| ImageError::CorruptLayer { image: image.to_owned(), layer: layer.label.clone(), detail };
    let mut file = File::open(&layer.path).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => {
            ImageError::NotFound { image: image.to_owned(), what: format!("{} at {}", layer.label, layer.path.display()) }
        }
        _ => ImageError::io(image, "open", &layer.path, err),
    })?;
    file.seek(SeekFrom::Start(layer.offset)).map_err(|err| ImageError::io(image, "read", &layer.path, err))?;
    let raw_algorithm = layer.digest.as_ref().map_or(Algorithm::Sha256, |d| d.algorithm);
    let raw = BufReader::with_capacity(256 * 1024, HashingReader::new(file.take(layer.length), raw_algorithm));
    let decompressor = Decompressor::new(raw, layer.compression).map_err(|err| corrupt(err.to_string()))?;
    let diff_algorithm = layer.diff_id.as_ref().map_or(Algorithm::Sha256, |d| d.algorithm);
    let mut archive = tar::Archive::new(HashingReader::new(decompressor, diff_algorithm));

    let mut applier = LayerApplier {
        image,
        layer: &layer.label,
        root: rootfs,
        preserve_owners,
        owner_offset,
        added: HashSet::new(),
        deferred_dirs,
        counts: LayerCounts::default(),
    };
    let mut outcome = applier.apply_all(&mut archive);
    let counts = std::mem::take(&mut applier.counts);

    // Hash the rest of both streams (tar stops at its end-of-archive blocks, gzip at its
    // trailer) so the digests cover every byte, even after a failure: a corrupt blob is then
    // reported as a digest mismatch, which is the cause, rather than as a decoding error.
    let mut uncompressed = archive.into_inner();
    if outcome.is_ok() {
        outcome = uncompressed.drain().map_err(|err| corrupt(format!("cannot decompress: {err}")));
    }
    let (decompressor, diff_digest, _) = uncompressed.finish();
    let mut raw = decompressor.into_inner().into_inner();
    let raw_drained = raw.drain();
    let (_, raw_digest, raw_bytes) = raw.finish();
    if let Some(expected) = &layer.digest {
        if raw_drained.is_ok() && raw_digest != *expected {
            return Err(ImageError::DigestMismatch {
                image: image.to_owned(),
                what: layer.label.clone(),
                expected: expected.to_string(),
                actual: raw_digest.to_string(),
            });
        }
    }
    raw_drained.map_err(|err| ImageError::io(image, "read", &layer.path, err))?;
    if raw_bytes != layer.length {
        return Err(corrupt(format!("truncated: {raw_bytes} of {} bytes", layer.length)));
    }
    outcome?;
    if let Some(expected) = &layer.diff_id {
        if diff_digest != *expected {
            return Err(ImageError::DigestMismatch {
                image: image.to_owned(),
                what: format!("{} (uncompressed, rootfs.diff_ids)", layer.label),
                expected: expected.to_string(),
                actual: diff_digest.to_string(),
            });
        }
    }
    Ok(counts)
}

/// The decompressing stage; it gives its input back so the input can be hashed to its end.
enum Decompressor<R: BufRead> {
    Plain(R),
    Gzip(MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decompressor<R> {
    fn new(mut input: R, compression: Compression) -> io::Result<Decompressor<R>> {
        let compression = match compression {
            Compression::Detect => detect_compression(input.fill_buf()?),
            known => known,
        };
        Ok(match compression {
            Compression::Gzip => Decompressor::Gzip(MultiGzDecoder::new(input)),
            Compression::Zstd => Decompressor::Zstd(zstd::stream::read::Decoder::with_buffer(input)?),
            Compression::None | Compression::Detect => Decompressor::Plain(input),
        })
    }

    fn into_inner(self) -> R {
        match self {
            Decompressor::Plain(input) => input,
            Decompressor::Gzip(decoder) => decoder.into_inner(),
            Decompressor::Zstd(decoder) => decoder.finish(),
        }
    }
}

impl<R: BufRead> Read for Decompressor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decompressor::Plain(input) => input.read(buf),
            Decompressor::Gzip(decoder) => decoder.read(buf),
            Decompressor::Zstd(decoder) => decoder.read(buf),
        }
    }
}

fn detect_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// The state of applying one layer.
struct LayerApplier<'a> {
    image: &'a str,
    layer: &'a str,
    root: &'a Path,
    preserve_owners: bool,
    owner_offset: u32,
    /// Paths (relative to the root) present in this layer: whiteouts only hide lower layers.
    added: HashSet<PathBuf>,
    deferred_dirs: &'a mut HashMap<PathBuf, DirMetadata>,
    counts: LayerCounts,
}

/// Entry metadata from the tar header.
struct EntryMetadata {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

impl LayerApplier<'_> {
    fn apply_all<R: Read>(&mut self, archive: &mut tar::Archive<R>) -> Result<(), ImageError> {
        let entries = archive.entries().map_err(|err| self.corrupt(err))?;
        for entry in entries {
            let mut entry = entry.map_err(|err| self.corrupt(err))?;
            self.apply_entry(&mut entry)?;
            self.counts.entries += 1;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw_path = entry.path().map_err(|err| self.corrupt(err))?.into_owned();
        let rel = normalize(&raw_path).map_err(|reason| self.refuse(&raw_path, reason))?;
        let kind = entry.header().entry_type();
        if let Some(name) = rel.file_name().and_then(|name| name.to_str()) {
            if name.starts_with(WHITEOUT_PREFIX) {
                return self.whiteout(&raw_path, &rel, name);
            }
        }
        let metadata = self.metadata(entry)?;
        if rel.as_os_str().is_empty() {
            if !kind.is_dir() {
                return Err(self.refuse(&raw_path, "the root can only be a directory".to_owned()));
            }
            self.chown(self.root, &metadata)?;
            self.deferred_dirs.insert(PathBuf::new(), DirMetadata { mode: metadata.mode, mtime: metadata.mtime });
            return Ok(());
        }
        if !matches!(
            kind,
            EntryType::Directory
                | EntryType::Regular
                | EntryType::Continuous
                | EntryType::GNUSparse
                | EntryType::Symlink
                | EntryType::Link
                | EntryType::Fifo
        ) {
            tracing::debug!(image = self.image, layer = self.layer, entry = %raw_path.display(), ?kind, "skipping entry (device node or unknown type)");
            return Ok(());
        }
        self.prepare_parents(&raw_path, &rel, true)?;
        let path = self.root.join(&rel);
        match kind {
            EntryType::Directory => self.directory(&path, &rel, &metadata)?,
            EntryType::Symlink => {
                let target = self.link_name(entry, &raw_path)?;
                self.remove_existing(&path)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|err| self.io("create symlink", &path, err))?;
                self.chown(&path, &metadata)?;
            }
            EntryType::Link => self.hard_link(entry, &raw_path, &rel, &path)?,
            EntryType::Fifo => {
                self.remove_existing(&path)?;
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|err| self.io("create fifo", &path, err.into()))?;
                self.chown(&path, &metadata)?;
                set_mode(self.image, &path, metadata.mode)?;
            }
            _ => self.regular_file(entry, &path, &metadata)?,
        }
        self.added.insert(rel);
        Ok(())
    }

    fn metadata<R: Read>(&self, entry: &tar::Entry<'_, R>) -> Result<EntryMetadata, ImageError> {
        let header = entry.header();
        let field = |value: io::Result<u64>| value.map_err(|err| self.corrupt(err));
        let id = |value: u64| u32::try_from(value).map_err(|_| self.corrupt(io::Error::other(format!("owner id {value} out of range"))));
        // Shifted ids stay inside the 65536 ids a user namespace maps.
        let shift = |value: u32| match self.owner_offset {
            0 => value,
            offset => offset + value.min(65_534),
        };
        Ok(EntryMetadata {
            mode: header.mode().map_err(|err| self.corrupt(err))? & 0o7777,
            uid: shift(id(field(header.uid())?)?),
            gid: shift(id(field(header.gid())?)?),
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(field(header.mtime())?),
        })
    }

    fn link_name<R: Read>(&self, entry: &tar::Entry<'_, R>, raw_path: &Path) -> Result<PathBuf, ImageError> {
        match entry.link_name().map_err(|err| self.corrupt(err))? {
            Some(target) if !target.as_os_str().is_empty() => Ok(target.into_owned()),
            _ => Err(self.refuse(raw_path, "the link has no target".to_owned())),
        }
    }

    fn directory(&mut self, path: &Path, rel: &Path, metadata: &EntryMetadata) -> Result<(), ImageError> {
        match fs::symlink_metadata(path) {
            Ok(existing) if existing.is_dir() => {} // merged with the lower layer's directory
            Ok(_) => {
                fs::remove_file(path).map_err(|err| self.io("remove", path, err))?;
                self.create_dir(path)?;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => self.create_dir(path)?,
            Err(err) => return Err(self.io("inspect", path, err)),
        }
        self.chown(path, metadata)?;
        self.deferred_dirs.insert(rel.to_owned(), DirMetadata { mode: metadata.mode, mtime: metadata.mtime });
        Ok(())
    }

    fn regular_file<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, path: &Path, metadata: &EntryMetadata) -> Result<(), ImageError> {
        self.remove_existing(path)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|err| self.io("create", path, err))?;
        let mut buffer = vec![0u8; 128 * 1024];
        loop {
            let n = match entry.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(self.corrupt(err)),
            };
            file.write_all(&buffer[..n]).map_err(|err| self.io("write", path, err))?;
            self.counts.bytes += n as u64;
        }
        if self.preserve_owners {
            std::os::unix::fs::fchown(&file, Some(metadata.uid), Some(metadata.gid))
                .map_err(|err| self.io("change the owner of", path, err))?;
        }
        // After chown, which clears set-user-ID and set-group-ID bits.
        file.set_permissions(Permissions::from_mode(metadata.mode)).map_err(|err| self.io("change the mode of", path, err))?;
        let times = FileTimes::new().set_modified(metadata.mtime).set_accessed(metadata.mtime);
        file.set_times(times).map_err(|err| self.io("set the time of", path, err))?;
        Ok(())
    }

    fn hard_link<R: Read>(&mut self, entry: &tar::Entry<'_, R>, raw_path: &Path, rel: &Path, path: &Path) -> Result<(), ImageError> {
        let raw_target = self.link_name(entry, raw_path)?;
        let target_rel = normalize(&raw_target)
            .map_err(|reason| self.refuse(raw_path, format!("hard link target `{}`: {reason}", raw_target.display())))?;
        if target_rel.as_os_str().is_empty() {
            return Err(self.refuse(raw_path, "a hard link to the root directory".to_owned()));
        }
        if target_rel == rel {
            return Ok(());
        }
        let target_exists = self.prepare_parents(raw_path, &target_rel, false)?;
        let missing = || self.refuse(raw_path, format!("hard link target `{}` does not exist", raw_target.display()));
        if !target_exists {
            return Err(missing());
        }
        let target = self.root.join(&target_rel);
        match fs::symlink_metadata(&target) {
            Ok(existing) if existing.is_dir() => {
                return Err(self.refuse(raw_path, format!("hard link target `{}` is a directory", raw_target.display())))
            }
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(err) => return Err(self.io("inspect", &target, err)),
        }
        self.remove_existing(path)?;
        // linkat(2) without AT_SYMLINK_FOLLOW: a symlink target is linked itself, not followed.
        fs::hard_link(&target, path).map_err(|err| self.io("create hard link", path, err))
    }

    /// `.wh.NAME` hides NAME of the lower layers; `.wh..wh..opq` hides everything the lower
    /// layers put in its directory.
    fn whiteout(&mut self, raw_path: &Path, rel: &Path, name: &str) -> Result<(), ImageError> {
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        if name == OPAQUE_WHITEOUT {
            self.prepare_parents(raw_path, rel, true)?;
            self.added.insert(parent.clone());
            return self.hide_lower_layers(&parent);
        }
        if name.starts_with(AUFS_META_PREFIX) {
            tracing::debug!(image = self.image, layer = self.layer, entry = %raw_path.display(), "skipping aufs metadata entry");
            return Ok(());
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(self.refuse(raw_path, "a whiteout without a valid name".to_owned()));
        }
        if !self.prepare_parents(raw_path, rel, false)? {
            return Ok(()); // nothing below to hide
        }
        let hidden_rel = parent.join(hidden);
        if self.added.contains(&hidden_rel) {
            return Ok(()); // whiteouts do not apply to their own layer
        }
        self.remove_existing(&self.root.join(&hidden_rel))
    }

    /// Removes from `dir_rel` everything that is not part of this layer, recursively.
    fn hide_lower_layers(&self, dir_rel: &Path) -> Result<(), ImageError> {
        let dir = self.root.join(dir_rel);
        let children = fs::read_dir(&dir).map_err(|err| self.io("list", &dir, err))?;
        for child in children {
            let child = child.map_err(|err| self.io("list", &dir, err))?;
            let child_rel = dir_rel.join(child.file_name());
            let file_type = child.file_type().map_err(|err| self.io("inspect", &child.path(), err))?;
            if self.added.contains(&child_rel) {
                if file_type.is_dir() {
                    self.hide_lower_layers(&child_rel)?;
                }
            } else if file_type.is_dir() {
                fs::remove_dir_all(child.path()).map_err(|err| self.io("remove", &child.path(), err))?;
            } else {
                fs::remove_file(child.path()).map_err(|err| self.io("remove", &child.path(), err))?;
            }
        }
        Ok(())
    }

    /// Checks every parent directory of `rel` without following symlinks; a symlink or a
    /// non-directory refuses the entry. Missing parents are created (`create`) or make the
    /// result `false`.
    fn prepare_parents(&mut self, raw_path: &Path, rel: &Path, create: bool) -> Result<bool, ImageError> {
        let Some(parent) = rel.parent() else { return Ok(true) };
        let mut current = self.root.to_path_buf();
        let mut current_rel = PathBuf::new();
        for component in parent.components() {
            current.push(component);
            current_rel.push(component);
            match fs::symlink_metadata(&current) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(metadata) if metadata.file_type().is_symlink() => {
                    return Err(self.refuse(
                        raw_path,
                        format!(
                            "its parent `{}` is a symbolic link (placed by this or an earlier layer); writing through it could escape the root filesystem",
                            current_rel.display()
                        ),
                    ));
                }
                Ok(_) => {
                    return Err(self.refuse(raw_path, format!("its parent `{}` is not a directory", current_rel.display())));
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    self.create_dir(&current)?;
                    self.added.insert(current_rel.clone());
                }
                Err(err) => return Err(self.io("inspect", &current, err)),
            }
        }
        Ok(true)
    }

    fn create_dir(&self, path: &Path) -> Result<(), ImageError> {
        fs::DirBuilder::new().mode(0o755).create(path).map_err(|err| self.io("create directory", path, err))?;
        // Whatever the server's umask: implicit directories are 0755, as in Docker.
        set_mode(self.image, path, 0o755)
    }

    /// Removes whatever is at `path` (not following a symlink), if anything.
    fn remove_existing(&self, path: &Path) -> Result<(), ImageError> {
        let removed = match fs::symlink_metadata(path) {
            Ok(existing) if existing.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err),
        };
        removed.map_err(|err| self.io("remove", path, err))
    }

    fn chown(&self, path: &Path, metadata: &EntryMetadata) -> Result<(), ImageError> {
        if !self.preserve_owners {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(metadata.uid), Some(metadata.gid)).map_err(|err| self.io("change the owner of", path, err))
    }

    fn refuse(&self, raw_path: &Path, reason: String) -> ImageError {
        ImageError::UnsafeLayerEntry {
            image: self.image.to_owned(),
            layer: self.layer.to_owned(),
            entry: raw_path.display().to_string(),
            reason,
        }
    }

    fn corrupt(&self, err: io::Error) -> ImageError {
        ImageError::CorruptLayer { image: self.image.to_owned(), layer: self.layer.to_owned(), detail: err.to_string() }
    }

    fn io(&self, action: &'static str, path: &Path, err: io::Error) -> ImageError {
        ImageError::io(self.image, action, path, err)
    }
}

/// The entry path relative to the root: `.` components dropped, a leading `/` dropped (as GNU
/// tar does), `..` refused. The root itself is the empty path.
fn normalize(raw: &Path) -> Result<PathBuf, String> {
    let mut rel = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(name) => rel.push(name),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("the path contains `..`".to_owned()),
            Component::Prefix(_) => return Err("the path has a prefix".to_owned()),
        }
    }
    Ok(rel)
}

/// chmod through a descriptor opened without following symlinks (the path was checked, this
/// makes sure).
fn set_mode(image: &str, path: &Path, mode: u32) -> Result<(), ImageError> {
    let file = open_no_follow(path).map_err(|err| ImageError::io(image, "open", path, err))?;
    file.set_permissions(Permissions::from_mode(mode)).map_err(|err| ImageError::io(image, "change the mode of", path, err))
}

fn open_no_follow(path: &Path) -> io::Result<File> {
    // O_PATH descriptors cannot fchmod; a plain read-only open of a directory or fifo is fine,
    // with O_NONBLOCK so a fifo does not wait for a writer.
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

/// Sets the mode and time of every directory that a layer described, deepest first, skipping
/// those that a later layer replaced or removed.
fn apply_directory_metadata(image: &str, root: &Path, dirs: HashMap<PathBuf, DirMetadata>) -> Result<(), ImageError> {
    let mut dirs: Vec<(PathBuf, DirMetadata)> = dirs.into_iter().collect();
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    'dirs: for (rel, metadata) in dirs {
        let mut current = root.to_path_buf();
        for component in rel.components() {
            current.push(component);
            match fs::symlink_metadata(&current) {
                Ok(existing) if existing.is_dir() => {}
                _ => continue 'dirs,
            }
        }
        let dir = open_no_follow(&current).map_err(|err| ImageError::io(image, "open", &current, err))?;
        let times = FileTimes::new().set_modified(metadata.mtime).set_accessed(metadata.mtime);
        dir.set_times(times).map_err(|err| ImageError::io(image, "set the time of", &current, err))?;
        dir.set_permissions(Permissions::from_mode(metadata.mode))
            .map_err(|err| ImageError::io(image, "change the mode of", &current, err))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_support::{gzip, TarBuilder};

    fn unpack_one(tar: Vec<u8>, compression: Compression) -> (tempfile::TempDir, Result<(), ImageError>) {
        unpack_one_shifted(tar, compression, 0)
    }

    fn unpack_one_shifted(tar: Vec<u8>, compression: Compression, offset: u32) -> (tempfile::TempDir, Result<(), ImageError>) {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        fs::write(&blob, &tar).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let layer = LayerInput {
            label: "layer 1/1".into(),
            path: blob,
            offset: 0,
            length: tar.len() as u64,
            compression,
            digest: Some(Digest::sha256_of(&tar)),
            diff_id: None,
            remove_if_corrupt: false,
        };
        let result = unpack_layers("test-image", &root, &[layer], offset);
        (dir, result)
    }

    #[test]
    fn normalizes_paths_and_refuses_parent_components() {
        assert_eq!(normalize(Path::new("./usr/bin/")).unwrap(), Path::new("usr/bin"));
        assert_eq!(normalize(Path::new("/etc/passwd")).unwrap(), Path::new("etc/passwd"));
        assert_eq!(normalize(Path::new("./")).unwrap(), Path::new(""));
        assert!(normalize(Path::new("a/../../b")).is_err());
    }

    #[test]
    fn unpacks_files_dirs_links_and_modes() {
        let tar = TarBuilder::new()
            .dir("usr", 0o755)
            .file("usr/tool", b"#!/bin/sh\n", 0o4755)
            .symlink("usr/alias", "tool")
            .hard_link("usr/tool2", "usr/tool")
            .dir("locked", 0o500)
            .file("locked/secret", b"s", 0o400)
            .file("implicit/parent/file", b"x", 0o644)
            .file_owned("home/app/.profile", b"x", 0o640, 1000, 1001)
            .finish();
        let (dir, result) = unpack_one(gzip(&tar), Compression::Detect);
        result.unwrap();
        let root = dir.path().join("root");
        assert_eq!(fs::read(root.join("usr/tool")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::metadata(root.join("usr/tool")).unwrap().permissions().mode() & 0o7777, 0o4755);
        assert_eq!(fs::read_link(root.join("usr/alias")).unwrap(), Path::new("tool"));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(root.join("usr/tool2")).unwrap().ino(), fs::metadata(root.join("usr/tool")).unwrap().ino());
        assert_eq!(fs::metadata(root.join("locked")).unwrap().permissions().mode() & 0o7777, 0o500);
        assert_eq!(fs::metadata(root.join("implicit/parent")).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(fs::metadata(root.join("usr/tool")).unwrap().mtime(), crate::image::test_support::MTIME as i64);
        if nix::unistd::geteuid().is_root() {
            let profile = fs::metadata(root.join("home/app/.profile")).unwrap();
            assert_eq!((profile.uid(), profile.gid()), (1000, 1001));
            assert_eq!(fs::symlink_metadata(root.join("usr/alias")).unwrap().uid(), 0);
        }
        // The test tree holds a read-only directory; make it removable again.
        fs::set_permissions(root.join("locked"), Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn owner_ids_are_shifted_into_the_user_namespace_range() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: changing owners needs root");
            return;
        }
        let tar = TarBuilder::new()
            .dir("app", 0o755)
            .file_owned("app/data", b"x", 0o640, 1000, 1001)
            .file_owned("app/huge-id", b"x", 0o640, 4_000_000, 70_000)
            .finish();
        let (dir, result) = unpack_one_shifted(tar, Compression::None, 200_000);
        result.unwrap();
        use std::os::unix::fs::MetadataExt;
        let owner = |path: &str| {
            let meta = fs::symlink_metadata(dir.path().join("root").join(path)).unwrap();
            (meta.uid(), meta.gid())
        };
        assert_eq!(owner(""), (200_000, 200_000), "the root directory belongs to the namespace's root");
        assert_eq!(owner("app"), (200_000, 200_000), "root becomes the namespace's root");
        assert_eq!(owner("app/data"), (201_000, 201_001));
        assert_eq!(owner("app/huge-id"), (265_534, 265_534), "ids outside the mapping become nobody");
    }

    #[test]
    fn zstd_layers_unpack() {
        let tar = TarBuilder::new().file("hello", b"zstd", 0o644).finish();
        let compressed = zstd::encode_all(&tar[..], 3).unwrap();
        let (dir, result) = unpack_one(compressed, Compression::Zstd);
        result.unwrap();
        assert_eq!(fs::read(dir.path().join("root/hello")).unwrap(), b"zstd");
    }

    #[test]
    fn refuses_entries_with_parent_components() {
        let tar = TarBuilder::new().file("ok", b"1", 0o644).raw_file("../escaped", b"evil", 0o644).finish();
        let (dir, result) = unpack_one(tar, Compression::None);
        let err = result.unwrap_err();
        assert!(matches!(err, ImageError::UnsafeLayerEntry { .. }), "{err}");
        assert!(err.to_string().contains("`../escaped`"), "{err}");
        assert!(!dir.path().join("escaped").exists());
    }

    #[test]
    fn refuses_hard_links_out_of_the_root() {
        let tar = TarBuilder::new().raw_hard_link("passwd", "../../etc/passwd").finish();
        let (_dir, result) = unpack_one(tar, Compression::None);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("hard link target `../../etc/passwd`"), "{err}");
    }

    #[test]
    fn refuses_writing_through_a_symlink_of_the_same_layer() {
        let outside = tempfile::tempdir().unwrap();
        let tar = TarBuilder::new()
            .symlink("etc", outside.path().to_str().unwrap())
            .file("etc/passwd", b"root::0:0::/:/bin/sh\n", 0o644)
            .finish();
        let (_dir, result) = unpack_one(tar, Compression::None);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("parent `etc` is a symbolic link"), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn replaces_a_symlink_rather_than_writing_through_it() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"host").unwrap();
        let tar = TarBuilder::new()
            .symlink("file", victim.to_str().unwrap())
            .file("file", b"image", 0o644)
            .symlink("dir", outside.path().to_str().unwrap())
            .dir("dir", 0o755)
            .finish();
        let (dir, result) = unpack_one(tar, Compression::None);
        result.unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"host");
        assert_eq!(fs::read(dir.path().join("root/file")).unwrap(), b"image");
        assert!(fs::symlink_metadata(dir.path().join("root/dir")).unwrap().is_dir());
    }

    #[test]
    fn a_corrupt_blob_is_a_digest_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let tar = gzip(&TarBuilder::new().file("a", &[7u8; 10_000], 0o644).finish());
        let mut corrupt = tar.clone();
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        let blob = dir.path().join("blob");
        fs::write(&blob, &corrupt).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let layer = LayerInput {
            label: "layer 1/1".into(),
            path: blob.clone(),
            offset: 0,
            length: corrupt.len() as u64,
            compression: Compression::Gzip,
            digest: Some(Digest::sha256_of(&tar)),
            diff_id: None,
            remove_if_corrupt: true,
        };
        let err = unpack_layers("test-image", &root, &[layer], 0).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!blob.exists(), "a corrupt blob of the store is removed");
    }
}
