//! The OCI runtime spec (`config.json`) of one session's bundle.
//!
//! Written as JSON and checked by parsing it into `oci_spec`'s typed `Spec`, so a field the
//! runtimes would ignore or reject is caught here. The hardening is the same for both
//! runtimes: its own PID, IPC, UTS, mount and network namespaces; a reduced capability set;
//! `no_new_privs`; masked and read-only kernel paths; a seccomp filter denying the calls a
//! web app never needs (namespace and mount calls, ptrace, bpf, io_uring, kernel modules,
//! keyrings, ...); and cgroup limits on memory, CPU and processes.

use std::path::Path;

use serde_json::{json, Value};

/// What one session's container runs and may use.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// argv: the pool's command and args, or the image's entrypoint and cmd.
    pub args: Vec<String>,
    /// `NAME=value` pairs, image first, then the pool's (which win).
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub memory_bytes: u64,
    /// CPU cores (fractions allowed).
    pub cpus: f64,
    pub max_processes: u64,
    pub max_open_files: u64,
    /// The network namespace to join (see `netns`).
    pub netns_path: String,
    /// `/`-rooted cgroup path for the runtime to create.
    pub cgroups_path: String,
    /// Filter `clone` by namespace flags (and turn `clone3` into ENOSYS so libc falls back
    /// to `clone`). Off under gVisor: its 2022 seccomp emulation returns EPERM for the
    /// `clone3` rule (so threads cannot start) and mis-evaluates masked comparisons, while
    /// its Sentry refuses namespace creation to the container by itself.
    pub filter_clone_flags: bool,
    /// Run in a user namespace mapping container ids `0..65536` to host ids from this one
    /// (the image must be unpacked with its owners shifted the same way).
    pub user_namespace: Option<u32>,
    /// The root filesystem: `bundle/rootfs` (an image's overlay, writable) or a directory
    /// shared read-only by a pool's sessions (Python pools under gVisor).
    pub root: RootFs,
    /// Mounts after the standard ones (`/proc`, `/dev`, `/sys`, ...).
    pub extra_mounts: Vec<Mount>,
    /// Keep [`CAPABILITIES`] (images expect root to be able to chown, drop privileges, ...);
    /// off, the process has none.
    pub capabilities: bool,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFs {
    /// `rootfs` in the bundle, writable.
    Bundle,
    /// A directory outside the bundle, mounted read-only.
    SharedReadOnly(std::path::PathBuf),
}

/// One extra mount of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A host file or directory (recursively, `nosuid`/`nodev`).
    Bind { source: std::path::PathBuf, destination: String, writable: bool },
    /// A fresh tmpfs of `bytes`, world-writable with the sticky bit (like `/tmp`).
    Tmpfs { destination: String, bytes: u64 },
}

impl Mount {
    fn to_json(&self) -> Value {
        match self {
            Mount::Bind { source, destination, writable } => json!({
                "destination": destination, "type": "bind", "source": source,
                "options": ["rbind", "nosuid", "nodev", if *writable { "rw" } else { "ro" }],
            }),
            Mount::Tmpfs { destination, bytes } => json!({
                "destination": destination, "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", format!("size={bytes}")],
            }),
        }
    }
}

/// Ids a container's user namespace maps.
pub const USER_NAMESPACE_IDS: u32 = 65_536;

/// Capabilities a container keeps: Docker's default set without the raw-network, device,
/// audit and chroot ones. Root in the container can still own and chmod its files and drop
/// to another user, which ordinary images expect.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
];

/// System calls refused with EPERM: what lets code leave or attack its sandbox, and that a
/// service in a container does not need.
const DENIED_SYSCALLS: &[&str] = &[
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "userfaultfd",
    "personality",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "fsopen",
    "fsmount",
    "fsconfig",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "quotactl",
    "lookup_dcookie",
    "vhangup",
];

/// The namespace flags of `clone` (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID,
/// NEWNET): a process may not create namespaces with it either.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [0x0002_0000, 0x0200_0000, 0x0400_0000, 0x0800_0000, 0x1000_0000, 0x2000_0000, 0x4000_0000];

impl ContainerSpec {
    /// The bundle's `config.json` for a root filesystem at `bundle/rootfs`.
    pub fn to_json(&self) -> Value {
        let mut value = self.base_json();
        if let Some(host_id) = self.user_namespace {
            let mapping = json!([{ "containerID": 0, "hostID": host_id, "size": USER_NAMESPACE_IDS }]);
            let linux = value["linux"].as_object_mut().expect("linux is an object");
            linux["namespaces"].as_array_mut().expect("namespaces is an array").push(json!({ "type": "user" }));
            linux.insert("uidMappings".into(), mapping.clone());
            linux.insert("gidMappings".into(), mapping);
        }
        value
    }

    fn base_json(&self) -> Value {
        let cpu_period: u64 = 100_000;
        let cpu_quota = (self.cpus * cpu_period as f64).round().max(1000.0) as i64;
        let capabilities: &[&str] = if self.capabilities { CAPABILITIES } else { &[] };
        let root = match &self.root {
            RootFs::Bundle => json!({ "path": "rootfs", "readonly": false }),
            RootFs::SharedReadOnly(path) => json!({ "path": path, "readonly": true }),
        };
        let mut value = json!({
            "ociVersion": "1.0.2-dev",
            "process": {
                "terminal": false,
                "user": { "uid": self.uid, "gid": self.gid },
                "args": self.args,
                "env": self.env,
                "cwd": self.cwd,
                "noNewPrivileges": true,
                "capabilities": {
                    "bounding": capabilities,
                    "effective": capabilities,
                    "permitted": capabilities,
                },
                "rlimits": [
                    { "type": "RLIMIT_NOFILE", "hard": self.max_open_files, "soft": self.max_open_files },
                    { "type": "RLIMIT_CORE", "hard": 0, "soft": 0 },
                ],
            },
            "root": root,
            "hostname": self.hostname,
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
                { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
                { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
                { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
                { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
                { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
            ],
            "linux": {
                "namespaces": [
                    { "type": "pid" },
                    { "type": "ipc" },
                    { "type": "uts" },
                    { "type": "mount" },
                    { "type": "network", "path": self.netns_path },
                ],
                "cgroupsPath": self.cgroups_path,
                "resources": {
                    "devices": [{ "allow": false, "access": "rwm" }],
                    "memory": { "limit": self.memory_bytes, "swap": self.memory_bytes },
                    "cpu": { "quota": cpu_quota, "period": cpu_period },
                    "pids": { "limit": self.max_processes },
                },
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
                ],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                "seccomp": seccomp(self.filter_clone_flags),
            },
        });
        let mounts = value["mounts"].as_array_mut().expect("mounts is an array");
        mounts.extend(self.extra_mounts.iter().map(Mount::to_json));
        value
    }

    /// Writes `config.json` into `bundle`, after checking it parses as an OCI runtime spec.
    pub fn write(&self, bundle: &Path) -> Result<(), String> {
        let value = self.to_json();
        let _: oci_spec::runtime::Spec =
            serde_json::from_value(value.clone()).map_err(|e| format!("internal error: invalid OCI runtime spec: {e}"))?;
        let text = serde_json::to_vec_pretty(&value).expect("JSON serialises");
        std::fs::write(bundle.join("config.json"), text).map_err(|e| format!("cannot write the bundle's config.json: {e}"))
    }
}

fn seccomp(filter_clone_flags: bool) -> Value {
    let eperm = libc::EPERM as u32;
    let mut rules = vec![json!({ "names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": eperm })];
    if filter_clone_flags {
        // clone3 passes its flags in memory, where a filter cannot see them: ENOSYS makes
        // libc fall back to clone, whose flags are checked below.
        rules.push(json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS as u32 }));
        // One rule per flag: MASKED_EQ tests `(flags & flag) == flag`, so any one set is
        // denied while ordinary fork and thread creation pass.
        for flag in CLONE_NAMESPACE_FLAGS {
            rules.push(json!({
                "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": eperm,
                "args": [{ "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" }],
            }));
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ContainerSpec {
        ContainerSpec {
            args: vec!["/app/server".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            hostname: "session".into(),
            memory_bytes: 512 << 20,
            cpus: 0.5,
            max_processes: 128,
            max_open_files: 1024,
            netns_path: "/proc/1/fd/3".into(),
            cgroups_path: "/sandpool/x".into(),
            filter_clone_flags: true,
            user_namespace: None,
            root: RootFs::Bundle,
            extra_mounts: Vec::new(),
            capabilities: true,
        }
    }

    #[test]
    fn the_spec_parses_as_an_oci_runtime_spec_with_the_limits_applied() {
        let dir = tempfile::tempdir().unwrap();
        sample().write(dir.path()).unwrap();
        let spec = oci_spec::runtime::Spec::load(dir.path().join("config.json")).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let resources = linux.resources().as_ref().unwrap();
        assert_eq!(resources.memory().as_ref().unwrap().limit(), Some(512 << 20));
        assert_eq!(resources.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(resources.pids().as_ref().unwrap().limit(), 128);
        let namespaces = linux.namespaces().as_ref().unwrap();
        let network = namespaces.iter().find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network).unwrap();
        assert_eq!(network.path().as_deref(), Some(Path::new("/proc/1/fd/3")));
        assert!(namespaces.iter().all(|ns| ns.typ() != oci_spec::runtime::LinuxNamespaceType::User));
        // With a user namespace, container root is an unprivileged host id.
        let mapped = ContainerSpec { user_namespace: Some(300_000), ..sample() }.to_json();
        let mapped: oci_spec::runtime::Spec = serde_json::from_value(mapped).unwrap();
        let linux = mapped.linux().as_ref().unwrap();
        assert!(linux.namespaces().as_ref().unwrap().iter().any(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::User));
        let uid_map = &linux.uid_mappings().as_ref().unwrap()[0];
        assert_eq!((uid_map.container_id(), uid_map.host_id(), uid_map.size()), (0, 300_000, USER_NAMESPACE_IDS));
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
        // A shared read-only root with extra mounts, and no capabilities.
        let shared = ContainerSpec {
            root: RootFs::SharedReadOnly("/srv/root".into()),
            extra_mounts: vec![
                Mount::Bind { source: "/srv/data".into(), destination: "/mnt/data".into(), writable: true },
                Mount::Tmpfs { destination: "/tmp".into(), bytes: 1 << 20 },
            ],
            capabilities: false,
            ..sample()
        };
        let shared: oci_spec::runtime::Spec = serde_json::from_value(shared.to_json()).unwrap();
        let root = shared.root().as_ref().unwrap();
        assert_eq!((root.path().as_path(), root.readonly()), (Path::new("/srv/root"), Some(true)));
        let mounts = shared.mounts().as_ref().unwrap();
        let data = mounts.iter().find(|m| m.destination() == Path::new("/mnt/data")).unwrap();
        assert!(data.options().as_ref().unwrap().contains(&"rw".to_owned()));
        let tmp = mounts.iter().find(|m| m.destination() == Path::new("/tmp")).unwrap();
        assert!(tmp.options().as_ref().unwrap().contains(&"size=1048576".to_owned()));
        let caps = shared.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        assert!(caps.effective().as_ref().unwrap().is_empty());
        let bounding = process.capabilities().as_ref().unwrap().bounding().as_ref().unwrap();
        assert!(!bounding.contains(&oci_spec::runtime::Capability::SysAdmin));
        assert!(!bounding.contains(&oci_spec::runtime::Capability::NetRaw));
        let seccomp = linux.seccomp().as_ref().unwrap();
        let denied: Vec<&String> = seccomp.syscalls().as_ref().unwrap().iter().flat_map(|rule| rule.names().iter()).collect();
        for name in ["ptrace", "mount", "unshare", "setns", "bpf", "io_uring_setup", "kexec_load", "init_module", "userfaultfd", "keyctl"] {
            assert!(denied.iter().any(|d| *d == name), "{name} is not denied");
        }
    }
}
