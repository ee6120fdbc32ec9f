//! The server's end of a session runner's connection, whatever carries it.
//!
//! Zygote sessions hand the server a Unix socket; Python sessions under gVisor are reached
//! over TCP inside their network namespace. Both speak the same frames (see `protocol`), and
//! both need the same care: one request at a time, a session whose stream was left
//! mid-exchange is never trusted again, and an execution that outlives its timeout by
//! [`TIMEOUT_GRACE`] costs the session, not the server.

use std::time::Duration;

use async_trait::async_trait;
use sandpool_engine::backend::{Cell, CellOutcome, CellResult, CellStatus, DeathCause, SandboxError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{RunnerHello, RunnerReply, RunnerRequest, MAX_RUNNER_FRAME};

/// The in-session runner (`runner.py`), embedded in the binary.
pub const RUNNER_SOURCE: &str = include_str!("runner.py");

/// Extra time the runner gets after an execution's timeout to report it, before the
/// session is killed.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(5);

/// The process behind a runner connection, as far as the exchange needs to know it.
#[async_trait]
pub trait RunnerProcess: Send + Sync {
    fn is_alive(&self) -> bool;
    /// Resolves once the process has ended.
    async fn ended(&self);
    /// Kills the process (its resources are released later, by the sandbox's `destroy`).
    async fn kill(&self);
    /// Why the process is gone, in words for the user.
    async fn death(&self) -> SandboxError;
}

/// A runner connection. `in_doubt` is set while a request is outstanding: if the caller
/// gave up mid-exchange, the stream is out of step and the session cannot be trusted.
pub struct RunnerConnection<S> {
    stream: S,
    in_doubt: bool,
    /// The next request's id. Starts from the clock, so a server that adopted the session
    /// never reuses an id its predecessor may still get a reply for.
    next_id: u64,
}

fn first_request_id() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1).max(1)
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> RunnerConnection<S> {
    /// Waits (up to `timeout`) for the runner's hello; an error says why the session failed.
    pub async fn open(mut stream: S, timeout: Duration, sandbox_id: &str) -> Result<(RunnerConnection<S>, RunnerHello), String> {
        let hello: RunnerHello = match tokio::time::timeout(timeout, read_frame(&mut stream)).await {
            Err(_) => return Err(format!("session {sandbox_id} did not become ready in time")),
            Ok(Err(e)) => return Err(format!("session {sandbox_id} ended during start-up: {e}")),
            Ok(Ok(bytes)) => serde_json::from_slice(&bytes).map_err(|e| format!("bad hello from session {sandbox_id}: {e}"))?,
        };
        if !hello.ready {
            return Err(hello.error.unwrap_or_else(|| "the session failed to start".into()));
        }
        Ok((RunnerConnection { stream, in_doubt: false, next_id: first_request_id() }, hello))
    }

    /// A connection whose hello an earlier server already read (a session adopted after a
    /// restart).
    pub fn resume(stream: S) -> RunnerConnection<S> {
        RunnerConnection { stream, in_doubt: false, next_id: first_request_id() }
    }

    /// Runs one cell. Call with the connection locked, so requests stay in order.
    pub async fn execute(&mut self, cell: Cell, process: &dyn RunnerProcess) -> Result<CellOutcome, SandboxError> {
        if !process.is_alive() {
            return Err(process.death().await);
        }
        if self.in_doubt {
            process.kill().await;
            return Err(SandboxError::Died {
                cause: DeathCause::Crashed,
                message: "an earlier request to the session was interrupted, leaving it in an unknown state".into(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let request =
            RunnerRequest::Execute { id, code: cell.code, timeout_ms: cell.timeout.as_millis() as u64, output_cap: cell.output_cap as u64 };
        let body = serde_json::to_vec(&request).expect("request serializes");
        self.in_doubt = true;
        let stream = &mut self.stream;
        let exchange = async {
            write_frame(stream, &body).await?;
            loop {
                let frame = read_frame(stream).await?;
                // A reply to a request of the server this one replaced (it crashed while the
                // cell ran): not ours, skip it.
                let reply_id = serde_json::from_slice::<ReplyId>(&frame).ok().and_then(|reply| reply.id);
                if reply_id.is_none_or(|reply_id| reply_id == id) {
                    return Ok::<_, std::io::Error>(frame);
                }
            }
        };
        let outcome = tokio::select! {
            res = exchange => res,
            _ = process.ended() => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "session exited")),
            _ = tokio::time::sleep(cell.timeout + TIMEOUT_GRACE) => {
                process.kill().await;
                return Err(SandboxError::Died {
                    cause: DeathCause::Unresponsive,
                    message: format!("the execution did not stop within {} s of its {} s timeout (it may be stuck in native code), so the session was stopped", TIMEOUT_GRACE.as_secs(), cell.timeout.as_secs()),
                });
            }
        };
        let bytes = match outcome {
            Ok(bytes) => bytes,
            Err(_) => return Err(process.death().await),
        };
        self.in_doubt = false;
        let reply: RunnerReply =
            serde_json::from_slice(&bytes).map_err(|e| SandboxError::Internal(format!("bad reply from the session runner: {e}")))?;
        Ok(convert_reply(reply))
    }
}

/// Just the id of a reply.
#[derive(serde::Deserialize)]
struct ReplyId {
    #[serde(default)]
    id: Option<u64>,
}

async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u32().await? as usize;
    if len > MAX_RUNNER_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("runner frame of {len} bytes exceeds the limit")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, body: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame).await
}

fn convert_reply(reply: RunnerReply) -> CellOutcome {
    let status = match reply.status.as_str() {
        "success" => CellStatus::Success,
        "timeout" => CellStatus::Timeout,
        _ => CellStatus::Error,
    };
    let result = match reply.result_kind.as_str() {
        "json" => CellResult::Json(reply.result.to_string()),
        "repr" => CellResult::Repr(reply.result.as_str().unwrap_or_default().to_owned()),
        "image" => CellResult::Image {
            format: reply.result.get("format").and_then(|f| f.as_str()).unwrap_or("png").to_owned(),
            base64_data: reply.result.get("base64_data").and_then(|d| d.as_str()).unwrap_or_default().to_owned(),
        },
        _ => CellResult::None,
    };
    let error = reply.error_name.map(|name| (name, reply.error_message.unwrap_or_default()));
    CellOutcome { status, stdout: reply.stdout, stderr: reply.stderr, result, error, duration: Duration::from_millis(reply.duration_ms) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A process that never ends by itself; `kill` is recorded.
    #[derive(Default)]
    struct Immortal {
        killed: AtomicBool,
    }

    #[async_trait]
    impl RunnerProcess for Immortal {
        fn is_alive(&self) -> bool {
            !self.killed.load(Ordering::SeqCst)
        }
        async fn ended(&self) {
            std::future::pending::<()>().await
        }
        async fn kill(&self) {
            self.killed.store(true, Ordering::SeqCst);
        }
        async fn death(&self) -> SandboxError {
            SandboxError::Died { cause: DeathCause::Exited, message: "gone".into() }
        }
    }

    async fn framed(value: serde_json::Value) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &serde_json::to_vec(&value).unwrap()).await.unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_reply_is_read_after_the_hello_and_an_interrupted_exchange_poisons_the_session() {
        let (server, mut runner) = tokio::io::duplex(1 << 16);
        runner.write_all(&framed(serde_json::json!({"ready": true})).await).await.unwrap();
        let (mut conn, _) = RunnerConnection::open(server, Duration::from_secs(5), "sb-test").await.unwrap();
        let process = Immortal::default();
        let cell = Cell { code: "1+1".into(), timeout: Duration::from_secs(30), output_cap: 100 };
        let reply = serde_json::json!({
            "status": "success", "stdout": "hi\n", "stderr": "", "result": 2, "result_kind": "json", "duration_ms": 3,
        });
        runner.write_all(&framed(reply).await).await.unwrap();
        let outcome = conn.execute(cell.clone(), &process).await.unwrap();
        assert_eq!((outcome.status, outcome.stdout.as_str(), outcome.result), (CellStatus::Success, "hi\n", CellResult::Json("2".into())));
        // The caller gives up while the runner is still busy: the stream is out of step.
        let abandoned = tokio::time::timeout(Duration::from_millis(50), conn.execute(cell.clone(), &process)).await;
        assert!(abandoned.is_err());
        let err = conn.execute(cell, &process).await.unwrap_err();
        assert!(matches!(err, SandboxError::Died { cause: DeathCause::Crashed, .. }), "{err}");
        assert!(process.killed.load(Ordering::SeqCst), "a session in an unknown state is killed");
    }

    #[tokio::test]
    async fn a_reply_meant_for_a_crashed_predecessor_is_skipped() {
        let (server, mut runner) = tokio::io::duplex(1 << 16);
        let mut conn = RunnerConnection::resume(server);
        let process = Immortal::default();
        let reply = |id: u64, stdout: &str| {
            serde_json::json!({
                "id": id, "status": "success", "stdout": stdout, "stderr": "", "result": null, "result_kind": "none", "duration_ms": 1,
            })
        };
        // The previous server's cell finishes after the restart; then ours.
        runner.write_all(&framed(reply(7, "stale")).await).await.unwrap();
        let ours = conn.next_id;
        runner.write_all(&framed(reply(ours, "fresh")).await).await.unwrap();
        let cell = Cell { code: "print('fresh')".into(), timeout: Duration::from_secs(30), output_cap: 100 };
        assert_eq!(conn.execute(cell, &process).await.unwrap().stdout, "fresh");
    }

    #[tokio::test]
    async fn a_failed_hello_reports_the_runners_error() {
        let (server, mut runner) = tokio::io::duplex(1 << 16);
        runner.write_all(&framed(serde_json::json!({"ready": false, "error": "landlock failed"})).await).await.unwrap();
        let err = RunnerConnection::open(server, Duration::from_secs(5), "sb-test").await.err().unwrap();
        assert_eq!(err, "landlock failed");
    }
}
