//! Watching a process that is not our child (a container's main process, reparented to
//! init when its runtime exits) through a pidfd: readable once the process has ended, and
//! immune to pid reuse.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

/// A handle on one process.
pub struct ProcessWatch {
    fd: AsyncFd<OwnedFd>,
}

impl ProcessWatch {
    /// Opens a pidfd for `pid`; fails if the process is already gone.
    pub fn open(pid: u32) -> std::io::Result<ProcessWatch> {
        let raw = rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("pid 0 is not a process"))?;
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())?;
        // SAFETY: an OwnedFd stays open and keeps its descriptor number until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(pidfd) }?;
        Ok(ProcessWatch { fd })
    }

    /// Resolves when the process has ended.
    pub async fn exited(&self) {
        let _ = self.fd.readable().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_when_the_process_ends_and_not_before() {
        let mut child = std::process::Command::new("sleep").arg("0.3").spawn().unwrap();
        let watch = ProcessWatch::open(child.id()).unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), watch.exited()).await;
        assert!(early.is_err(), "the process is still running");
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.exited()).await.expect("exit seen");
        child.wait().unwrap();
    }
}
