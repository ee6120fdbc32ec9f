//! Outbound network access for sessions of pools with `network_status = "EgressEnabled"`.
//!
//! Every session already has a network namespace of its own (see `sandpool_sandbox::netns`);
//! the server reaches the container through it, on the namespace's loopback, whatever this
//! module does. An egress-enabled session additionally gets a veth pair: the host end
//! (`<prefix><slot>`) stays in the server's namespace, the peer (`eth0`) is created straight
//! inside the session's namespace, each end gets one address of a `/31`, and the session's
//! default route points at the host end. The host forwards and masquerades what comes out.
//!
//! What a session may reach is decided by one nftables table per server (named after the
//! instance), written once at start-up, so adding a session costs no nft call:
//! * `input`: nothing from a session's veth reaches the host itself: not the gateway address,
//!   not the host's LAN or public addresses, not any service bound to `0.0.0.0`. (A veth makes
//!   the host reachable by default; measured in `sandbox-measurements.md` §7.)
//! * `forward`: a session's packets are forwarded only to IPv4 addresses outside the
//!   private, shared, link-local, loopback, multicast and reserved ranges, and outside the
//!   networks the host's interfaces were on at start-up (the LAN neighbours); never to
//!   another session's veth, never over IPv6. Towards a session only replies pass.
//! * `prerouting`: a session's packets must carry its own source address (a reverse-path
//!   check), so a session cannot have replies sent to another one.
//! * `postrouting`: the sessions' addresses are masqueraded behind the host's.
//!
//! Addresses come from a `/16` of `10.213.0.0`–`10.228.255.255`, claimed per server with a
//! host-wide lock file (as session uids are) and skipped when a host interface already uses
//! it: two servers, or a server and the LAN, never hand out the same address.
//!
//! Host-wide effects, on purpose: IPv4 forwarding (`net.ipv4.ip_forward`) is turned on when it
//! is off, and left on at shutdown: another server, or other software that started since,
//! may rely on it. With forwarding on, the host routes between all its interfaces; a host
//! that must not should drop forwarded traffic in its own firewall (a drop in another table
//! also applies to sessions, like Docker's `FORWARD` policy, and then blocks their egress).
//!
//! Netlink is spoken with `netlink-packet-route` and `netlink-sys` (the crates under
//! `rtnetlink`) over blocking sockets: a handful of requests per session, half of them from
//! inside the session's namespace, are simpler without `rtnetlink`'s connection tasks, and
//! much faster than running `ip` (tens of ms per command).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use sandpool_sandbox::netns::NetNamespace;

/// The name of the veth end inside every session's namespace (each namespace has its own).
pub const SESSION_INTERFACE: &str = "eth0";
/// The first of the `/16` address blocks servers claim, and how many there are.
const FIRST_BLOCK: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 0);
const BLOCKS: u32 = 16;
/// Sessions per block: one `/31` each.
const SLOTS_PER_BLOCK: u32 = 1 << 15;
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Destinations no session may reach, besides the host's own networks: every IPv4 range the
/// IANA special-purpose registry marks as not globally reachable, except the documentation
/// ranges (never routed anywhere, so harmless, and handy as "public" addresses in tests).
const UNREACHABLE_IPV4: [(Ipv4Addr, u8); 11] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),      // "this network"
    (Ipv4Addr::new(10, 0, 0, 0), 8),     // private; the sessions' own addresses too
    (Ipv4Addr::new(100, 64, 0, 0), 10),  // shared address space (carrier-grade NAT)
    (Ipv4Addr::new(127, 0, 0, 0), 8),    // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local: cloud metadata services live here
    (Ipv4Addr::new(172, 16, 0, 0), 12),  // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),   // IETF protocol assignments
    (Ipv4Addr::new(192, 168, 0, 0), 16), // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),  // benchmarking
    (Ipv4Addr::new(224, 0, 0, 0), 4),    // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),    // reserved, and the limited broadcast address
];

/// The server's side of egress: its nftables table, its address block, and the veths it
/// made. One per server, shared by every egress-enabled pool.
pub struct EgressNetwork {
    table: String,
    interface_prefix: String,
    block: Ipv4Net,
    slots: Mutex<SlotAllocator>,
    torn_down: AtomicBool,
    /// Held for the server's life, so no other server takes the same block.
    _block_lock: nix::fcntl::Flock<File>,
}

impl EgressNetwork {
    /// Removes what a previous run of `instance` left (its table, its veths), claims an
    /// address block (lock files in `lock_dir`, host-wide), writes the nftables table and
    /// turns IPv4 forwarding on. Needs root and the `nft` program.
    pub fn setup(instance: &str, lock_dir: &Path) -> Result<EgressNetwork, String> {
        let valid_name = instance.starts_with(|c: char| c.is_ascii_alphabetic())
            && instance.len() <= 64
            && instance.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(format!("the instance name {instance:?} cannot name an nftables table"));
        }
        let interface_prefix = interface_prefix(instance);
        let leftovers = delete_links_named(&interface_prefix).map_err(|e| format!("cannot remove the veths of a previous run: {e}"))?;
        if leftovers > 0 {
            tracing::info!(count = leftovers, "removed the veths a previous run left");
        }
        let host_networks = host_networks(&interface_prefix)?;
        let (block, block_lock) = claim_block(lock_dir, &host_networks)?;
        let mut unreachable: Vec<Ipv4Net> = UNREACHABLE_IPV4.iter().map(|&(address, len)| Ipv4Net::new(address, len)).collect();
        unreachable.extend(host_networks);
        // Forwarding first: should it fail, no table is left behind.
        if enable_ipv4_forwarding()? {
            tracing::info!("IPv4 forwarding was off; turned it on for egress-enabled sessions (it stays on after shutdown)");
        }
        run_nft(&ruleset(instance, &interface_prefix, block, &unreachable))?;
        tracing::info!(table = instance, %block, interfaces = %format!("{interface_prefix}*"), "egress network ready");
        Ok(EgressNetwork {
            table: instance.to_owned(),
            interface_prefix,
            block,
            slots: Mutex::new(SlotAllocator::new(SLOTS_PER_BLOCK)),
            torn_down: AtomicBool::new(false),
            _block_lock: block_lock,
        })
    }

    /// Gives the session behind `netns` a veth, its addresses and a default route. The
    /// rules already apply to it (they match the interface name prefix and the block).
    pub fn attach(self: &Arc<Self>, netns: &NetNamespace, session_id: &str) -> Result<EgressAttachment, String> {
        let started = Instant::now();
        let slot = self.slots.lock().expect("slots lock").allocate().ok_or_else(|| {
            format!("all {SLOTS_PER_BLOCK} egress addresses of {} are in use; no more egress-enabled sessions fit", self.block)
        })?;
        let link = SessionLink::new(&self.interface_prefix, self.block, slot);
        if let Err(err) = create_session_link(netns, &link) {
            // Whatever part exists goes; the slot is reused only once the veth is gone.
            match delete_link(&link.host_interface) {
                Ok(()) => self.slots.lock().expect("slots lock").release(slot),
                Err(delete_err) => tracing::warn!(interface = %link.host_interface, "cannot remove a half-made veth: {delete_err}"),
            }
            return Err(format!("cannot give the session its egress interface {}: {err}", link.host_interface));
        }
        tracing::debug!(
            session = session_id,
            interface = %link.host_interface,
            address = %link.session_address,
            elapsed_us = started.elapsed().as_micros() as u64,
            "egress interface attached"
        );
        Ok(EgressAttachment { network: self.clone(), slot, link })
    }

    /// Removes the table and every veth of this server. Idempotent; also done on drop.
    /// Call it after every session is gone, or their egress stops with it.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(err) = run_nft(&format!("table inet {0} {{}}\ndelete table inet {0}\n", self.table)) {
            tracing::warn!(table = %self.table, "cannot remove the egress nftables table: {err}");
        }
        match delete_links_named(&self.interface_prefix) {
            Ok(0) => {}
            Ok(count) => tracing::warn!(count, "removed veths that outlived their sessions"),
            Err(err) => tracing::warn!("cannot remove the sessions' veths: {err}"),
        }
    }

    /// The nftables table (`inet` family) holding the rules.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// What every host-side veth name of this server starts with.
    pub fn interface_prefix(&self) -> &str {
        &self.interface_prefix
    }
}

impl Drop for EgressNetwork {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl fmt::Debug for EgressNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressNetwork")
            .field("table", &self.table)
            .field("interface_prefix", &self.interface_prefix)
            .field("block", &self.block.to_string())
            .finish_non_exhaustive()
    }
}

/// One session's veth. Dropping it deletes the veth (the peer in the session's namespace
/// goes with it) and frees its addresses.
pub struct EgressAttachment {
    network: Arc<EgressNetwork>,
    slot: u32,
    link: SessionLink,
}

impl EgressAttachment {
    /// The session's address (masqueraded on the way out).
    pub fn session_address(&self) -> Ipv4Addr {
        self.link.session_address
    }

    /// The host end's address: the session's default gateway, unreachable as a destination.
    pub fn gateway(&self) -> Ipv4Addr {
        self.link.gateway
    }

    pub fn host_interface(&self) -> &str {
        &self.link.host_interface
    }
}

impl Drop for EgressAttachment {
    fn drop(&mut self) {
        match delete_link(&self.link.host_interface) {
            Ok(()) => self.network.slots.lock().expect("slots lock").release(self.slot),
            // Keeping the slot out of use is safer than handing its addresses out twice.
            Err(err) => tracing::warn!(interface = %self.link.host_interface, "cannot delete a session's veth: {err}"),
        }
    }
}

impl fmt::Debug for EgressAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressAttachment")
            .field("host_interface", &self.link.host_interface)
            .field("session_address", &self.link.session_address)
            .finish_non_exhaustive()
    }
}

/// Names and addresses of one slot's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SessionLink {
    host_interface: String,
    gateway: Ipv4Addr,
    session_address: Ipv4Addr,
}

impl SessionLink {
    /// Slot `n` is the `/31` at `block + 2n`: the host end takes the even address.
    fn new(interface_prefix: &str, block: Ipv4Net, slot: u32) -> SessionLink {
        let gateway = u32::from(block.network) + 2 * slot;
        SessionLink {
            host_interface: format!("{interface_prefix}{slot}"),
            gateway: Ipv4Addr::from(gateway),
            session_address: Ipv4Addr::from(gateway + 1),
        }
    }
}

/// Hands out slots fresh first, then the oldest released, so a slot (and the name and
/// addresses that go with it) is reused as late as possible.
#[derive(Debug)]
struct SlotAllocator {
    count: u32,
    next_fresh: u32,
    released: VecDeque<u32>,
}

impl SlotAllocator {
    fn new(count: u32) -> SlotAllocator {
        SlotAllocator { count, next_fresh: 0, released: VecDeque::new() }
    }

    fn allocate(&mut self) -> Option<u32> {
        if self.next_fresh < self.count {
            self.next_fresh += 1;
            return Some(self.next_fresh - 1);
        }
        self.released.pop_front()
    }

    fn release(&mut self, slot: u32) {
        self.released.push_back(slot);
    }
}

/// An IPv4 network, its address masked to the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ipv4Net {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Net {
    fn new(address: Ipv4Addr, prefix_len: u8) -> Ipv4Net {
        let prefix_len = prefix_len.min(32);
        Ipv4Net { network: Ipv4Addr::from(u32::from(address) & mask(prefix_len)), prefix_len }
    }

    fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix_len) == u32::from(self.network)
    }

    fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0)
}

/// `sp` and six hex digits of a hash of the instance: short enough to leave room for a slot
/// number within the kernel's 15 characters, distinct enough between servers.
fn interface_prefix(instance: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(instance.as_bytes());
    format!("sp{}-", &hex::encode(&digest[..3]))
}

/// The nftables script that (re)creates the server's table in one transaction: the first
/// two lines make sure a table exists and delete it, so a previous run's rules go too.
fn ruleset(table: &str, interface_prefix: &str, sessions: Ipv4Net, unreachable: &[Ipv4Net]) -> String {
    let sessions_veth = format!("\"{interface_prefix}*\"");
    let elements = unreachable.iter().map(Ipv4Net::to_string).collect::<Vec<_>>().join(", ");
    format!(
        "table inet {table} {{}}
delete table inet {table}
table inet {table} {{
	set unreachable_ipv4 {{
		type ipv4_addr
		flags interval
		auto-merge
		elements = {{ {elements} }}
	}}
	chain prerouting {{
		type filter hook prerouting priority filter; policy accept;
		iifname {sessions_veth} fib saddr . iif oif missing drop
	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname {sessions_veth} drop
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		iifname {sessions_veth} jump from_session
		oifname {sessions_veth} jump to_session
	}}
	chain from_session {{
		oifname {sessions_veth} drop
		meta nfproto != ipv4 drop
		ip daddr @unreachable_ipv4 drop
		tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu
		accept
	}}
	chain to_session {{
		ct state established,related accept
		drop
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr {sessions} oifname != {sessions_veth} masquerade
	}}
}}
"
    )
}

fn run_nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft (egress-enabled pools need nftables installed): {e}"))?;
    let written = child.stdin.take().expect("piped stdin").write_all(script.as_bytes());
    let output = child.wait_with_output().map_err(|e| format!("nft failed: {e}"))?;
    if !output.status.success() {
        return Err(format!("nft refused the rules ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim()));
    }
    written.map_err(|e| format!("cannot write the rules to nft: {e}"))
}

/// Turns IPv4 forwarding on; `true` when it was off.
fn enable_ipv4_forwarding() -> Result<bool, String> {
    let current = std::fs::read_to_string(IP_FORWARD).map_err(|e| format!("cannot read {IP_FORWARD}: {e}"))?;
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(IP_FORWARD, "1").map_err(|e| format!("cannot turn IPv4 forwarding on ({IP_FORWARD}): {e}"))?;
    Ok(true)
}

/// The IPv4 networks of the host's interfaces (but ours): its LAN neighbours are not "the
/// outside world". A prefix shorter than /8 counts as the address alone.
fn host_networks(interface_prefix: &str) -> Result<Vec<Ipv4Net>, String> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list the host's addresses: {e}"))?;
    let mut networks = Vec::new();
    for entry in addresses.filter(|entry| !entry.interface_name.starts_with(interface_prefix)) {
        let Some(address) = entry.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip()) else { continue };
        let prefix_len = entry.netmask.as_ref().and_then(|m| m.as_sockaddr_in()).map_or(32, |m| u32::from(m.ip()).leading_ones() as u8);
        networks.push(Ipv4Net::new(address, if prefix_len < 8 { 32 } else { prefix_len }));
    }
    Ok(networks)
}

/// The first `/16` block no other server holds and no host network overlaps.
fn claim_block(lock_dir: &Path, host_networks: &[Ipv4Net]) -> Result<(Ipv4Net, nix::fcntl::Flock<File>), String> {
    std::fs::create_dir_all(lock_dir).map_err(|e| format!("cannot create {}: {e}", lock_dir.display()))?;
    for index in 0..BLOCKS {
        let block = Ipv4Net::new(Ipv4Addr::from(u32::from(FIRST_BLOCK) + (index << 16)), 16);
        if host_networks.iter().any(|network| network.overlaps(&block)) {
            continue;
        }
        let path = lock_dir.join(format!("egress-block-{index}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok((block, lock)),
            Err((_, nix::Error::EWOULDBLOCK)) => continue,
            Err((_, err)) => return Err(format!("cannot lock {}: {err}", path.display())),
        }
    }
    Err(format!("no free egress address block: all {BLOCKS} /16 blocks from {FIRST_BLOCK} are used by other servers or host networks"))
}

/// Creates the veth (host end in this thread's namespace, peer inside `netns`, both up) and
/// gives each end its address, and the session its default route.
fn create_session_link(netns: &NetNamespace, link: &SessionLink) -> std::io::Result<()> {
    let mut host = RouteSocket::open()?;
    // The peer comes up later, from inside: the kernel configures it before the pair is
    // complete, and bringing it up then fails with ENOTCONN.
    let mut peer = LinkMessage::default();
    peer.attributes.push(LinkAttribute::IfName(SESSION_INTERFACE.into()));
    peer.attributes.push(LinkAttribute::NetNsFd(netns.as_fd().as_raw_fd()));
    let mut veth = LinkMessage::default();
    veth.header.flags = LinkFlags::Up;
    veth.header.change_mask = LinkFlags::Up;
    veth.attributes.push(LinkAttribute::IfName(link.host_interface.clone()));
    veth.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer)))]));
    host.execute(RouteNetlinkMessage::NewLink(veth), NLM_F_CREATE | NLM_F_EXCL)?;
    let host_index = nix::net::if_::if_nametoindex(link.host_interface.as_str())?;
    host.execute(RouteNetlinkMessage::NewAddress(address_message(host_index, link.gateway)), NLM_F_CREATE | NLM_F_EXCL)?;

    let (session_address, gateway) = (link.session_address, link.gateway);
    netns.run_inside(move || {
        let mut session = RouteSocket::open()?;
        let index = nix::net::if_::if_nametoindex(SESSION_INTERFACE)?;
        session.execute(RouteNetlinkMessage::SetLink(link_up(index)), 0)?;
        session.execute(RouteNetlinkMessage::NewAddress(address_message(index, session_address)), NLM_F_CREATE | NLM_F_EXCL)?;
        session.execute(RouteNetlinkMessage::NewRoute(default_route(index, gateway)), NLM_F_CREATE | NLM_F_EXCL)
    })
}

/// `ip link set <index> up`.
fn link_up(index: u32) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.header.flags = LinkFlags::Up;
    message.header.change_mask = LinkFlags::Up;
    message
}

/// `address/31` on interface `index`.
fn address_message(index: u32, address: Ipv4Addr) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = 31;
    message.header.index = index;
    message.attributes.push(AddressAttribute::Local(address.into()));
    message.attributes.push(AddressAttribute::Address(address.into()));
    message
}

/// `default via gateway dev index`.
fn default_route(index: u32, gateway: Ipv4Addr) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = AddressFamily::Inet;
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.protocol = RouteProtocol::Static;
    message.header.scope = RouteScope::Universe;
    message.header.kind = RouteType::Unicast;
    message.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    message.attributes.push(RouteAttribute::Oif(index));
    message
}

/// Deletes a link of this thread's namespace by name; one that is already gone is fine.
fn delete_link(name: &str) -> std::io::Result<()> {
    let mut message = LinkMessage::default();
    message.attributes.push(LinkAttribute::IfName(name.into()));
    match RouteSocket::open()?.execute(RouteNetlinkMessage::DelLink(message), 0) {
        Err(err) if err.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Deletes every link whose name starts with `prefix`; returns how many there were.
fn delete_links_named(prefix: &str) -> std::io::Result<usize> {
    let names = RouteSocket::open()?.link_names()?;
    let ours: Vec<&String> = names.iter().filter(|name| name.starts_with(prefix)).collect();
    for name in &ours {
        delete_link(name)?;
    }
    Ok(ours.len())
}

/// A blocking `NETLINK_ROUTE` socket of the namespace it was opened in.
struct RouteSocket {
    socket: Socket,
    sequence: u32,
}

impl RouteSocket {
    fn open() -> std::io::Result<RouteSocket> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(RouteSocket { socket, sequence: 0 })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> std::io::Result<u32> {
        self.sequence += 1;
        let mut packet = NetlinkMessage::from(message);
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        Ok(self.sequence)
    }

    /// Sends a request and waits for the kernel's acknowledgement (or its error).
    fn execute(&mut self, message: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
        let sequence = self.send(message, flags | NLM_F_ACK)?;
        loop {
            for (header_sequence, payload) in self.receive()? {
                match payload {
                    Some(NetlinkPayload::Error(error)) if header_sequence == sequence => {
                        return match error.code {
                            None => Ok(()),
                            Some(_) => Err(error.to_io()),
                        };
                    }
                    _ => continue,
                }
            }
        }
    }

    /// The names of every link of the socket's namespace.
    fn link_names(&mut self) -> std::io::Result<Vec<String>> {
        let sequence = self.send(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        let mut names = Vec::new();
        loop {
            for (header_sequence, payload) in self.receive()? {
                if header_sequence != sequence {
                    continue;
                }
                match payload {
                    Some(NetlinkPayload::Done(_)) => return Ok(names),
                    Some(NetlinkPayload::Error(error)) if error.code.is_some() => return Err(error.to_io()),
                    Some(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))) => {
                        names.extend(link.attributes.into_iter().find_map(|attribute| match attribute {
                            LinkAttribute::IfName(name) => Some(name),
                            _ => None,
                        }));
                    }
                    _ => {}
                }
            }
        }
    }

    /// One datagram's messages, as (sequence number, payload); a payload this crate cannot
    /// parse is `None` (its sequence number still counts, for `Done`).
    fn receive(&mut self) -> std::io::Result<Vec<(u32, Option<NetlinkPayload<RouteNetlinkMessage>>)>> {
        let (bytes, _) = self.socket.recv_from_full()?;
        let mut messages = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let Ok(buffer) = NetlinkBuffer::new_checked(&bytes[offset..]) else { break };
            let length = buffer.length() as usize;
            let sequence = buffer.sequence_number();
            let message_type = buffer.message_type();
            if length == 0 {
                break;
            }
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..offset + length]).ok().map(|m| m.payload);
            // NLMSG_DONE must end a dump even if its body does not parse.
            let payload = match (parsed, message_type) {
                (None, netlink_packet_core::NLMSG_DONE) => Some(NetlinkPayload::Done(Default::default())),
                (parsed, _) => parsed,
            };
            messages.push((sequence, payload));
            // Messages are aligned to 4 bytes.
            offset += (length + 3) & !3;
        }
        Ok(messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn net(text: &str) -> Ipv4Net {
        let (address, len) = text.split_once('/').unwrap();
        Ipv4Net::new(address.parse().unwrap(), len.parse().unwrap())
    }

    #[test]
    fn networks_mask_their_address_and_know_what_they_contain() {
        assert_eq!(net("192.168.1.77/24").to_string(), "192.168.1.0/24");
        assert_eq!(net("10.1.2.3/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("10.1.2.3/32").to_string(), "10.1.2.3/32");
        assert!(net("10.0.0.0/8").contains("10.213.4.5".parse().unwrap()));
        assert!(!net("10.213.0.0/16").contains("10.214.0.0".parse().unwrap()));
        assert!(net("10.0.0.0/8").overlaps(&net("10.213.0.0/16")));
        assert!(net("10.213.7.0/24").overlaps(&net("10.213.0.0/16")));
        assert!(!net("192.0.2.0/24").overlaps(&net("10.213.0.0/16")));
    }

    #[test]
    fn each_slot_is_a_31_with_the_host_on_the_even_address() {
        let block = net("10.213.0.0/16");
        let first = SessionLink::new("sp0a1b2c-", block, 0);
        assert_eq!((first.gateway, first.session_address), ("10.213.0.0".parse().unwrap(), "10.213.0.1".parse().unwrap()));
        let last = SessionLink::new("sp0a1b2c-", block, SLOTS_PER_BLOCK - 1);
        assert_eq!((last.gateway, last.session_address), ("10.213.255.254".parse().unwrap(), "10.213.255.255".parse().unwrap()));
        assert_eq!(last.host_interface, "sp0a1b2c-32767");
        assert!(last.host_interface.len() <= 15, "the kernel allows 15 characters");
    }

    #[test]
    fn interface_prefixes_are_short_and_differ_between_instances() {
        let one = interface_prefix("sandpool-1a2b3c4d");
        assert_eq!(one.len(), 9);
        assert!(one.starts_with("sp") && one.ends_with('-'));
        assert_ne!(one, interface_prefix("sandpool-1a2b3c4e"));
    }

    #[test]
    fn slots_are_reused_only_after_every_fresh_one_and_oldest_first() {
        let mut slots = SlotAllocator::new(3);
        assert_eq!((slots.allocate(), slots.allocate()), (Some(0), Some(1)));
        slots.release(1);
        slots.release(0);
        assert_eq!(slots.allocate(), Some(2));
        assert_eq!((slots.allocate(), slots.allocate(), slots.allocate()), (Some(1), Some(0), None));
    }

    #[test]
    fn the_ruleset_confines_sessions_by_interface_and_address() {
        let unreachable = [net("10.0.0.0/8"), net("192.0.2.0/24")];
        let text = ruleset("sandpool-1a2b3c4d", "sp0a1b2c-", net("10.213.0.0/16"), &unreachable);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        // Replaces a previous run's table in the same transaction.
        assert_eq!(
            &lines[..3],
            ["table inet sandpool-1a2b3c4d {}", "delete table inet sandpool-1a2b3c4d", "table inet sandpool-1a2b3c4d {"]
        );
        for expected in [
            "elements = { 10.0.0.0/8, 192.0.2.0/24 }",
            "iifname \"sp0a1b2c-*\" fib saddr . iif oif missing drop",
            "iifname \"sp0a1b2c-*\" drop",
            "iifname \"sp0a1b2c-*\" jump from_session",
            "oifname \"sp0a1b2c-*\" jump to_session",
            "oifname \"sp0a1b2c-*\" drop",
            "meta nfproto != ipv4 drop",
            "ip daddr @unreachable_ipv4 drop",
            "ct state established,related accept",
            "ip saddr 10.213.0.0/16 oifname != \"sp0a1b2c-*\" masquerade",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        // Session traffic is accepted only after every drop.
        let accept = lines.iter().position(|l| *l == "accept").unwrap();
        let last_drop = lines.iter().position(|l| *l == "ip daddr @unreachable_ipv4 drop").unwrap();
        assert!(last_drop < accept);
    }

    #[test]
    fn the_special_purpose_ranges_cover_private_link_local_and_loopback() {
        let ranges: Vec<Ipv4Net> = UNREACHABLE_IPV4.iter().map(|&(a, l)| Ipv4Net::new(a, l)).collect();
        for address in [
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(ranges.iter().any(|r| r.contains(address.parse().unwrap())), "{address} must be unreachable");
        }
        for address in ["1.1.1.1", "8.8.8.8", "203.0.113.10", "172.32.0.1", "100.128.0.1"] {
            assert!(!ranges.iter().any(|r| r.contains(address.parse().unwrap())), "{address} must stay reachable");
        }
    }

    fn skip_unless_root() -> bool {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return true;
        }
        false
    }

    #[test]
    fn nft_accepts_the_ruleset() {
        if skip_unless_root() {
            return;
        }
        let unreachable: Vec<Ipv4Net> = UNREACHABLE_IPV4.iter().map(|&(a, l)| Ipv4Net::new(a, l)).chain([net("192.168.1.0/24")]).collect();
        let text = ruleset("sandpool-check", "sp000000-", net("10.213.0.0/16"), &unreachable);
        let mut child = Command::new("nft").args(["-c", "-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }

    /// Real veths and rules: the session gets its address and route, cannot reach a server
    /// on the host's `0.0.0.0` through its gateway, and everything goes on detach/teardown.
    #[test]
    fn sessions_get_a_veth_that_cannot_reach_the_host_and_that_goes_away() {
        if skip_unless_root() {
            return;
        }
        let instance = format!("sandpool-egress-test-{}", std::process::id());
        let network = Arc::new(EgressNetwork::setup(&instance, Path::new("/run/sandpool")).unwrap());
        let host_server = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = host_server.local_addr().unwrap().port();

        let mut timings = Vec::new();
        let mut sessions = Vec::new();
        for n in 0..5 {
            let netns = NetNamespace::create().unwrap();
            let started = Instant::now();
            let attachment = network.attach(&netns, &format!("session-{n}")).unwrap();
            timings.push(started.elapsed());
            sessions.push((netns, attachment));
        }
        eprintln!("attach times: {timings:?}");
        let (netns, attachment) = &sessions[0];
        assert!(link_exists(attachment.host_interface()));
        let routes = netns.run_inside(|| std::fs::read_to_string("/proc/net/route")).unwrap();
        assert!(routes.lines().any(|l| l.starts_with("eth0\t00000000\t")), "no default route via eth0:\n{routes}");

        // Timeouts, not "unreachable": the packets are routed, then dropped.
        let gateway = std::net::SocketAddr::from((attachment.gateway(), port));
        let err =
            netns.connect(gateway, Duration::from_millis(500)).expect_err("the host's 0.0.0.0 server was reachable through the gateway");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        let other_session = std::net::SocketAddr::from((sessions[1].1.session_address(), port));
        let err = netns.connect(other_session, Duration::from_millis(300)).expect_err("another session was reachable");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

        let names: Vec<String> = sessions.iter().map(|(_, a)| a.host_interface().to_owned()).collect();
        let started = Instant::now();
        drop(sessions);
        eprintln!("5 detaches took {:?}", started.elapsed());
        assert!(names.iter().all(|name| !link_exists(name)));
        let prefix = network.interface_prefix().to_owned();
        drop(network);
        let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&tables.stdout).contains(&instance), "the table outlived teardown");
        assert!(!RouteSocket::open().unwrap().link_names().unwrap().iter().any(|n| n.starts_with(&prefix)));
    }

    fn link_exists(name: &str) -> bool {
        nix::net::if_::if_nametoindex(name).is_ok()
    }
}
