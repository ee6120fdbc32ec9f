//! The workload, the same for every system: first executions for never-seen identifiers (one
//! client, then many at once), repeat executions in live sessions (one client, then one client
//! per session for a fixed time), each timed from the client's side.
//!
//! A [`System`] says how a virtual client connects, how a session is allocated for a new
//! identifier (allocation and the first cell in one call, as a user sees it), and how a cell
//! runs in a live session.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::stats::Samples;

/// A cell of Python, with its sandpool request body encoded once.
pub struct Code {
    pub text: String,
    pub sandpool_body: Bytes,
}

impl Code {
    pub fn new(text: &str) -> Arc<Code> {
        let body = serde_json::to_vec(&serde_json::json!({ "code": text })).expect("serializes");
        Arc::new(Code { text: text.to_owned(), sandpool_body: Bytes::from(body) })
    }
}

/// The cells of the benchmark.
pub struct Cells {
    pub first: Arc<Code>,
    pub init: Arc<Code>,
    pub repeat: Arc<Code>,
    /// "One cell that touched numpy and pandas", for the density measurement.
    pub density: Arc<Code>,
    pub probe: Arc<Code>,
}

impl Cells {
    pub fn new() -> Cells {
        Cells {
            first: Code::new("print(1)"),
            init: Code::new("x = 0"),
            repeat: Code::new("x += 1"),
            density: Code::new(DENSITY_CELL),
            probe: Code::new("1"),
        }
    }
}

pub const DENSITY_CELL: &str = "import numpy as np\nimport pandas as pd\ndf = pd.DataFrame({'a': np.arange(1000), 'b': np.random.default_rng(1).random(1000)})\nsummary = df.describe()\nfloat(df['b'].mean())";

/// A system under test, seen from its clients.
pub trait System: Send + Sync + 'static {
    /// What one virtual client holds (a connection, or nothing).
    type Client: Send + 'static;
    /// A live session, as the client holds it.
    type Session: Send + 'static;

    fn client(&self) -> impl Future<Output = anyhow::Result<Self::Client>> + Send;

    /// Allocates a session for the never-seen identifier `id` and runs `code` in it. `cold`
    /// asks for an allocation without a pre-started instance.
    fn first(
        &self,
        client: &mut Self::Client,
        id: &str,
        code: &Code,
        cold: bool,
    ) -> impl Future<Output = anyhow::Result<Self::Session>> + Send;

    /// Runs `code` in a live session.
    fn exec(&self, client: &mut Self::Client, session: &mut Self::Session, code: &Code) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Latencies and failures of one phase.
#[derive(Debug, Default)]
pub struct Outcome {
    pub samples: Samples,
    pub errors: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    fn record_error(&mut self, err: anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{err:#}"));
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.samples.extend(other.samples);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// A client and the sessions it allocated.
pub type Held<S> = (<S as System>::Client, Vec<<S as System>::Session>);

/// `n` first executions, one after another, from one client.
pub async fn first_sequential<S: System>(
    sys: &Arc<S>,
    n: usize,
    prefix: &str,
    code: &Code,
    cold: bool,
) -> anyhow::Result<(Outcome, Held<S>)> {
    let mut client = sys.client().await?;
    let mut outcome = Outcome { samples: Samples::with_capacity(n), ..Outcome::default() };
    let mut sessions = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let id = format!("{prefix}-{i:05}");
        let t = Instant::now();
        match sys.first(&mut client, &id, code, cold).await {
            Ok(session) => {
                outcome.samples.push(t.elapsed());
                sessions.push(session);
            }
            Err(err) => outcome.record_error(err),
        }
    }
    outcome.elapsed = start.elapsed();
    Ok((outcome, (client, sessions)))
}

/// `clients` clients at once, each making `per_client` first executions one after another.
/// Clients connect before the clock starts.
pub async fn first_concurrent<S: System>(
    sys: &Arc<S>,
    clients: usize,
    per_client: usize,
    prefix: &str,
    code: &Arc<Code>,
) -> anyhow::Result<(Outcome, Vec<Held<S>>)> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        connected.push(sys.client().await?);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = Vec::with_capacity(clients);
    let start = Instant::now();
    for (c, mut client) in connected.into_iter().enumerate() {
        let sys = sys.clone();
        let code = code.clone();
        let barrier = barrier.clone();
        let prefix = format!("{prefix}-c{c:03}");
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut outcome = Outcome { samples: Samples::with_capacity(per_client), ..Outcome::default() };
            let mut sessions = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let id = format!("{prefix}-{i:04}");
                let t = Instant::now();
                match sys.first(&mut client, &id, &code, false).await {
                    Ok(session) => {
                        outcome.samples.push(t.elapsed());
                        sessions.push(session);
                    }
                    Err(err) => outcome.record_error(err),
                }
            }
            (outcome, (client, sessions))
        }));
    }
    let mut total = Outcome::default();
    let mut held = Vec::with_capacity(clients);
    for task in tasks {
        let (outcome, h) = task.await?;
        total.merge(outcome);
        held.push(h);
    }
    total.elapsed = start.elapsed();
    Ok((total, held))
}

/// Runs `code` `n` times in one session, one after another.
pub async fn repeat_sequential<S: System>(
    sys: &Arc<S>,
    client: &mut S::Client,
    session: &mut S::Session,
    n: usize,
    code: &Code,
) -> Outcome {
    let mut outcome = Outcome { samples: Samples::with_capacity(n), ..Outcome::default() };
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        match sys.exec(client, session, code).await {
            Ok(()) => outcome.samples.push(t.elapsed()),
            Err(err) => outcome.record_error(err),
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// One task per (client, session) pair, each running `code` in its session as fast as it can
/// for `duration`. Returns the latencies and the pairs.
pub async fn repeat_for<S: System>(
    sys: &Arc<S>,
    pairs: Vec<(S::Client, S::Session)>,
    duration: Duration,
    code: &Arc<Code>,
) -> anyhow::Result<(Outcome, Vec<(S::Client, S::Session)>)> {
    let n = pairs.len();
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for (mut client, mut session) in pairs {
        let sys = sys.clone();
        let code = code.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = Outcome { samples: Samples::with_capacity(4096), ..Outcome::default() };
            barrier.wait().await;
            let deadline = Instant::now() + duration;
            while Instant::now() < deadline {
                let t = Instant::now();
                match sys.exec(&mut client, &mut session, &code).await {
                    Ok(()) => outcome.samples.push(t.elapsed()),
                    Err(err) => {
                        outcome.record_error(err);
                        if outcome.errors > 100 {
                            break;
                        }
                    }
                }
            }
            (outcome, (client, session))
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut total = Outcome::default();
    let mut back = Vec::with_capacity(n);
    for task in tasks {
        let (outcome, pair) = task.await?;
        total.merge(outcome);
        back.push(pair);
    }
    total.elapsed = start.elapsed();
    Ok((total, back))
}

/// Runs `code` once in every session, `concurrency` at a time. Returns the pairs and the outcome.
pub async fn run_everywhere<S: System>(
    sys: &Arc<S>,
    pairs: Vec<(S::Client, S::Session)>,
    concurrency: usize,
    code: &Arc<Code>,
) -> anyhow::Result<(Outcome, Vec<(S::Client, S::Session)>)> {
    let mut queue: std::collections::VecDeque<_> = pairs.into_iter().collect();
    let mut running = tokio::task::JoinSet::new();
    let mut total = Outcome::default();
    let mut back = Vec::with_capacity(queue.len());
    let start = Instant::now();
    loop {
        while running.len() < concurrency.max(1) {
            let Some((mut client, mut session)) = queue.pop_front() else { break };
            let sys = sys.clone();
            let code = code.clone();
            running.spawn(async move {
                let t = Instant::now();
                let result = sys.exec(&mut client, &mut session, &code).await;
                (result, t.elapsed(), (client, session))
            });
        }
        let Some(joined) = running.join_next().await else { break };
        let (result, took, pair) = joined?;
        match result {
            Ok(()) => total.samples.push(took),
            Err(err) => total.record_error(err),
        }
        back.push(pair);
    }
    total.elapsed = start.elapsed();
    Ok((total, back))
}
