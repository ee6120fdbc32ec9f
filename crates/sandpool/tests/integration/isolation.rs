//! What a session can see and do, checked from inside real sessions: its own namespaces and
//! user, no network, a read-only system, private scratch space, and resource limits. (The
//! full attack suite with seccomp and Landlock comes with the hardening issue.)

use serde_json::json;

use crate::support::{new_id, PoolSpec, TestServer};

#[test]
fn each_session_has_its_own_namespaces_and_user() {
    let server = TestServer::start();
    let probe = "import os\n{'uid': os.getuid(), 'gid': os.getgid(), 'ns': {n: os.readlink('/proc/self/ns/' + n) for n in ['mnt', 'net', 'ipc', 'uts']}, 'host': os.uname().nodename, 'groups': os.getgroups()}";
    let a = server.eval_json(&new_id("iso-a"), probe);
    let b = server.eval_json(&new_id("iso-b"), probe);
    let uid = a["uid"].as_u64().unwrap();
    assert!(uid >= 1_000_000_000, "sessions never run as root or as a host user: {a}");
    assert_ne!(a["uid"], b["uid"]);
    assert_eq!(a["groups"], json!([]));
    assert_eq!(a["host"], "sandbox");
    for ns in ["mnt", "net", "ipc", "uts"] {
        let own = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap().display().to_string();
        assert_ne!(a["ns"][ns], json!(own), "{ns} namespace shared with the host");
        assert_ne!(a["ns"][ns], b["ns"][ns], "{ns} namespace shared between sessions");
    }
    // Sessions start at the zygote's low priority but run user code at the normal one.
    assert_eq!(server.eval(&new_id("nice"), "import os\nos.nice(0)"), json!(0));
    // No capabilities and no way to gain them.
    let status = server.eval(&new_id("caps"), "open('/proc/self/status').read()");
    let status = status.as_str().unwrap();
    for field in ["CapEff:\t0000000000000000", "CapPrm:\t0000000000000000", "NoNewPrivs:\t1"] {
        assert!(status.contains(field), "{field} missing in\n{status}");
    }
}

#[test]
fn sessions_have_no_network_at_all() {
    let server = TestServer::start();
    let id = new_id("net");
    let port = server.addr.port();
    let result = server.eval_json(
        &id,
        &format!(
            "import socket\n\
             def attempt(f):\n    try:\n        f()\n        return 'open'\n    except OSError as e:\n        return type(e).__name__\n\
             def tcp(host, port):\n    s = socket.socket(); s.settimeout(2); s.connect((host, port))\n\
             {{'server': attempt(lambda: tcp('127.0.0.1', {port})), 'outside': attempt(lambda: tcp('1.1.1.1', 443)),\n 'dns': attempt(lambda: socket.getaddrinfo('pypi.org', 443)),\n 'interfaces': sorted(n for _, n in socket.if_nameindex())}}"
        ),
    );
    assert_ne!(result["server"], "open", "{result}");
    assert_ne!(result["outside"], "open", "{result}");
    assert_ne!(result["dns"], "open", "{result}");
    assert_eq!(result["interfaces"], json!(["lo"]));
}

#[test]
fn the_system_is_read_only_and_host_files_are_out_of_sight() {
    let server = TestServer::start();
    let id = new_id("fs");
    let state_dir = server.state_path().display().to_string();
    let result = server.eval_json(
        &id,
        &format!(
            "import os\n\
             def can_write(path):\n    try:\n        open(path, 'w').write('x')\n        return True\n    except OSError:\n        return False\n\
             {{'root': sorted(os.listdir('/')), 'usr': can_write('/usr/evil'), 'etc': can_write('/etc/evil'), 'venv': can_write('/opt/sandpool/venv/evil'),\n\
              'data': can_write('/mnt/data/ok'), 'tmp': can_write('/tmp/ok'), 'state': os.path.exists({state_dir:?}), 'shadow': os.path.exists('/etc/shadow'),\n\
              'cwd': os.getcwd(), 'home': os.path.exists('/root') or os.path.exists('/home')}}"
        ),
    );
    assert_eq!(result["usr"], false);
    assert_eq!(result["etc"], false);
    assert_eq!(result["venv"], false);
    assert_eq!(result["data"], true);
    assert_eq!(result["tmp"], true);
    assert_eq!(result["state"], false, "the server's state directory is visible");
    assert_eq!(result["shadow"], false);
    assert_eq!(result["home"], false);
    assert_eq!(result["cwd"], "/mnt/data");
    let root: Vec<&str> = result["root"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for hidden in ["root", "home", "var", "srv", "boot", "sys"] {
        assert!(!root.contains(&hidden), "/{hidden} is visible: {root:?}");
    }
}

#[test]
fn sessions_cannot_see_each_others_files_or_processes() {
    let server = TestServer::start();
    let (a, b) = (new_id("priv-a"), new_id("priv-b"));
    server.eval(&a, "open('/mnt/data/mine.txt', 'w').write('a')\nopen('/tmp/mine-too.txt', 'w').write('a')\nimport subprocess\nsleeper = subprocess.Popen(['sleep', '600'])");
    let seen = server.eval_json(
        &b,
        "import os\n{'data': os.listdir('/mnt/data'), 'tmp': os.listdir('/tmp'), 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), 'me': os.getpid()}",
    );
    assert_eq!(seen["data"], json!([]));
    assert!(!seen["tmp"].as_array().unwrap().iter().any(|n| n == "mine-too.txt"), "{seen}");
    assert_eq!(seen["pids"], json!([seen["me"]]), "only its own process is visible: {seen}");
    // Session a's processes, its `sleep` child included, are gone once the session is deleted.
    let host_pids = server.session_host_pids(&a);
    assert!(host_pids.len() >= 2, "the runner and its sleep: {host_pids:?}");
    assert_eq!(server.authed(server.http().delete(server.url("session", Some(&a), crate::support::NEW))).send().unwrap().status(), 204);
    for pid in host_pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.contains("State:\tZ"));
        assert!(!alive, "process {pid} of a deleted session is still running");
    }
}

#[test]
fn process_limits_contain_a_fork_bomb() {
    let server = TestServer::with_pool(PoolSpec { max_processes: 16, ..Default::default() });
    let id = new_id("forks");
    let result = server.eval_json(
        &id,
        "import os, time\nchildren = []\nerror = None\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError as e:\n        error = type(e).__name__\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    children.append(pid)\n\
         for pid in children:\n    os.kill(pid, 9)\n    os.waitpid(pid, 0)\n{'forked': len(children), 'error': error}",
    );
    assert_eq!(result["error"], "BlockingIOError", "{result}");
    assert!(result["forked"].as_u64().unwrap() < 16, "{result}");
    // The session, and other sessions, still work.
    assert_eq!(server.eval(&id, "'fine'"), json!("fine"));
    assert_eq!(server.eval(&new_id("other"), "'fine'"), json!("fine"));
}

#[test]
fn memory_and_cpu_limits_apply_to_each_session() {
    let server = TestServer::with_pool(PoolSpec { memory: "300Mi", cpu: 0.2, ..Default::default() });
    let id = new_id("limits");
    server.eval(&id, "1");
    let pid = server.session_host_pids(&id)[0];
    // The session sits in cgroups with the pool's limits.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let limit = match cgroups.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned())) {
        Some(v1) => std::fs::read_to_string(format!("/sys/fs/cgroup/memory{v1}/memory.limit_in_bytes")).unwrap(),
        None => {
            let v2 = cgroups.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup");
            std::fs::read_to_string(format!("/sys/fs/cgroup{v2}/memory.max")).unwrap()
        }
    };
    assert_eq!(limit.trim(), (300u64 << 20).to_string());
    // A busy loop gets at most its share of a CPU: 0.2 CPU over 2 s of wall time is 0.4 s of CPU
    // time (an upper bound: a loaded machine only lowers it).
    let used = server.eval(&id, "import os, time\nstart, cpu = time.monotonic(), os.times()\nwhile time.monotonic() - start < 2:\n    pass\nnow = os.times()\n(now.user - cpu.user) + (now.system - cpu.system)");
    let used = used.as_f64().unwrap();
    assert!(used < 0.8, "the session used {used} s of CPU in 2 s with a 0.2 CPU limit");
}
