//! The zygote's private root filesystem, built once per pool and inherited by every session.
//!
//! Layout (everything read-only except where noted; host paths keep their host names):
//! `/usr` and the merged-usr links, the runtime and venv paths, a curated `/etc`, a minimal
//! `/dev`, a `/proc` that hides other users' processes, and empty `/mnt/data` and `/tmp`
//! mount points on which each session mounts its own tmpfs. The host's other files (home
//! directories, the server's state directory, keys) are simply not in this tree.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::protocol::ZygoteConfig;

/// A failed step of building the root, with the path it was working on.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot {step} {path}")]
    Mount { step: &'static str, path: PathBuf, source: nix::Error },
    #[error("cannot prepare {path}")]
    Io { path: PathBuf, source: io::Error },
}

const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
const TOP_LEVEL_LINKS: &[&str] = &["bin", "lib", "lib32", "lib64", "libx32", "sbin"];

/// Builds the root under `config.root_dir` and pivots into it. Must run as root inside a
/// fresh, private mount namespace. Binds marked writable during warm-up are left writable
/// (the zygote remounts them read-only itself once warm).
pub fn build_and_enter(config: &ZygoteConfig) -> Result<(), RootfsError> {
    let root = config.root_dir.as_path();
    mount_step("make private", Path::new("/"), None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    mount_step(
        "mount the root tmpfs on",
        root,
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )?;

    for dir in ["usr", "etc", "dev", "proc", "tmp", "mnt/data", ".old"] {
        // Created before the binds so that a bind under one of these names fails loudly
        // instead of silently being hidden later by a session mount.
        mkdir_all(&root.join(dir))?;
    }
    bind_read_only(Path::new("/usr"), &root.join("usr"))?;
    for name in TOP_LEVEL_LINKS {
        let host = Path::new("/").join(name);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&host).map_err(|source| RootfsError::Io { path: host.clone(), source })?;
                symlink(&target, root.join(name)).map_err(|source| RootfsError::Io { path: root.join(name), source })?;
            }
            Ok(meta) if meta.is_dir() => {
                mkdir_all(&root.join(name))?;
                bind_read_only(&host, &root.join(name))?;
            }
            _ => {}
        }
    }
    // Read-only binds first, writable ones last: a writable bind may sit inside a
    // read-only one (matplotlib's cache inside the venv).
    let mut binds: Vec<_> = config.binds.iter().filter(|b| !(b.host == b.inside && b.inside.starts_with("/usr"))).collect();
    binds.sort_by_key(|b| b.writable_during_warm_up);
    for bind in binds {
        let target = inside(root, &bind.inside);
        mkdir_all(&target)?;
        if bind.writable_during_warm_up {
            mount_step("bind", &bind.host, None, &target, None, MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
        } else {
            bind_read_only(&bind.host, &target)?;
        }
    }
    populate_etc(root, &config.etc_entries)?;
    populate_dev(root)?;
    // `hidepid=invisible` gives this procfs instance its own option (Linux >= 5.8): a session
    // runs under a uid of its own, so it sees only its own processes.
    let proc_dir = root.join("proc");
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if mount_step("mount proc on", &proc_dir, Some("proc"), &proc_dir, Some("proc"), proc_flags, Some("hidepid=invisible")).is_err() {
        mount_step("mount proc on", &proc_dir, Some("proc"), &proc_dir, Some("proc"), proc_flags, Some("hidepid=2"))?;
    }

    nix::unistd::pivot_root(root, &root.join(".old")).map_err(|source| RootfsError::Mount {
        step: "pivot into",
        path: root.to_owned(),
        source,
    })?;
    std::env::set_current_dir("/").map_err(|source| RootfsError::Io { path: "/".into(), source })?;
    umount2("/.old", MntFlags::MNT_DETACH).map_err(|source| RootfsError::Mount { step: "detach", path: "/.old".into(), source })?;
    fs::remove_dir("/.old").map_err(|source| RootfsError::Io { path: "/.old".into(), source })?;
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_step("remount read-only", Path::new("/"), None, Path::new("/"), None, ro, None)?;
    Ok(())
}

/// Remounts an already bound path read-only (used after the zygote's warm-up).
pub fn remount_read_only(path: &Path) -> Result<(), RootfsError> {
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_step("remount read-only", path, None, path, None, ro, None)
}

/// The location of host path `path` inside the new root.
fn inside(root: &Path, path: &Path) -> PathBuf {
    let relative: PathBuf = path.components().filter(|c| matches!(c, Component::Normal(_))).collect();
    root.join(relative)
}

fn populate_etc(root: &Path, entries: &[String]) -> Result<(), RootfsError> {
    let etc = root.join("etc");
    for name in entries {
        let host = Path::new("/etc").join(name);
        let target = etc.join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if let Some(parent) = target.parent() {
            mkdir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&host).map_err(|source| RootfsError::Io { path: host.clone(), source })?;
            symlink(&link, &target).map_err(|source| RootfsError::Io { path: target.clone(), source })?;
        } else if meta.is_dir() {
            mkdir_all(&target)?;
            bind_read_only(&host, &target)?;
        } else {
            write_file(&target, b"")?;
            bind_read_only(&host, &target)?;
        }
    }
    // Synthesized rather than bound: the host's account list is none of a session's business.
    write_file(&etc.join("passwd"), b"root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:1000:1000:sandbox:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")?;
    write_file(&etc.join("group"), b"root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n")?;
    write_file(&etc.join("hosts"), b"127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n")?;
    write_file(&etc.join("hostname"), b"sandbox\n")?;
    Ok(())
}

fn populate_dev(root: &Path) -> Result<(), RootfsError> {
    let dev = root.join("dev");
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        write_file(&target, b"")?;
        // Device nodes are bound, not created: the bind keeps the host's node and our root
        // tmpfs stays `nodev`-safe for everything else.
        mount_step("bind", &host, None, &target, None, MsFlags::MS_BIND | MsFlags::MS_NOSUID, None)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("shm", "/tmp"),
    ] {
        symlink(target, dev.join(name)).map_err(|source| RootfsError::Io { path: dev.join(name), source })?;
    }
    Ok(())
}

fn bind_read_only(source: &Path, target: &Path) -> Result<(), RootfsError> {
    mount_step("bind", source, None, target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
    mount_step("remount read-only", target, None, target, None, ro, None)
}

fn mount_step(
    step: &'static str,
    source: &Path,
    source_name: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootfsError> {
    let source_arg: Option<&Path> = match source_name {
        Some(_) => None,
        None => Some(source),
    };
    let res = match source_name {
        Some(name) => mount(Some(name), target, fstype, flags, data),
        None => mount(source_arg, target, fstype, flags, data),
    };
    res.map_err(|source| RootfsError::Mount { step, path: target.to_owned(), source })
}

fn mkdir_all(path: &Path) -> Result<(), RootfsError> {
    fs::create_dir_all(path).map_err(|source| RootfsError::Io { path: path.to_owned(), source })
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), RootfsError> {
    fs::write(path, contents).map_err(|source| RootfsError::Io { path: path.to_owned(), source })
}
