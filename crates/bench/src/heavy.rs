//! The round shared by the two alternatives that cost a whole interpreter per session (Jupyter
//! Kernel Gateway and bubblewrap + python3): the same phases as sandpool's, on fewer sessions
//! because each costs ~70–120 MB, with memory measured on those sessions and extrapolated.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use crate::host::Cgroup;
use crate::results::{gib, mib, Round};
use crate::workload::{self, Cells, System};
use crate::Settings;

/// What the round needs from a heavy system besides the workload.
pub trait Heavy: System<Client = ()> {
    /// The cgroup every process of the system runs in.
    fn cgroup(&self) -> &Cgroup;

    /// The cgroup's memory use with no session at all (the gateway alone; 0 for bwrap).
    fn baseline(&self) -> u64;

    /// Starts `n` new sessions at once and returns when every one is ready (kept until the
    /// end of the round).
    fn burst(&self, n: usize) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Pre-started sessions this round needs: the one-client phase plus one per concurrent client.
pub fn prestart_count(settings: &Settings) -> usize {
    settings.heavy_first_1c + settings.clients
}

/// Every phase after the pre-start, on a system whose pre-started sessions are waiting.
pub async fn phases<S: Heavy>(sys: &Arc<S>, settings: &Settings, round: usize, cells: &Cells, result: &mut Round) -> anyhow::Result<()> {
    let quiet = || sys.cgroup().wait_quiet(0.05, Duration::from_secs(60));
    quiet().await;

    let (outcome, (_, mut sessions)) =
        workload::first_sequential(sys, settings.heavy_first_1c, &format!("r{round}-one"), &cells.first, false).await?;
    result.latencies("first_1c", &outcome);
    quiet().await;

    let (outcome, held) = workload::first_concurrent(sys, settings.clients, 1, &format!("r{round}-many"), &cells.first).await?;
    result.latencies("first_50c", &outcome);
    result.set("first_50c_clients", settings.clients as f64);
    result.set("first_50c_per_s", outcome.samples.len() as f64 / outcome.elapsed.as_secs_f64());
    quiet().await;

    if sessions.is_empty() {
        bail!("no session survived the first phase");
    }
    let mut unit = ();
    workload::repeat_sequential(sys, &mut unit, &mut sessions[0], 1, &cells.init).await;
    let outcome = workload::repeat_sequential(sys, &mut unit, &mut sessions[0], settings.repeat_1c, &cells.repeat).await;
    result.latencies("repeat_1c", &outcome);

    let pairs: Vec<((), S::Session)> = sessions.into_iter().chain(held.into_iter().flat_map(|(_, s)| s)).map(|s| ((), s)).collect();
    let (init, pairs) = workload::run_everywhere(sys, pairs, 8, &cells.init).await?;
    if init.errors > 0 {
        result.note(format!("{} sessions could not run `x = 0`: {:?}", init.errors, init.first_error));
    }
    quiet().await;
    let pairs = crate::sandpool::throughput(result, sys, pairs, settings, sys.cgroup(), cells).await?;

    // Density: every live session runs the numpy + pandas cell; growth over the system alone.
    let (outcome, pairs) = workload::run_everywhere(sys, pairs, 4, &cells.density).await?;
    if outcome.errors > 0 {
        result.note(format!("density cell failed in {} sessions: {:?}", outcome.errors, outcome.first_error));
    }
    quiet().await;
    let n = pairs.len();
    let memory = sys.cgroup().memory()?;
    let per = (memory.usage as f64 - sys.baseline() as f64) / n.max(1) as f64;
    result.set("density_n", n as f64);
    result.set("density_mib_per_session", mib(per));
    result.set("density_total_gib", gib(memory.usage as f64));
    result.set("density_baseline_mib", mib(sys.baseline() as f64));
    result.set("density_total_gib_per_1000", gib(sys.baseline() as f64 + per * 1000.0));

    // Refill: a burst of new sessions from nothing.
    let cpu0 = sys.cgroup().cpu_seconds();
    let start = std::time::Instant::now();
    sys.burst(settings.heavy_refill).await?;
    let took = start.elapsed().as_secs_f64();
    let cpu = sys.cgroup().cpu_seconds() - cpu0;
    result.set("refill_n", settings.heavy_refill as f64);
    result.set("refill_per_s", settings.heavy_refill as f64 / took);
    result.set("refill_seconds_to_full", took);
    result.set("refill_cpu_ms_per_session", cpu * 1000.0 / settings.heavy_refill as f64);
    quiet().await;

    // First execution with nothing pre-started.
    let (outcome, _held) = workload::first_sequential(sys, settings.heavy_cold, &format!("r{round}-cold"), &cells.first, true).await?;
    result.latencies("first_cold", &outcome);
    drop(pairs);
    Ok(())
}
