//! Datagrams with optional file descriptors (`SCM_RIGHTS`) over a `SOCK_SEQPACKET` socket.
//!
//! Used on both ends of the zygote control channel: blocking on the zygote side, behind
//! `tokio::io::unix::AsyncFd` on the server side (the calls below are non-blocking there
//! because the socket is).
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// A received datagram and the descriptors that came with it.
pub type Datagram = (Vec<u8>, Vec<OwnedFd>);

/// Sends one datagram, passing `fd` along when given.
pub fn send_datagram(socket: RawFd, bytes: &[u8], fd: Option<RawFd>) -> nix::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let fds = fd.map(|fd| [fd]);
    let cmsgs: Vec<ControlMessage<'_>> = fds.as_ref().map(|fds| vec![ControlMessage::ScmRights(fds)]).unwrap_or_default();
    loop {
        match sendmsg::<()>(socket, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one datagram and the descriptors passed with it. `Ok(None)` means the peer
/// closed the channel. A datagram longer than `max_len` is an error (`EMSGSIZE`).
pub fn recv_datagram(socket: RawFd, max_len: usize) -> nix::Result<Option<Datagram>> {
    // Size the buffer to the datagram (a peek with MSG_TRUNC reports its full length). In the
    // zygote this matters for memory, not only speed: every page it writes between forks is
    // copied, and the old copy stays with the sessions forked before.
    let len = loop {
        let mut probe = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut probe)];
        match recvmsg::<()>(socket, &mut iov, None, MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
            Ok(msg) => break msg.bytes,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    };
    if len > max_len {
        return Err(nix::Error::EMSGSIZE);
    }
    let mut buf = vec![0u8; len.max(1)];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(socket, &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for fd in received {
                    // SAFETY: the kernel just installed this descriptor for us; nobody else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(nix::Error::EMSGSIZE);
        }
        let len = msg.bytes;
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(len);
        return Ok(Some((buf, fds)));
    }
}
