//! Attacks a container's own code could try, for the isolation tests: each route makes one
//! system call (or exhausts one resource) and reports what the kernel answered. The tests
//! assert that every one is denied or contained.
#![allow(unsafe_code)]

use crate::json::Object;

/// Runs the attack named `what`; returns a JSON object with `what`, `ok` (the call
/// succeeded) and `errno` (the error number when it did not).
pub fn run(what: &str) -> Option<String> {
    let result: Result<i64, i32> = match what {
        // SAFETY: unshare takes no pointers.
        "unshare_user" => syscall_result(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as i64),
        // SAFETY: unshare takes no pointers.
        "unshare_net" => syscall_result(unsafe { libc::unshare(libc::CLONE_NEWNET) } as i64),
        "mount_tmpfs" => {
            let (source, target, kind) = (c"tmpfs", c"/tmp", c"tmpfs");
            // SAFETY: the strings are NUL-terminated literals; data may be null.
            syscall_result(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) } as i64)
        }
        // SAFETY: ptrace(PTRACE_ATTACH) on pid 1 takes no pointers.
        "ptrace_init" => syscall_result(unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) }),
        // SAFETY: a null attr pointer with size 0 only asks the kernel to fail or succeed.
        "bpf" => syscall_result(unsafe { libc::syscall(libc::SYS_bpf, 0, 0usize, 0) }),
        // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) takes no pointers.
        "keyctl" => syscall_result(unsafe { libc::syscall(libc::SYS_keyctl, 0, -3i64, 0) }),
        "io_uring" => {
            let mut params = [0u8; 120];
            // SAFETY: `params` is a zeroed io_uring_params-sized buffer that outlives the call.
            syscall_result(unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) })
        }
        // SAFETY: a null image with length 0 and empty params.
        "init_module" => syscall_result(unsafe { libc::syscall(libc::SYS_init_module, 0usize, 0usize, c"".as_ptr()) }),
        "clone_newpid" => {
            // SAFETY: fork-like clone without a new stack; the child exits at once.
            let pid = unsafe { libc::syscall(libc::SYS_clone, (libc::CLONE_NEWPID | libc::SIGCHLD) as i64, 0, 0, 0, 0) };
            if pid == 0 {
                // SAFETY: the child leaves immediately.
                unsafe { libc::_exit(0) };
            }
            if pid > 0 {
                // SAFETY: reaping our own child.
                unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
            }
            syscall_result(pid)
        }
        "fork_bomb" => return Some(fork_bomb()),
        "memory_bomb" => return Some(memory_bomb()),
        _ => return None,
    };
    let object = Object::new().str("what", what);
    Some(match result {
        Ok(_) => object.bool("ok", true).finish(),
        Err(errno) => object.bool("ok", false).num("errno", errno).finish(),
    })
}

fn syscall_result(ret: i64) -> Result<i64, i32> {
    if ret < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret)
    }
}

/// Starts threads that sleep until thread creation fails; reports how many started. The
/// pids limit must stop it long before the host notices.
fn fork_bomb() -> String {
    let mut started = 0u64;
    let mut error = String::new();
    while started < 100_000 {
        match std::thread::Builder::new().stack_size(64 * 1024).spawn(|| std::thread::sleep(std::time::Duration::from_secs(3600))) {
            Ok(_) => started += 1,
            Err(e) => {
                error = e.to_string();
                break;
            }
        }
    }
    Object::new().str("what", "fork_bomb").num("started", started).str("error", &error).finish()
}

/// Allocates and touches memory until the process is killed (it never returns when the
/// memory limit works; the cap keeps a broken limit from taking the host down).
fn memory_bomb() -> String {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..(8 << 10) {
        held.push(vec![1u8; 1 << 20]);
    }
    Object::new().str("what", "memory_bomb").num("allocated_mib", held.len() as u64).finish()
}
