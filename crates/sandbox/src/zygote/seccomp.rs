//! The seccomp filters every session runs under, compiled once in the zygote.
//!
//! A deny list, not an allow list: Python and the libraries users import make hundreds of
//! different system calls, and the calls that matter for escaping are few and well known.
//! Denied calls fail with `EPERM`, so code that merely probes (libraries checking for
//! features) keeps working. `clone3` fails with `ENOSYS` instead: its flags live in memory
//! where a filter cannot read them, and `ENOSYS` makes glibc fall back to `clone`, whose
//! namespace flags the filter does check.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

/// System calls a session may never make: tracing other processes, changing mounts or
/// namespaces, kernel keyrings, BPF, perf, io_uring, kexec and modules, userfaultfd, and the
/// host-wide administration calls (root-only anyway; denied so that no kernel bug behind
/// them is reachable).
const DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_userfaultfd,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_vhangup,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

/// Namespace flags that `clone` may not carry.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// `personality` values a session may set: querying (0xffffffff) and the default (0).
const PERSONALITY_QUERY: u64 = 0xffff_ffff;

#[derive(Debug, thiserror::Error)]
#[error("cannot build the seccomp filter: {0}")]
pub struct SeccompBuildError(String);

/// The compiled filters, applied in order.
pub struct SessionFilters {
    pub programs: Vec<BpfProgram>,
}

fn arch() -> Result<TargetArch, SeccompBuildError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SeccompBuildError(format!("unsupported architecture: {e:?}")))
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompBuildError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(|e| SeccompBuildError(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompBuildError> {
    SeccompRule::new(conditions).map_err(|e| SeccompBuildError(e.to_string()))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, SeccompBuildError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch()?)
        .map_err(|e| SeccompBuildError(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompBuildError(e.to_string()))
}

/// Builds the session filters. Called once, in the zygote; children only load them.
pub fn build() -> Result<SessionFilters, SeccompBuildError> {
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
    // clone with any namespace flag (the flags are the first argument on x86_64 and aarch64).
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| rule(vec![condition(0, SeccompCmpOp::MaskedEq(*flag), *flag)?]))
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    // personality changes other than a query or the default (they can disable ASLR).
    denied.insert(
        libc::SYS_personality,
        vec![rule(vec![condition(0, SeccompCmpOp::Ne, 0)?, condition(0, SeccompCmpOp::Ne, PERSONALITY_QUERY)?])?],
    );
    let deny = compile(denied, libc::EPERM)?;
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    let no_clone3 = compile(clone3, libc::ENOSYS)?;
    Ok(SessionFilters { programs: vec![no_clone3, deny] })
}

impl SessionFilters {
    /// Loads the filters into the calling process. `no_new_privs` must already be set.
    pub fn apply(&self) -> Result<(), std::io::Error> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_architecture() {
        let filters = build().unwrap();
        assert_eq!(filters.programs.len(), 2);
        assert!(filters.programs.iter().all(|p| !p.is_empty()));
    }
}
