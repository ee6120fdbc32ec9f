//! Keeps refilling off one CPU while sessions are executing code.
//!
//! Forking a session and setting up its namespaces are long stretches of kernel code that, on
//! a kernel without full preemption, no request can interrupt, even though the zygote runs
//! `SCHED_IDLE`. So while any session executes, every zygote may use every CPU but the first;
//! once nothing has executed for [`WIDEN_AFTER`], it may use every CPU again and the ready
//! queue refills at full speed while nobody waits. Sessions forked meanwhile inherit the
//! zygote's CPUs; a claimed session gets every CPU back (`driver`).

use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// How long the zygotes stay confined after the last execution ended.
pub const WIDEN_AFTER: Duration = Duration::from_millis(200);

/// A registered zygote; it stays registered while this lives.
#[derive(Debug)]
pub struct ZygoteHandle {
    pid: i32,
}

/// Marks one execution in progress; dropping it ends it.
#[must_use]
pub struct Executing(());

struct Gate {
    every_cpu: CpuSet,
    /// Every CPU but the first (the same as `every_cpu` on a one-CPU machine).
    refill_cpus: CpuSet,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    executing: usize,
    confined: bool,
    /// Bumped whenever an execution starts, so a pending widening knows it is stale.
    generation: u64,
    zygotes: Vec<Weak<ZygoteHandle>>,
}

static GATE: LazyLock<Gate> = LazyLock::new(|| {
    let every_cpu = sched_getaffinity(Pid::from_raw(0)).unwrap_or_else(|_| CpuSet::new());
    let mut refill_cpus = every_cpu;
    if let Some(first) = (0..CpuSet::count()).find(|&cpu| every_cpu.is_set(cpu).unwrap_or(false)) {
        let others = (first + 1..CpuSet::count()).any(|cpu| every_cpu.is_set(cpu).unwrap_or(false));
        if others {
            let _ = refill_cpus.unset(first);
        }
    }
    Gate { every_cpu, refill_cpus, state: Mutex::new(GateState::default()) }
});

/// The CPUs a claimed session may use: all of the server's.
pub fn every_cpu() -> CpuSet {
    GATE.every_cpu
}

/// Registers a zygote process; it is confined whenever sessions execute. `None` for a pid
/// that cannot be a zygote (0 would mean the calling thread to the kernel).
pub fn register(pid: i32) -> Option<Arc<ZygoteHandle>> {
    if pid <= 0 {
        return None;
    }
    let handle = Arc::new(ZygoteHandle { pid });
    let mut state = GATE.state.lock().expect("cpu gate lock");
    state.zygotes.retain(|zygote| zygote.strong_count() > 0);
    state.zygotes.push(Arc::downgrade(&handle));
    if state.confined {
        apply(&handle, &GATE.refill_cpus);
    }
    Some(handle)
}

/// Call when an execution starts; the returned guard ends it.
pub fn executing() -> Executing {
    let mut state = GATE.state.lock().expect("cpu gate lock");
    state.executing += 1;
    state.generation += 1;
    if !state.confined {
        state.confined = true;
        set_all(&state, &GATE.refill_cpus);
    }
    Executing(())
}

impl Drop for Executing {
    fn drop(&mut self) {
        let generation = {
            let mut state = GATE.state.lock().expect("cpu gate lock");
            state.executing -= 1;
            if state.executing > 0 {
                return;
            }
            state.generation
        };
        let widen = move || {
            let mut state = GATE.state.lock().expect("cpu gate lock");
            if state.executing == 0 && state.generation == generation && state.confined {
                state.confined = false;
                set_all(&state, &GATE.every_cpu);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(WIDEN_AFTER).await;
                    widen();
                });
            }
            Err(_) => widen(),
        }
    }
}

fn set_all(state: &GateState, cpus: &CpuSet) {
    for zygote in state.zygotes.iter().filter_map(Weak::upgrade) {
        apply(&zygote, cpus);
    }
}

fn apply(zygote: &ZygoteHandle, cpus: &CpuSet) {
    // The zygote is single-threaded, so its pid is its only thread. It may have just exited
    // (ESRCH); its handle then goes away with its link.
    if let Err(err) = sched_setaffinity(Pid::from_raw(zygote.pid), cpus) {
        if err != nix::Error::ESRCH {
            tracing::debug!(pid = zygote.pid, error = %err, "cannot set a zygote's CPUs");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(set: &CpuSet) -> Vec<usize> {
        (0..CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect()
    }

    #[test]
    fn a_zygote_leaves_the_first_cpu_while_sessions_execute_and_gets_it_back_after() {
        assert!(register(0).is_none(), "pid 0 would be the caller itself");
        let every = cpus(&every_cpu());
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let handle = register(child.id() as i32).unwrap();
        {
            let _busy = executing();
            let confined = cpus(&sched_getaffinity(pid).unwrap());
            if every.len() >= 2 {
                assert_eq!(confined, every[1..].to_vec());
            } else {
                assert_eq!(confined, every, "one CPU: nothing to keep free");
            }
        }
        // Outside a tokio runtime the zygote gets every CPU back at once.
        assert_eq!(cpus(&sched_getaffinity(pid).unwrap()), every);
        drop(handle);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
