//! Session lifecycle: allocation, concurrency, cooldown, timeouts, death and refill.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{new_id, wait_until, PoolSpec, TestServer, NEW};

#[test]
fn concurrent_first_requests_for_one_identifier_share_one_session() {
    let server = TestServer::with_pool(PoolSpec { ready_session_instances: 0, ..Default::default() });
    let id = new_id("race");
    let pids: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| server.eval(&id, "import os\nos.getpid()"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(pids.iter().all(|pid| *pid == pids[0]), "{pids:?}");
    let list: Value = server.authed(server.http().get(server.url("listSessions", None, NEW))).send().unwrap().json().unwrap();
    assert_eq!(list["count"], 1);
}

#[test]
fn idle_sessions_are_deleted_after_the_cooldown_with_their_files() {
    let server = TestServer::with_pool(PoolSpec { cooldown_seconds: 3, ..Default::default() });
    let (idle, busy) = (new_id("idle"), new_id("busy"));
    server.eval(&idle, "state = 1\nopen('f.txt', 'w').write('x')");
    server.eval(&busy, "state = 2");
    // Requests keep `busy` alive past its cooldown.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        server.eval(&busy, "state");
    }
    let session = |id: &str| server.authed(server.http().get(server.url("session", Some(id), NEW))).send().unwrap().status();
    assert!(wait_until(Duration::from_secs(10), || session(&idle) == 404), "the idle session was not deleted");
    assert_eq!(session(&busy), 200);
    assert_eq!(server.eval(&busy, "state"), json!(2));
    // The identifier comes back to a fresh session: no variables, no files.
    let fresh = server.execute(&idle, "state");
    assert_eq!(fresh["status"], "Failed");
    assert_eq!(server.eval_json(&idle, "import os\nos.listdir('.')"), json!([]));
}

#[test]
fn a_timeout_interrupts_the_code_and_keeps_the_session() {
    let server = TestServer::with_pool(PoolSpec { timeout_seconds: 2, ..Default::default() });
    let id = new_id("timeout");
    server.eval(&id, "kept = 'still here'");
    let body = server.execute(&id, "import time\nprint('started')\ntime.sleep(60)");
    assert_eq!(body["status"], "Failed");
    assert_eq!(body["error"]["code"], "ExecutionTimeout");
    assert_eq!(body["result"]["stdout"], "started\n");
    assert!(body["result"]["stderr"].as_str().unwrap().contains("ExecutionTimeout"), "{body}");
    assert_eq!(server.eval(&id, "kept"), json!("still here"));
    // `timeoutInSeconds` is honoured, and `except Exception` cannot swallow the timeout.
    let response = server
        .authed(server.http().post(server.url("executions", Some(&id), NEW)))
        .json(&json!({ "code": "import time\ntry:\n    time.sleep(30)\nexcept Exception:\n    pass\n'swallowed'", "timeoutInSeconds": 1 }))
        .send()
        .unwrap();
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "ExecutionTimeout", "{body}");
    assert_eq!(server.eval(&id, "kept"), json!("still here"));
}

#[test]
fn code_that_ignores_the_timeout_is_stopped_and_reported() {
    let server = TestServer::with_pool(PoolSpec { timeout_seconds: 1, ..Default::default() });
    let id = new_id("stuck");
    server.eval(&id, "kept = 1");
    // Blocking SIGALRM defeats the in-interpreter timeout; the server's deadline still holds.
    let body = server
        .execute(&id, "import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\nwhile True:\n    time.sleep(0.1)");
    assert_eq!(body["status"], "Failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not stop"), "{message}");
    assert!(message.contains("new session"), "{message}");
    let fresh = server.execute(&id, "kept");
    assert!(fresh["result"]["stderr"].as_str().unwrap().contains("NameError"), "a new session: {fresh}");
}

#[test]
fn a_session_that_exits_or_runs_out_of_memory_fails_clearly_and_restarts() {
    let server = TestServer::with_pool(PoolSpec { memory: "256Mi", ..Default::default() });
    let id = new_id("dies");
    server.eval(&id, "kept = 1");
    let body = server.execute(&id, "import os\nos._exit(3)");
    assert_eq!(body["status"], "Failed");
    assert_eq!(body["error"]["code"], "SessionTerminated");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("exited with code 3"), "{message}");
    assert!(body["result"]["stderr"].as_str().unwrap().contains("exited with code 3"));
    assert!(server.execute(&id, "kept")["result"]["stderr"].as_str().unwrap().contains("NameError"));

    server.eval(&id, "kept = 2");
    let body = server.execute(&id, "block = b'x' * (1 << 30)");
    assert_eq!(body["status"], "Failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ran out of memory") && message.contains("256 MiB"), "{message}");
    // The legacy generation reports the same as a Failure a client can show.
    let legacy: Value = server
        .authed(server.http().post(server.url("code/execute", Some(&id), crate::support::LEGACY)))
        .json(&json!({ "properties": { "code": "import os\nos.kill(os.getpid(), 9)" } }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(legacy["properties"]["status"], "Failure");
    assert!(legacy["properties"]["stderr"].as_str().unwrap().contains("SIGKILL"), "{legacy}");
    assert_eq!(server.eval(&id, "'alive again'"), json!("alive again"));
}

#[test]
fn the_ready_queue_refills_in_the_background() {
    let server = TestServer::with_pool(PoolSpec { ready_session_instances: 3, ..Default::default() });
    let ready = || -> u64 {
        let body: Value = server.http().get(format!("http://{}/readyz", server.addr)).send().unwrap().json().unwrap();
        body["pools"][0]["readySessions"].as_u64().unwrap()
    };
    assert!(wait_until(Duration::from_secs(30), || ready() == 3));
    for n in 0..5 {
        server.eval(&new_id(&format!("refill{n}")), "1");
    }
    assert!(wait_until(Duration::from_secs(30), || ready() == 3), "refilled to 3");
}

#[test]
fn output_beyond_the_cap_is_truncated_with_a_marker() {
    let server = TestServer::with_pool(PoolSpec { max_output_characters: 4096, ..Default::default() });
    let id = new_id("output");
    let body = server.execute(&id, "import sys\nfor _ in range(100000):\n    print('y' * 100)\nprint('e' * 10000, file=sys.stderr)");
    assert_eq!(body["status"], "Succeeded");
    let stdout = body["result"]["stdout"].as_str().unwrap();
    assert!(stdout.len() < 4096 + 200, "{}", stdout.len());
    assert!(stdout.starts_with(&"y".repeat(100)));
    assert!(stdout.ends_with("\n[output truncated by sandpool: 10095904 more characters]\n"), "{}", &stdout[stdout.len() - 120..]);
    assert!(body["result"]["stderr"].as_str().unwrap().contains("output truncated"));
    // A request may lower the cap, never raise it.
    let small: Value = server
        .authed(server.http().post(server.url("executions", Some(&id), NEW)))
        .json(&json!({ "code": "print('z' * 500)", "outputStreamsMaxLength": 100 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(small["result"]["stdout"].as_str().unwrap().starts_with(&format!("{}\n[output truncated", "z".repeat(100))));
}

#[test]
fn a_killed_zygote_is_replaced_and_its_sessions_start_fresh() {
    let server = TestServer::start();
    let id = new_id("zygote");
    server.eval(&id, "kept = 1");
    let zygotes = server.zygote_pids();
    assert_eq!(zygotes.len(), 1, "{zygotes:?}");
    let session_pids = server.session_host_pids(&id);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygotes[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    // The session dies with its zygote (parent-death signal)...
    assert!(wait_until(Duration::from_secs(10), || session_pids.iter().all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())));
    // ...and the identifier gets a fresh session from a new zygote.
    assert!(wait_until(Duration::from_secs(30), || {
        let body = server.execute(&id, "'back'");
        body["status"] == "Succeeded"
    }));
    assert!(server.execute(&id, "kept")["result"]["stderr"].as_str().unwrap().contains("NameError"));
    let replaced = server.zygote_pids();
    assert_eq!(replaced.len(), 1);
    assert_ne!(replaced[0], zygotes[0]);
}

#[test]
fn sigterm_stops_every_session_and_removes_the_servers_cgroups() {
    let server = TestServer::start();
    let mut pids = Vec::new();
    for n in 0..3 {
        let id = new_id(&format!("stop{n}"));
        server.eval(&id, "import subprocess\nsleeper = subprocess.Popen(['sleep', '600'])");
        pids.extend(server.session_host_pids(&id));
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", pids[0])).unwrap();
    let memory = cgroup.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned())).expect("a memory cgroup");
    let instance = std::path::Path::new("/sys/fs/cgroup/memory").join(memory.trim_start_matches('/').split('/').next().unwrap());
    assert!(instance.exists(), "{}", instance.display());
    assert!(server.stop().success());
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "session process {pid} outlived the server");
    }
    assert!(!instance.exists(), "{} is left behind", instance.display());
}

#[test]
fn sessions_from_the_ready_queue_and_made_on_demand_run_at_normal_priority_on_every_cpu() {
    // Ready sessions warm up at idle priority on the zygote's refill CPUs; a session that
    // serves an identifier must get the normal scheduling policy and every CPU the server has,
    // or parallel user code would be confined to one core.
    let host_cpus = allowed_cpus();
    let probe = "import os\n[sorted(os.sched_getaffinity(0)), os.sched_getscheduler(0) == os.SCHED_OTHER]";
    for ready in [4, 0] {
        let server = TestServer::with_pool(PoolSpec { ready_session_instances: ready, ..Default::default() });
        let id = new_id("sched");
        assert_eq!(server.eval_json(&id, probe), json!([host_cpus, true]), "ready_session_instances = {ready}");
        // Threads and processes the user starts inherit the same.
        let child = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True).stdout.strip()";
        assert_eq!(server.eval_json(&id, child), json!(format!("{host_cpus:?}")));
    }
}

/// The CPUs this process may run on (and so the server it starts), from `Cpus_allowed_list`.
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status.lines().find_map(|line| line.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    let mut cpus = Vec::new();
    for range in list.split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        cpus.extend(first.parse::<usize>().unwrap()..=last.parse::<usize>().unwrap());
    }
    cpus
}
