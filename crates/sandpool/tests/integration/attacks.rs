//! The attack suite: model-written code trying to get out, run through the public API.
//!
//! Every test runs hostile code inside a real session and asserts that the attack is denied
//! or contained, and that the server and a bystander session are unaffected. System calls
//! Python does not expose are made through `ctypes`, as an attacker would.

use serde_json::{json, Value};

use crate::support::{new_id, PoolSpec, TestServer, LEGACY, NEW};

/// Python helpers for the attacks: `call(nr, *args)` makes a raw system call and returns
/// `"ok"` or the errno name; `attempt(f)` returns `"ok"` or the exception's errno name.
const PRELUDE: &str = r#"
import ctypes, errno, json, os, socket
_libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r == 0 and nr == 56:
        os._exit(0)  # a clone that succeeded: never let the child run on
    return 'ok' if r >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
def attempt(f):
    try:
        f()
        return 'ok'
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
"#;

/// Runs an attack whose last expression is `json.dumps(...)` and returns the decoded value.
fn run(server: &TestServer, id: &str, attack: &str) -> Value {
    let text = server.eval(id, &format!("{PRELUDE}\n{attack}"));
    serde_json::from_str(text.as_str().expect("the attack returns JSON text")).expect("valid JSON")
}

/// The server still answers and a session that did nothing wrong still works.
fn assert_unaffected(server: &TestServer) {
    let health = server.http().get(format!("http://{}/healthz", server.addr)).send().unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(server.eval(&new_id("bystander"), "import numpy as np\nint(np.arange(10).sum())"), json!(45));
}

#[test]
fn host_files_and_the_servers_secrets_are_out_of_reach() {
    let server = TestServer::start();
    let id = new_id("files-attack");
    let state_dir = server.state_path().display().to_string();
    let result = run(
        &server,
        &id,
        &format!(
            r#"
def read(path):
    return attempt(lambda: open(path, 'rb').read())
def write(path):
    return attempt(lambda: open(path, 'wb').write(b'x'))
found = []
for root, dirs, files in os.walk('/'):
    dirs[:] = [d for d in dirs if not (root == '/' and d in ('proc', 'dev'))]
    found += [os.path.join(root, f) for f in files if f.endswith('.pem') and 'issuer' in f]
json.dumps({{
  'shadow': read('/etc/shadow'), 'proc_root_shadow': read('/proc/1/root/etc/shadow'),
  'state_dir': os.path.exists({state_dir:?}), 'keys_found': found,
  'host_users': [l.split(':')[0] for l in open('/etc/passwd')],
  'write_usr': write('/usr/bin/evil'), 'write_etc': write('/etc/evil'), 'write_venv': write('/opt/sandpool/venv/evil'),
  'write_root': write('/evil'), 'write_proc_mem': write('/proc/self/mem'),
  'open_by_handle_at': call(304, -100, 0, 0),
}})"#
        ),
    );
    assert_eq!(result["shadow"], "ENOENT", "{result}");
    assert_ne!(result["proc_root_shadow"], "ok", "{result}");
    assert_eq!(result["state_dir"], false);
    assert_eq!(result["keys_found"], json!([]), "the server's signing key is reachable: {result}");
    assert_eq!(result["host_users"], json!(["root", "sandbox", "nobody"]), "host accounts leak: {result}");
    for key in ["write_usr", "write_etc", "write_venv", "write_root", "write_proc_mem"] {
        assert_ne!(result[key], "ok", "{key}: {result}");
    }
    assert_eq!(result["open_by_handle_at"], "EPERM", "{result}");
    assert_unaffected(&server);
}

#[test]
fn another_sessions_files_are_out_of_reach() {
    let server = TestServer::start();
    let (victim, attacker) = (new_id("victim"), new_id("attacker"));
    server
        .eval(&victim, "open('/mnt/data/victim-secret.txt', 'w').write('the victim secret')\nopen('/tmp/victim-tmp.txt', 'w').write('x')");
    let victim_pids = server.session_host_pids(&victim);
    let result = run(
        &server,
        &attacker,
        &format!(
            r#"
found = []
for root, dirs, files in os.walk('/'):
    dirs[:] = [d for d in dirs if not (root == '/' and d in ('proc', 'dev'))]
    found += [os.path.join(root, f) for f in files if f.startswith('victim')]
roots = {{}}
for pid in {victim_pids:?}:
    roots[pid] = attempt(lambda: os.listdir(f'/proc/{{pid}}/root/mnt/data'))
json.dumps({{'found': found, 'proc_roots': roots, 'own_pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}})"#
        ),
    );
    assert_eq!(result["found"], json!([]), "{result}");
    for (pid, outcome) in result["proc_roots"].as_object().unwrap() {
        assert_ne!(outcome, "ok", "the victim's files are reachable through /proc/{pid}/root: {result}");
    }
    // Through a symlink handed to the files API.
    server.eval(&attacker, &format!("import os\nos.symlink('/proc/{}/root/mnt/data/victim-secret.txt', 'link')", victim_pids[0]));
    let response = server.authed(server.http().get(server.url("files/content/link", Some(&attacker), LEGACY))).send().unwrap();
    assert!(response.status() == 403 || response.status() == 404, "{}", response.status());
    assert!(!response.text().unwrap().contains("victim secret"));
    assert_eq!(server.eval(&victim, "open('/mnt/data/victim-secret.txt').read()"), json!("the victim secret"));
    assert_unaffected(&server);
}

#[test]
fn other_processes_cannot_be_listed_signalled_or_traced() {
    let server = TestServer::start();
    let (victim, attacker) = (new_id("victim"), new_id("attacker"));
    server.eval(&victim, "x = 'alive'");
    let victim_pids = server.session_host_pids(&victim);
    let zygotes = server.zygote_pids();
    let targets: Vec<i64> =
        victim_pids.iter().map(|p| *p as i64).chain(zygotes.iter().map(|p| *p as i64)).chain([server.pid() as i64]).collect();
    let result = run(
        &server,
        &attacker,
        &format!(
            r#"
import signal
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
kills = {{str(t): attempt(lambda: os.kill(t, signal.SIGKILL)) for t in {targets:?}}}
json.dumps({{
  'pids': pids, 'me': os.getpid(), 'kills': kills,
  'kill_init': attempt(lambda: os.kill(1, signal.SIGKILL)),
  'ptrace_init': call(101, 16, 1, 0, 0),
  'process_vm_readv': call(310, 1, 0, 0, 0, 0, 0),
}})"#
        ),
    );
    // The session's PID namespace holds its init (PID 1, hidden: it gave up its privileges
    // and cannot be inspected) and the runner (PID 2); nothing else is visible.
    assert_eq!(result["pids"], json!([2]), "{result}");
    assert_eq!(result["me"], 2);
    for (target, outcome) in result["kills"].as_object().unwrap() {
        assert_eq!(outcome, "ESRCH", "signal reached pid {target}: {result}");
    }
    assert_eq!(result["ptrace_init"], "EPERM", "{result}");
    assert_eq!(result["process_vm_readv"], "EPERM", "{result}");
    // Killing its own PID 1 does nothing: the session is still there.
    assert_eq!(server.eval(&attacker, "'still here'"), json!("still here"));
    assert_eq!(server.eval(&victim, "x"), json!("alive"));
    for pid in zygotes.iter().chain(victim_pids.iter()) {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} was killed");
    }
    assert_unaffected(&server);
}

#[test]
fn no_socket_leads_anywhere() {
    let server = TestServer::start();
    let (listener, attacker) = (new_id("listener"), new_id("attacker"));
    // A session listening on an abstract unix socket, as a would-be covert channel.
    server.eval(&listener, "import socket\nabstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\nabstract.bind('\\0sandpool-covert')\nabstract.listen()");
    let port = server.addr.port();
    let result = run(
        &server,
        &attacker,
        &format!(
            r#"
def tcp(host, port):
    s = socket.socket(); s.settimeout(2); s.connect((host, port))
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', (host, port))
def bind_tcp():
    s = socket.socket(); s.bind(('127.0.0.1', 8000)); s.listen()
def abstract():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect('\0sandpool-covert')
json.dumps({{
  'server_port': attempt(lambda: tcp('127.0.0.1', {port})),
  'internet_tcp': attempt(lambda: tcp('1.1.1.1', 443)),
  'internet_udp': attempt(lambda: udp('8.8.8.8', 53)),
  'dns': attempt(lambda: socket.getaddrinfo('pypi.org', 443)),
  'raw': attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
  'packet': attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
  'bind_tcp': attempt(bind_tcp),
  'abstract': attempt(abstract),
}})"#
        ),
    );
    for key in ["server_port", "internet_tcp", "internet_udp", "dns", "raw", "packet", "bind_tcp", "abstract"] {
        assert_ne!(result[key], "ok", "{key} succeeded: {result}");
    }
    // TCP is refused by Landlock itself, before routing is even considered.
    assert_eq!(result["server_port"], "EACCES", "{result}");
    assert_eq!(result["bind_tcp"], "EACCES", "{result}");
    assert_eq!(result["raw"], "EPERM", "{result}");
    assert_eq!(result["packet"], "EPERM", "{result}");
    assert_unaffected(&server);
}

#[test]
fn namespaces_mounts_modules_and_kernel_interfaces_are_denied() {
    let server = TestServer::start();
    let id = new_id("kernel-attack");
    let result = run(
        &server,
        &id,
        r#"
import subprocess
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
def write(path, data):
    return attempt(lambda: open(path, 'w').write(data))
setuid = [p for p in ['/usr/bin/mount', '/usr/bin/su', '/usr/bin/passwd', '/usr/bin/newgrp', '/usr/bin/chsh'] if os.path.exists(p) and os.stat(p).st_mode & 0o4000]
suid_runs = {p: subprocess.run([p, '--version'], capture_output=True).returncode for p in setuid[:1]}
mount_cmd = subprocess.run(['mount', '-t', 'tmpfs', 'none', '/mnt/data'], capture_output=True, text=True) if os.path.exists('/usr/bin/mount') else None
json.dumps({
  'unshare_user': call(272, CLONE_NEWUSER), 'unshare_mount': call(272, CLONE_NEWNS),
  'clone_newuser': call(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
  'clone3': call(435, 0, 0), 'setns': call(308, 0, 0),
  'mount': call(165, 0, 0, 0, 0, 0), 'umount': call(166, 0, 0), 'pivot_root': call(155, 0, 0), 'chroot': call(161, 0),
  'init_module': call(175, 0, 0, 0), 'finit_module': call(313, 0, 0, 0), 'delete_module': call(176, 0, 0),
  'kexec_load': call(246, 0, 0, 0, 0), 'keyctl': call(250, 0, 0, 0, 0, 0), 'add_key': call(248, 0, 0, 0, 0, 0),
  'bpf': call(321, 0, 0, 0), 'perf_event_open': call(298, 0, 0, 0, 0, 0), 'io_uring_setup': call(425, 1, 0),
  'userfaultfd': call(323, 0), 'personality_no_aslr': call(135, 0x0040000), 'personality_query': call(135, 0xffffffff),
  'sethostname': call(170, 0, 0),
  'proc_sys': write('/proc/sys/kernel/hostname', 'pwned'), 'sysrq': write('/proc/sysrq-trigger', 'b'),
  'setuid_binaries': setuid, 'setuid_mount': mount_cmd.returncode if mount_cmd else None,
  'uid_after': os.getuid(), 'euid_after': os.geteuid(),
})"#,
    );
    for key in [
        "unshare_user",
        "unshare_mount",
        "clone_newuser",
        "setns",
        "mount",
        "umount",
        "pivot_root",
        "chroot",
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "io_uring_setup",
        "userfaultfd",
        "personality_no_aslr",
        "sethostname",
    ] {
        assert_eq!(result[key], "EPERM", "{key}: {result}");
    }
    assert_eq!(result["clone3"], "ENOSYS", "{result}");
    assert_eq!(result["personality_query"], "ok", "{result}");
    assert_ne!(result["proc_sys"], "ok", "{result}");
    assert_ne!(result["sysrq"], "ok", "{result}");
    // A setuid-root binary runs, but without privilege: `mount` refuses to work.
    if !result["setuid_binaries"].as_array().unwrap().is_empty() {
        assert_ne!(result["setuid_mount"], 0, "{result}");
    }
    assert!(result["uid_after"].as_u64().unwrap() >= 1_000_000_000);
    assert_eq!(result["uid_after"], result["euid_after"]);
    assert_unaffected(&server);
}

#[test]
fn filling_the_disk_fails_inside_the_session_only() {
    let server = TestServer::start();
    let id = new_id("disk-bomb");
    let result = run(
        &server,
        &id,
        r#"
def fill(path):
    chunk = b'x' * (1 << 20)
    written = 0
    try:
        with open(path, 'wb') as f:
            while written < (4 << 30):
                f.write(chunk)
                written += len(chunk)
    except OSError as e:
        return {'errno': errno.errorcode.get(e.errno), 'mib': written >> 20}
    return {'errno': None, 'mib': written >> 20}
data, tmp = fill('/mnt/data/fill.bin'), fill('/tmp/fill.bin')
json.dumps({'data': data, 'tmp': tmp})"#,
    );
    // The test pools have a 256 MiB /mnt/data and a 64 MiB /tmp.
    // The file-size limit (the larger scratch size) and the tmpfs size stop the writes.
    assert!(matches!(result["data"]["errno"].as_str(), Some("ENOSPC" | "EFBIG")), "{result}");
    assert!(result["data"]["mib"].as_u64().unwrap() <= 256, "{result}");
    assert!(matches!(result["tmp"]["errno"].as_str(), Some("ENOSPC" | "EFBIG")), "{result}");
    assert!(result["tmp"]["mib"].as_u64().unwrap() <= 64, "{result}");
    // The session survives, can free the space, and the files API reports the full disk.
    let full = server.upload(&id, "more.bin", vec![0u8; 8 << 20], None);
    assert_eq!(full.status(), 507);
    server.eval(&id, "import os\nos.remove('/mnt/data/fill.bin')");
    assert_eq!(server.upload(&id, "more.bin", vec![0u8; 8 << 20], None).status(), 200);
    assert_unaffected(&server);
}

#[test]
fn a_cpu_spin_is_interrupted_at_the_timeout_and_the_session_lives_on() {
    let server = TestServer::with_pool(PoolSpec { timeout_seconds: 2, ..Default::default() });
    let id = new_id("spin");
    server.eval(&id, "kept = 'yes'");
    let body = server.execute(&id, "while True:\n    pass");
    assert_eq!(body["error"]["code"], "ExecutionTimeout", "{body}");
    assert_eq!(server.eval(&id, "kept"), json!("yes"));
    assert_unaffected(&server);
}

#[test]
fn a_fork_bomb_and_a_memory_bomb_hit_the_sessions_limits_only() {
    let server = TestServer::with_pool(PoolSpec { memory: "256Mi", max_processes: 32, ..Default::default() });
    let id = new_id("bombs");
    let forks = server.execute(&id, "import os\nwhile True:\n    os.fork()");
    // Every fork after the limit fails; the forked copies end silently (they never answer for
    // the session), and the session itself carries on.
    assert_eq!(forks["status"], "Failed", "{forks}");
    assert!(forks["result"]["stderr"].as_str().unwrap().contains("BlockingIOError"), "{forks}");
    assert_eq!(server.eval(&id, "'after the bomb'"), json!("after the bomb"));
    assert_eq!(server.eval(&id, "'and again'"), json!("and again"));
    let memory = server.execute(&new_id("memory-bomb"), "hog = []\nwhile True:\n    hog.append(b'x' * (64 << 20))");
    assert_eq!(memory["status"], "Failed", "{memory}");
    let message = memory["error"]["message"].as_str().unwrap();
    assert!(message.contains("ran out of memory") || message.contains("MemoryError"), "{message}");
    assert_unaffected(&server);
}

#[test]
fn nothing_of_a_deleted_session_remains() {
    let server = TestServer::start();
    let id = new_id("ephemeral");
    server.eval(&id, "import subprocess\nchild = subprocess.Popen(['sleep', '600'])\nopen('/mnt/data/left.txt', 'w').write('x' * 100000)\nblob = bytearray(50 << 20)");
    let pids = server.session_host_pids(&id);
    let sandbox = server.sandbox_id(&id);
    let cgroup_dirs: Vec<std::path::PathBuf> = ["memory", "pids", "cpu"]
        .iter()
        .flat_map(|h| std::fs::read_dir(format!("/sys/fs/cgroup/{h}")).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("sandpool-"))
        .map(|e| e.path().join("default").join(&sandbox))
        .filter(|p| p.exists())
        .collect();
    assert!(!cgroup_dirs.is_empty());
    assert_eq!(server.authed(server.http().delete(server.url("session", Some(&id), NEW))).send().unwrap().status(), 204);
    for pid in &pids {
        let running = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.contains("State:\tZ"));
        assert!(!running, "process {pid} survived the deletion");
    }
    for dir in &cgroup_dirs {
        assert!(!dir.exists(), "{} survived the deletion", dir.display());
    }
    // The identifier comes back empty.
    assert_eq!(server.eval_json(&id, "import os\nos.listdir('/mnt/data')"), json!([]));
    assert_unaffected(&server);
}
