//! Network namespaces made for sandboxes, and TCP connections into them.
//!
//! A custom container gets a network namespace of its own holding only a loopback interface.
//! The server reaches the container's port by opening the connection *inside* that namespace
//! (a socket keeps the namespace it was created in), so no address, route or veth is needed
//! and nothing in the sandbox can reach the host. Both steps run on a short-lived thread of
//! their own: `unshare` and `setns` change only the calling thread, and that thread must
//! never go back to a pool where other work would run in the wrong namespace.
#![allow(unsafe_code)]

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::CloneFlags;

/// A network namespace, held open by a file descriptor.
#[derive(Debug)]
pub struct NetNamespace {
    fd: OwnedFd,
}

impl NetNamespace {
    /// Creates a namespace with `lo` up and nothing else.
    pub fn create() -> std::io::Result<NetNamespace> {
        on_fresh_thread(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            loopback_up()?;
            let fd = nix::fcntl::open(
                "/proc/thread-self/ns/net",
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            Ok(NetNamespace { fd })
        })
    }

    /// The network namespace process `pid` is in (a container a previous server started).
    pub fn of_process(pid: u32) -> std::io::Result<NetNamespace> {
        let fd = nix::fcntl::open(
            format!("/proc/{pid}/ns/net").as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok(NetNamespace { fd })
    }

    /// A path that names this namespace for other processes started by this one (an OCI
    /// runtime reads it from the bundle's `config.json`). Valid while `self` lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd()))
    }

    /// Connects to `address` from inside the namespace.
    pub fn connect(&self, address: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let fd = self.fd.try_clone()?;
        on_fresh_thread(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)?;
            let stream = TcpStream::connect_timeout(&address, timeout)?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }

    /// Runs `work` on a fresh thread inside the namespace and returns its result. Whatever
    /// `work` opens there (a netlink socket, say) keeps the namespace after the thread ends.
    pub fn run_inside<T: Send + 'static>(&self, work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
        let fd = self.fd.try_clone()?;
        on_fresh_thread(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)?;
            work()
        })
    }

    /// Async form of [`NetNamespace::connect`], for the proxy.
    pub async fn connect_async(&self, address: SocketAddr, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
        let fd = self.fd.try_clone()?;
        let stream = tokio::task::spawn_blocking(move || NetNamespace { fd }.connect(address, timeout))
            .await
            .map_err(|e| std::io::Error::other(format!("connect task failed: {e}")))??;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }
}

/// The namespace's descriptor, for kernel interfaces that take one (a veth peer is created
/// straight into a namespace with `IFLA_NET_NS_FD`).
impl AsFd for NetNamespace {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Runs `work` on a new thread that ends with it, so namespace changes die with the thread.
fn on_fresh_thread<T: Send + 'static>(work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    std::thread::Builder::new()
        .name("sandpool-netns".into())
        .spawn(work)?
        .join()
        .map_err(|_| std::io::Error::other("a network namespace thread panicked"))?
}

/// Sets IFF_UP on `lo` in the calling thread's network namespace.
pub fn loopback_up() -> Result<(), nix::Error> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: `ifreq` is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, which outlives both calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(nix::Error::last());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(nix::Error::last());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn connections_reach_servers_inside_the_namespace_and_not_outside() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A server on the host's loopback is invisible from inside the namespace.
        let host_server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host_port = host_server.local_addr().unwrap().port();
        let namespace = NetNamespace::create().unwrap();
        let outside = namespace.connect(SocketAddr::from(([127, 0, 0, 1], host_port)), Duration::from_secs(1));
        assert!(outside.is_err(), "the host's loopback must not be reachable from the namespace");

        // A server started inside the namespace is reachable through it.
        let fd = namespace.fd.try_clone().unwrap();
        let inner = on_fresh_thread(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)?;
            std::net::TcpListener::bind("127.0.0.1:0")
        })
        .unwrap();
        let port = inner.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = inner.accept().unwrap();
            conn.write_all(b"inside").unwrap();
        });
        let mut stream = namespace.connect(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1)).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        assert_eq!(text, "inside");
        server.join().unwrap();
    }
}
