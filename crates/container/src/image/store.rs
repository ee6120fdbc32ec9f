//! The image store on disk, and [`ImageStore::prepare`], which turns an [`ImageSource`] into an
//! unpacked root filesystem, once per manifest digest.
//!
//! Layout of `<dir>`:
//! * `blobs/<algo>/<hex>`: registry content by digest (manifests, configs, layers). Written to
//!   `blobs/<algo>/tmp-<uuid>`, fsynced, then renamed: a name is only ever a complete blob
//!   whose digest was checked. OCI layouts and docker-archives are read where they are.
//! * `rootfs/<algo>-<hex>/`: an unpacked image, named after its manifest digest (for a
//!   docker-archive, a digest of its own; see `archive`). Unpacked into `rootfs/tmp-<uuid>`,
//!   synced, then renamed, so a directory under its final name is always complete.
//!
//! `tmp-*` leftovers of an earlier process are removed by the first `prepare` of a store.
//! Within one process, unpacks of the same digest are serialised (the second caller waits and
//! reuses the first one's result), and temporary paths in use are never removed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use crate::image::digest::Digest;
use crate::image::error::ImageError;
use crate::image::manifest::ImageConfig;
use crate::image::reference::ImageSource;
use crate::image::registry::{RegistryAuth, Remote};
use crate::image::unpack::{unpack_layers, LayerInput};
use crate::image::{archive, layout};

/// Fetches and unpacks images under one directory (e.g. `<state_dir>/images`).
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    leftovers_removed: AtomicBool,
    /// Added to every owner id when unpacking (0: ids as in the image). Containers in a user
    /// namespace mapping 0 to this host id see the image's own owners.
    owner_offset: u32,
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    /// "sha256:..." of the manifest (the image's identity).
    pub digest: String,
    /// Unpacked, read-only-by-convention root filesystem (owned by root, ownership and modes
    /// from the layers).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

/// What a source resolves to before any layer is unpacked: enough to know whether the image
/// is already unpacked, and how to unpack it if not.
#[derive(Debug)]
pub(crate) struct ResolvedImage {
    pub(crate) digest: Digest,
    pub(crate) config: ImageConfig,
    pub(crate) layers: Vec<LayerInput>,
}

impl ImageStore {
    /// `dir` is e.g. `<state_dir>/images`; created if missing (by the first `prepare`).
    pub fn new(dir: PathBuf) -> ImageStore {
        ImageStore { dir, leftovers_removed: AtomicBool::new(false), owner_offset: 0 }
    }

    /// A store whose rootfs directories have every owner id shifted by `offset` (ids of 65536
    /// and above become `offset + 65534`, "nobody"). They are kept apart from unshifted ones
    /// (`<digest>-shifted-<offset>`).
    pub fn with_owner_offset(dir: PathBuf, offset: u32) -> ImageStore {
        ImageStore { dir, leftovers_removed: AtomicBool::new(false), owner_offset: offset }
    }

    /// Fetches (if needed) and unpacks (if needed) the image, returning its unpacked rootfs.
    ///
    /// Each image is unpacked once per manifest digest: a later call (from another pool, or
    /// after a restart) reuses `<dir>/rootfs/<algo>-<hex>/` without reading layers again. A
    /// registry tag is still resolved to its manifest (one small request); a reference pinned
    /// by digest whose manifest is in the store needs no network at all.
    ///
    /// `insecure_registries`: registry hosts (`host:port`) to reach over plain HTTP; loopback
    /// registries (127.0.0.0/8, `localhost`, `[::1]`) always are.
    ///
    /// Unpacking runs on one blocking thread (`spawn_blocking`); see the module doc.
    pub async fn prepare(
        &self,
        source: &ImageSource,
        auth: Option<&RegistryAuth>,
        insecure_registries: &[String],
    ) -> Result<PreparedImage, ImageError> {
        let image = source.to_string();
        let started = Instant::now();
        self.create_directories(&image).await?;
        let blobs = self.dir.join("blobs");
        match source {
            ImageSource::Registry { reference } => {
                let remote = Remote::new(&image, reference, auth, insecure_registries)?;
                let resolved = remote.resolve(&blobs).await?;
                self.materialize(&image, resolved, Some(&remote), started).await
            }
            ImageSource::OciLayout { path, tag } => {
                let (label, path, tag) = (image.clone(), path.clone(), tag.clone());
                let resolved = run_blocking(move || layout::resolve(&label, &path, tag.as_deref())).await?;
                self.materialize(&image, resolved, None, started).await
            }
            ImageSource::DockerArchive { path, tag } => {
                let (label, path, tag) = (image.clone(), path.clone(), tag.clone());
                let resolved = run_blocking(move || archive::resolve(&label, &path, tag.as_deref())).await?;
                self.materialize(&image, resolved, None, started).await
            }
        }
    }

    fn rootfs_dir(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Creates the store's directories and, the first time, removes what an earlier process
    /// left half written.
    async fn create_directories(&self, image: &str) -> Result<(), ImageError> {
        let dir = self.dir.clone();
        let remove_leftovers = !self.leftovers_removed.swap(true, Ordering::SeqCst);
        let label = image.to_owned();
        run_blocking(move || {
            for sub in ["blobs/sha256", "blobs/sha512", "rootfs"] {
                let path = dir.join(sub);
                fs::create_dir_all(&path).map_err(|err| ImageError::io(&label, "create directory", &path, err))?;
            }
            if remove_leftovers {
                for sub in ["blobs/sha256", "blobs/sha512", "rootfs"] {
                    remove_leftovers_in(&dir.join(sub));
                }
            }
            Ok(())
        })
        .await
    }

    async fn materialize(
        &self,
        image: &str,
        resolved: ResolvedImage,
        remote: Option<&Remote>,
        started: Instant,
    ) -> Result<PreparedImage, ImageError> {
        let name = match self.owner_offset {
            0 => resolved.digest.dir_name(),
            offset => format!("{}-shifted-{offset}", resolved.digest.dir_name()),
        };
        let rootfs = self.rootfs_dir().join(name);
        let prepared = PreparedImage { digest: resolved.digest.to_string(), rootfs: rootfs.clone(), config: resolved.config };
        if rootfs.is_dir() {
            tracing::info!(image, digest = %prepared.digest, "image already unpacked; reusing it");
            return Ok(prepared);
        }
        let lock = unpack_lock(&rootfs);
        let _unpacking = lock.lock().await;
        if rootfs.is_dir() {
            tracing::info!(image, digest = %prepared.digest, "image unpacked meanwhile by another caller; reusing it");
            return Ok(prepared);
        }
        if let Some(remote) = remote {
            remote.download_missing(&resolved.layers).await?;
        }
        let fetched_ms = started.elapsed().as_millis() as u64;
        let unpack_started = Instant::now();
        let temporary = InProgress::new(self.rootfs_dir().join(format!("tmp-{}", uuid::Uuid::new_v4())));
        let label = image.to_owned();
        let final_path = rootfs.clone();
        let layers = resolved.layers;
        let owner_offset = self.owner_offset;
        run_blocking(move || unpack_into(&label, temporary, &final_path, &layers, owner_offset)).await?;
        tracing::info!(
            image,
            digest = %prepared.digest,
            fetch_ms = fetched_ms,
            unpack_ms = unpack_started.elapsed().as_millis() as u64,
            rootfs = %rootfs.display(),
            "image unpacked"
        );
        Ok(prepared)
    }
}

/// Unpacks into `temporary`, makes it durable, and renames it to `final_path`.
fn unpack_into(image: &str, temporary: InProgress, final_path: &Path, layers: &[LayerInput], owner_offset: u32) -> Result<(), ImageError> {
    let tmp = temporary.path();
    fs::create_dir(tmp).map_err(|err| ImageError::io(image, "create directory", tmp, err))?;
    #[cfg(test)]
    tests::count_unpack(final_path);
    unpack_layers(image, tmp, layers, owner_offset)?;
    // One syncfs rather than an fsync per file: the rename below must not reach the disk
    // before the files do.
    let dir = File::open(tmp).map_err(|err| ImageError::io(image, "open", tmp, err))?;
    nix::unistd::syncfs(&dir).map_err(|err| ImageError::io(image, "sync", tmp, err.into()))?;
    drop(dir);
    match fs::rename(tmp, final_path) {
        Ok(()) => {}
        // Another process (or another store over the same directory) finished first.
        Err(err) if final_path.is_dir() => {
            tracing::debug!(image, error = %err, "rootfs appeared meanwhile; dropping ours");
        }
        Err(err) => return Err(ImageError::io(image, "rename into place", tmp, err)),
    }
    if let Some(parent) = final_path.parent() {
        sync_dir(parent).map_err(|err| ImageError::io(image, "sync", parent, err))?;
    }
    Ok(())
}

/// The path of a blob in the store.
pub(crate) fn blob_path(blobs: &Path, digest: &Digest) -> PathBuf {
    blobs.join(digest.algorithm.name()).join(&digest.hex)
}

/// Writes a small blob (manifest, config) atomically; the caller has checked its digest.
pub(crate) fn write_blob(blobs: &Path, digest: &Digest, bytes: &[u8]) -> io::Result<PathBuf> {
    let final_path = blob_path(blobs, digest);
    let dir = blobs.join(digest.algorithm.name());
    let temporary = InProgress::new(dir.join(format!("tmp-{}", uuid::Uuid::new_v4())));
    {
        use std::io::Write;
        let mut file = File::create(temporary.path())?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(temporary.path(), &final_path)?;
    sync_dir(&dir)?;
    Ok(final_path)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Temporary paths (of every store of this process) being written right now: the leftover
/// sweep must not remove them.
static IN_PROGRESS: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

/// One lock per final rootfs path, shared by every store of this process.
static UNPACK_LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = LazyLock::new(Default::default);

fn unpack_lock(rootfs: &Path) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = UNPACK_LOCKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(rootfs.to_owned()).or_default().clone()
}

/// A temporary path in use: registered so the sweep leaves it alone, and removed (if still
/// there, i.e. not renamed into place) when dropped.
pub(crate) struct InProgress {
    path: PathBuf,
}

impl InProgress {
    pub(crate) fn new(path: PathBuf) -> InProgress {
        IN_PROGRESS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(path.clone());
        InProgress { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        remove_path(&self.path);
        IN_PROGRESS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&self.path);
    }
}

fn remove_leftovers_in(dir: &Path) {
    let Ok(children) = fs::read_dir(dir) else { return };
    for child in children.flatten() {
        let path = child.path();
        let is_temporary = child.file_name().to_str().is_some_and(|name| name.starts_with("tmp-"));
        let in_use = IN_PROGRESS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(&path);
        if is_temporary && !in_use {
            tracing::info!(path = %path.display(), "removing a leftover of an interrupted fetch or unpack");
            remove_path(&path);
        }
    }
}

fn remove_path(path: &Path) {
    let removed = match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(err) = removed {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove a temporary path of the image store");
    }
}

/// Runs blocking file work off the async threads; a panic in it is a panic here.
pub(crate) async fn run_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::image::test_support::{docker_archive, OciLayoutBuilder, TarBuilder, TestLayer, LAYER_TAR};

    /// Unpacks started per final rootfs path (each test has its own directories).
    static UNPACKS: LazyLock<Mutex<HashMap<PathBuf, usize>>> = LazyLock::new(Default::default);

    pub(super) fn count_unpack(final_path: &Path) {
        *UNPACKS.lock().unwrap().entry(final_path.to_owned()).or_default() += 1;
    }

    fn unpacks_of(rootfs: &Path) -> usize {
        UNPACKS.lock().unwrap().get(rootfs).copied().unwrap_or(0)
    }

    fn oci(path: &Path, tag: Option<&str>) -> ImageSource {
        ImageSource::OciLayout { path: path.to_owned(), tag: tag.map(str::to_owned) }
    }

    /// Two layers: the second deletes a file (whiteout), makes a directory opaque, replaces a
    /// file by a symlink, and adds files.
    fn two_layers() -> Vec<TestLayer> {
        let lower = TarBuilder::new()
            .dir("etc", 0o755)
            .file("etc/hostname", b"lower", 0o644)
            .file("etc/removed", b"gone soon", 0o644)
            .dir("var/cache", 0o755)
            .file("var/cache/old", b"old", 0o644)
            .dir("var/cache/sub", 0o755)
            .file("var/cache/sub/deep", b"old", 0o644)
            .file("bin/app", b"v1", 0o755)
            .finish();
        let upper = TarBuilder::new()
            .whiteout("etc/.wh.removed")
            .dir("var/cache", 0o700)
            .whiteout("var/cache/.wh..wh..opq")
            .file("var/cache/new", b"new", 0o644)
            .symlink("bin/app", "app-v2")
            .file("bin/app-v2", b"v2", 0o755)
            .finish();
        vec![TestLayer::gzip(lower), TestLayer { media_type: LAYER_TAR, tar: upper }]
    }

    #[tokio::test]
    async fn unpacks_an_oci_layout_with_whiteouts_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        let manifest_digest = layout.image(Some("v1"), &two_layers());
        let store = ImageStore::new(dir.path().join("images"));

        let prepared = store.prepare(&oci(&layout.dir, Some("v1")), None, &[]).await.unwrap();
        assert_eq!(prepared.digest, manifest_digest.to_string());
        assert_eq!(prepared.rootfs, dir.path().join("images/rootfs").join(manifest_digest.dir_name()));
        let root = &prepared.rootfs;
        assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"lower");
        assert!(!root.join("etc/removed").exists(), "whiteout removes the lower file");
        assert!(!root.join("var/cache/old").exists(), "opaque directory hides lower files");
        assert!(!root.join("var/cache/sub").exists(), "opaque directory hides lower directories");
        assert_eq!(fs::read(root.join("var/cache/new")).unwrap(), b"new");
        assert_eq!(fs::metadata(root.join("var/cache")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::read_link(root.join("bin/app")).unwrap(), Path::new("app-v2"));
        assert_eq!(fs::read(root.join("bin/app")).unwrap(), b"v2");
        assert_eq!(prepared.config.cmd, vec!["/bin/app".to_owned()]);
        assert_eq!(prepared.config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(prepared.config.exposed_ports, vec!["8080/tcp".to_owned()]);

        // Without a tag, an index of one image is unambiguous.
        let untagged = store.prepare(&oci(&layout.dir, None), None, &[]).await.unwrap();
        assert_eq!(untagged.rootfs, prepared.rootfs);
    }

    #[tokio::test]
    async fn a_second_prepare_reuses_the_rootfs_without_reading_layers() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        let layers = two_layers();
        layout.image(Some("v1"), &layers);
        let first = ImageStore::new(dir.path().join("images")).prepare(&oci(&layout.dir, Some("v1")), None, &[]).await.unwrap();
        fs::write(first.rootfs.join("marker"), b"from the first unpack").unwrap();
        // Layer blobs are gone: a second unpack would fail.
        for layer in &layers {
            fs::remove_file(layout.blob_path(&Digest::sha256_of(&crate::image::test_support::gzip(&layer.tar)))).ok();
            fs::remove_file(layout.blob_path(&Digest::sha256_of(&layer.tar))).ok();
        }
        // A new store over the same directory: as after a restart.
        let second = ImageStore::new(dir.path().join("images")).prepare(&oci(&layout.dir, Some("v1")), None, &[]).await.unwrap();
        assert_eq!(second, first);
        assert!(second.rootfs.join("marker").exists());
        assert_eq!(unpacks_of(&first.rootfs), 1);
    }

    #[tokio::test]
    async fn concurrent_prepares_unpack_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.image(None, &two_layers());
        let source = oci(&layout.dir, None);
        let (store_a, store_b) = (ImageStore::new(dir.path().join("images")), ImageStore::new(dir.path().join("images")));
        let (a, b) = tokio::join!(store_a.prepare(&source, None, &[]), store_b.prepare(&source, None, &[]));
        let a = a.unwrap();
        assert_eq!(a, b.unwrap());
        assert_eq!(unpacks_of(&a.rootfs), 1);
        let names: Vec<_> = fs::read_dir(dir.path().join("images/rootfs")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[tokio::test]
    async fn refuses_a_symlink_escape_across_layers_and_writes_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("host-etc");
        fs::create_dir(&outside).unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.image(
            None,
            &[
                TestLayer::gzip(TarBuilder::new().symlink("etc", outside.to_str().unwrap()).finish()),
                TestLayer::gzip(TarBuilder::new().file("etc/passwd", b"root::0:0::/:/bin/sh\n", 0o644).finish()),
            ],
        );
        let store = ImageStore::new(dir.path().join("images"));
        let err = store.prepare(&oci(&layout.dir, None), None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::UnsafeLayerEntry { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("layer 2/2") && message.contains("`etc/passwd`") && message.contains("parent `etc` is a symbolic link"),
            "{message}"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing written through the symlink");
        assert_eq!(fs::read_dir(dir.path().join("images/rootfs")).unwrap().count(), 0, "no rootfs, no leftover");
    }

    #[tokio::test]
    async fn refuses_entries_that_climb_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.image(None, &[TestLayer::gzip(TarBuilder::new().raw_file("../../escaped", b"x", 0o644).finish())]);
        let err = ImageStore::new(dir.path().join("images")).prepare(&oci(&layout.dir, None), None, &[]).await.unwrap_err();
        assert!(err.to_string().contains("refusing entry `../../escaped`: the path contains `..`"), "{err}");
        assert!(!dir.path().join("escaped").exists());
    }

    #[tokio::test]
    async fn detects_corrupt_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        let layers = vec![TestLayer::gzip(TarBuilder::new().file("a", &[1u8; 4096], 0o644).finish())];
        layout.image(None, &layers);
        let layer_blob = layout.blob_path(&Digest::sha256_of(&crate::image::test_support::gzip(&layers[0].tar)));
        let mut bytes = fs::read(&layer_blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55; // the gzip trailer: the tar itself still reads fine
        fs::write(&layer_blob, &bytes).unwrap();
        let store = ImageStore::new(dir.path().join("images"));
        let err = store.prepare(&oci(&layout.dir, None), None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("layer 1/1"), "{err}");

        // A corrupt manifest is caught when it is read.
        let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
        let manifest_digest = Digest::parse(index["manifests"][0]["digest"].as_str().unwrap()).unwrap();
        fs::write(layout.blob_path(&manifest_digest), b"{}").unwrap();
        let err = store.prepare(&oci(&layout.dir, None), None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn unsupported_layer_media_types_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.image(None, &[TestLayer { media_type: "application/vnd.example.layer.v1+squashfs", tar: b"x".to_vec() }]);
        let err = ImageStore::new(dir.path().join("images")).prepare(&oci(&layout.dir, None), None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::UnsupportedMediaType { .. }), "{err}");
        assert!(err.to_string().contains("unsupported media type `application/vnd.example.layer.v1+squashfs` for layer 1"), "{err}");
    }

    #[tokio::test]
    async fn layout_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"));
        let err = store.prepare(&oci(dir.path(), None), None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::NotAnOciLayout { .. }), "{err}");
        assert!(err.to_string().contains("`oci-layout`"), "{err}");

        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.image(Some("a"), &two_layers());
        layout.image(Some("b"), &[TestLayer::gzip(TarBuilder::new().file("b", b"b", 0o644).finish())]);
        let err = store.prepare(&oci(&layout.dir, None), None, &[]).await.unwrap_err();
        assert!(err.to_string().contains("holds 2 manifests") && err.to_string().contains("tags: a, b"), "{err}");
        let err = store.prepare(&oci(&layout.dir, Some("c")), None, &[]).await.unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }) && err.to_string().contains("tag `c`"), "{err}");
        let b = store.prepare(&oci(&layout.dir, Some("b")), None, &[]).await.unwrap();
        assert_eq!(fs::read(b.rootfs.join("b")).unwrap(), b"b");
    }

    #[tokio::test]
    async fn unpacks_docker_archives() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("images.tar");
        let app = vec![
            TestLayer::gzip(TarBuilder::new().file("etc/os-release", b"test", 0o644).finish()),
            TestLayer::gzip(TarBuilder::new().whiteout("etc/.wh.os-release").file("app", b"app", 0o755).finish()),
        ];
        let other = vec![TestLayer::gzip(TarBuilder::new().file("other", b"other", 0o644).finish())];
        docker_archive(&archive, &[(&["myorg/app:1.0"], app), (&["other:latest"], other)], true);
        let store = ImageStore::new(dir.path().join("images"));
        let source = |tag: Option<&str>| ImageSource::DockerArchive { path: archive.clone(), tag: tag.map(str::to_owned) };

        let prepared = store.prepare(&source(Some("myorg/app:1.0")), None, &[]).await.unwrap();
        assert_eq!(fs::read(prepared.rootfs.join("app")).unwrap(), b"app");
        assert!(!prepared.rootfs.join("etc/os-release").exists());
        assert_eq!(prepared.config.env, vec!["PATH=/bin".to_owned()]);
        assert!(prepared.digest.starts_with("sha256:"));
        let other = store.prepare(&source(Some("other")), None, &[]).await.unwrap();
        assert_eq!(fs::read(other.rootfs.join("other")).unwrap(), b"other");
        assert_ne!(other.digest, prepared.digest);

        let err = store.prepare(&source(None), None, &[]).await.unwrap_err();
        assert!(err.to_string().contains("holds 2 images"), "{err}");
        let err = store.prepare(&source(Some("nope:1")), None, &[]).await.unwrap_err();
        assert!(err.to_string().contains("tag `nope:1`") && err.to_string().contains("myorg/app:1.0"), "{err}");

        // Plain layer tars work as well, and the same image gets the same identity.
        let plain = dir.path().join("plain.tar");
        let app_again = vec![
            TestLayer::gzip(TarBuilder::new().file("etc/os-release", b"test", 0o644).finish()),
            TestLayer::gzip(TarBuilder::new().whiteout("etc/.wh.os-release").file("app", b"app", 0o755).finish()),
        ];
        docker_archive(&plain, &[(&["myorg/app:1.0"], app_again)], false);
        let again = store.prepare(&ImageSource::DockerArchive { path: plain, tag: None }, None, &[]).await.unwrap();
        assert_eq!(again.digest, prepared.digest);
    }

    #[tokio::test]
    async fn docker_archive_layers_are_checked_against_diff_ids() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("image.tar");
        let layer = TarBuilder::new().file("a", b"original-content", 0o644).finish();
        docker_archive(&archive, &[(&["app:1"], vec![TestLayer { media_type: LAYER_TAR, tar: layer }])], false);
        // Same length, other content: the tar still reads, only the diff ID tells.
        let mut bytes = fs::read(&archive).unwrap();
        let position = bytes.windows(16).position(|w| w == b"original-content").unwrap();
        bytes[position..position + 16].copy_from_slice(b"tampered-content");
        fs::write(&archive, &bytes).unwrap();
        let err = ImageStore::new(dir.path().join("images"))
            .prepare(&ImageSource::DockerArchive { path: archive, tag: None }, None, &[])
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("rootfs.diff_ids"), "{err}");
    }

    #[tokio::test]
    async fn leftovers_of_an_earlier_process_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        fs::create_dir_all(images.join("rootfs/tmp-1234/usr")).unwrap();
        fs::create_dir_all(images.join("blobs/sha256")).unwrap();
        fs::write(images.join("blobs/sha256/tmp-5678"), b"half a blob").unwrap();
        let mut layout = OciLayoutBuilder::new(&dir.path().join("layout"));
        layout.image(None, &two_layers());
        ImageStore::new(images.clone()).prepare(&oci(&layout.dir, None), None, &[]).await.unwrap();
        assert!(!images.join("rootfs/tmp-1234").exists());
        assert!(!images.join("blobs/sha256/tmp-5678").exists());
    }
}
