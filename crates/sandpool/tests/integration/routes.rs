//! Every data-plane route of both API generations, and the shapes clients parse.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{new_id, wait_until, TestServer, LEGACY, NEW};

#[test]
fn new_executions_keep_state_and_echo_the_operation_id() {
    let server = TestServer::start();
    let id = new_id("exec");
    assert_eq!(server.eval(&id, "counter = 41\ncounter + 1"), json!(42));
    let response = server
        .authed(server.http().post(server.url("executions", Some(&id), NEW)))
        .header("operation-id", "my-op-1")
        .json(&json!({ "properties": { "codeInputType": "inline", "executionType": "synchronous", "code": "print('hi', counter)\ncounter" } }))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["operation-id"], "my-op-1");
    assert!(response.headers().contains_key("x-ms-session-guid"));
    let body: Value = response.json().unwrap();
    assert_eq!(body["id"], "my-op-1");
    assert_eq!(body["identifier"], id.as_str());
    assert_eq!(body["executionType"], "Synchronous");
    assert_eq!(body["status"], "Succeeded");
    assert_eq!(body["result"]["stdout"], "hi 41\n");
    assert_eq!(body["result"]["stderr"], "");
    assert_eq!(body["result"]["executionResult"], 41);
    assert!(body["result"]["executionTimeInMilliseconds"].is_u64());

    // The execution is remembered.
    let stored: Value = server.authed(server.http().get(server.url("executions/my-op-1", Some(&id), NEW))).send().unwrap().json().unwrap();
    assert_eq!(stored["status"], "Succeeded");
    assert_eq!(stored["result"]["stdout"], "hi 41\n");
}

#[test]
fn results_are_json_values_text_or_nothing() {
    let server = TestServer::start();
    let id = new_id("results");
    assert_eq!(server.eval(&id, "'a string'"), json!("a string"));
    assert_eq!(server.eval(&id, "3.25"), json!(3.25));
    assert_eq!(server.eval(&id, "1 < 2"), json!(true));
    // Containers come back as the text a notebook shows, pretty-printed when long.
    assert_eq!(server.eval(&id, "{'k': [1, 2.5, None, True]}"), json!("{'k': [1, 2.5, None, True]}"));
    let long = server.eval(&id, "[f'package-{n:02}' for n in range(12)]");
    assert!(long.as_str().unwrap().starts_with("['package-00',\n 'package-01',\n"), "{long}");
    assert_eq!(server.eval(&id, "x = 1"), json!(""));
    assert_eq!(server.eval(&id, "print('only output')"), json!(""));
    assert_eq!(server.eval(&id, "float('nan')"), json!("nan"));
    assert_eq!(server.eval(&id, "2 ** 100"), json!("1267650600228229401496703205376"));
    assert_eq!(server.eval(&id, "import numpy as np\nnp.arange(3)"), json!("array([0, 1, 2])"));
    assert_eq!(server.eval(&id, "class Thing:\n    def __repr__(self):\n        return '<thing>'\nThing()"), json!("<thing>"));
    let frame = server.eval(&id, "import pandas as pd\npd.DataFrame({'a': [1, 2]})");
    assert!(frame.as_str().unwrap().contains('a'), "{frame}");
}

#[test]
fn asynchronous_executions_run_in_the_background_and_can_be_polled() {
    let server = TestServer::start();
    let id = new_id("async");
    let response = server
        .authed(server.http().post(server.url("executions", Some(&id), NEW)))
        .json(
            &json!({ "executionType": "Asynchronous", "code": "import time\ntime.sleep(1)\nprint('done')\n7 * 6", "timeoutInSeconds": 30 }),
        )
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["operation-location"].to_str().unwrap().to_owned();
    let body: Value = response.json().unwrap();
    assert_eq!(body["status"], "Running");
    assert_eq!(body["executionType"], "Asynchronous");
    let exec_id = body["id"].as_str().unwrap().to_owned();
    assert!(location.starts_with("/pools/default/executions/"), "{location}");
    assert!(location.contains(&exec_id));

    let mut last = Value::Null;
    assert!(wait_until(Duration::from_secs(30), || {
        last = server.authed(server.http().get(format!("http://{}{location}", server.addr))).send().unwrap().json().unwrap();
        last["status"] != "Running"
    }));
    assert_eq!(last["status"], "Succeeded", "{last}");
    assert_eq!(last["result"]["stdout"], "done\n");
    assert_eq!(last["result"]["executionResult"], 42);
}

#[test]
fn legacy_execute_has_the_shape_every_client_reads() {
    let server = TestServer::start();
    let id = new_id("legacy");
    let url = server.url("code/execute", Some(&id), LEGACY);
    let run = |code: &str| -> Value {
        let body = json!({ "properties": { "codeInputType": "inline", "executionType": "synchronous", "code": code } });
        let response = server.authed(server.http().post(&url)).json(&body).send().unwrap();
        assert_eq!(response.status(), 200);
        response.json().unwrap()
    };
    let ok = run("print('hello world')\n1 + 1");
    assert_eq!(ok["$id"], "1");
    let props = &ok["properties"];
    assert_eq!(props["$id"], "2");
    assert_eq!(props["status"], "Success");
    assert_eq!(props["stdout"], "hello world\n");
    assert_eq!(props["stderr"], "");
    assert_eq!(props["result"], 2);
    assert_eq!(props["executionResult"], 2);
    assert!(props["executionTimeInMilliseconds"].is_u64());

    let failed = run("def f():\n    return 1 / 0\nf()");
    let props = &failed["properties"];
    assert_eq!(props["status"], "Failure");
    assert!(props["result"].is_null());
    let stderr = props["stderr"].as_str().unwrap();
    assert!(stderr.contains("ZeroDivisionError: division by zero"), "{stderr}");
    assert!(stderr.contains("in f"), "the traceback shows the user's frames: {stderr}");
    assert!(!stderr.contains("sandpool-runner"), "runner frames are hidden: {stderr}");

    let syntax = run("def broken(:\n  pass");
    assert_eq!(syntax["properties"]["status"], "Failure");
    assert!(syntax["properties"]["stderr"].as_str().unwrap().contains("SyntaxError"));

    // AutoGen's first call: it parses stderr + stdout + result as a pretty-printed list.
    let packages = run("\nimport pkg_resources\n[d.project_name for d in pkg_resources.working_set]\n");
    assert_eq!(packages["properties"]["status"], "Success", "{packages}");
    assert_eq!(packages["properties"]["stderr"], "", "no deprecation warning: {packages}");
    let listed = packages["properties"]["result"].as_str().unwrap();
    let names: Vec<&str> = listed.trim_matches(|c| c == '[' || c == ']').split(",\n").map(|n| n.trim().trim_matches('\'')).collect();
    assert!(names.contains(&"numpy") && names.contains(&"pandas"), "{listed}");
}

#[test]
fn a_matplotlib_figure_comes_back_as_a_png_image() {
    let server = TestServer::start();
    let id = new_id("chart");
    let result = server.eval(&id, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('chart')\nplt.show()");
    assert_eq!(result["type"], "image");
    assert_eq!(result["format"], "png");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.decode(result["base64_data"].as_str().unwrap()).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 1000);
    // Figures are closed after being returned, as in a notebook.
    assert_eq!(server.eval(&id, "len(plt.get_fignums())"), json!(0));
    // A Figure as the last expression is rendered too.
    assert_eq!(server.eval(&id, "fig = plt.figure()\nfig.add_subplot().bar([1, 2], [3, 4])\nfig")["type"], "image");
}

#[test]
fn session_routes_report_list_and_delete_sessions() {
    let server = TestServer::start();
    let id = new_id("sessions");
    let get = |route: &str| server.authed(server.http().get(server.url(route, Some(&id), NEW))).send().unwrap();

    assert_eq!(get("session").status(), 404);
    server.eval(&id, "keep = 'me'");
    let response = get("session");
    assert_eq!(response.status(), 200);
    let guid = response.headers()["x-ms-session-guid"].to_str().unwrap().to_owned();
    let view: Value = response.json().unwrap();
    assert_eq!(view["identifier"], id.as_str());
    assert_eq!(view["etag"], guid.as_str());
    for field in ["createdAt", "lastAccessedAt", "expireAt", "expiresAt"] {
        assert!(view[field].as_str().is_some_and(|t| t.ends_with('Z')), "{field}: {view}");
    }

    let list: Value = server.authed(server.http().get(server.url("listSessions", None, NEW))).send().unwrap().json().unwrap();
    assert_eq!(list["count"], 1);
    assert_eq!(list["sessions"][0]["identifier"], id.as_str());
    assert_eq!(list["value"], list["sessions"]);
    let managed: Value =
        server.authed(server.http().post(server.url(".management/listSessions", None, NEW))).send().unwrap().json().unwrap();
    assert_eq!(managed["value"][0]["identifier"], id.as_str());
    let managed: Value =
        server.authed(server.http().post(server.url(".management/getSession", Some(&id), NEW))).send().unwrap().json().unwrap();
    assert_eq!(managed["etag"], guid.as_str());

    let deleted = server.authed(server.http().delete(server.url("session", Some(&id), NEW))).send().unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(get("session").status(), 404);
    // The identifier starts afresh: the old state is gone.
    let fresh = server.execute(&id, "keep");
    assert_eq!(fresh["status"], "Failed");
    assert!(fresh["result"]["stderr"].as_str().unwrap().contains("NameError"));

    let stopped = server.authed(server.http().post(server.url(".management/stopSession", Some(&id), NEW))).send().unwrap();
    assert_eq!(stopped.status(), 200);
    assert!(stopped.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert_eq!(stopped.text().unwrap(), format!("Session {id} in session pool default stopped."));
    assert_eq!(get("session").status(), 404);
}

#[test]
fn metadata_describes_the_runtime() {
    let server = TestServer::start();
    let body: Value = server.authed(server.http().get(server.url("metadata", None, NEW))).send().unwrap().json().unwrap();
    assert_eq!(body["runtimes"][0]["name"], "python");
    assert!(body["runtimes"][0]["version"].as_str().unwrap().starts_with("3."));
    let packages = body["preInstalledPackages"].as_array().unwrap();
    for wanted in ["numpy", "pandas", "matplotlib", "setuptools"] {
        assert!(packages.iter().any(|p| p["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(wanted))), "{wanted} missing");
    }
    assert!(body["jupyterKernel"]["name"].is_string());
    assert!(body["createdAt"].is_string() && body["lastUpdatedAt"].is_string());
}

#[test]
fn every_route_answers_under_any_prefix_ending_in_session_pools() {
    let server = TestServer::start();
    let id = new_id("prefix");
    for base in [
        format!("http://{}/pools/default", server.addr),
        format!("http://{}/subscriptions/s1/resourceGroups/rg/sessionPools/default", server.addr),
        format!("http://{}/some/gateway/prefix/sessionPools/default", server.addr),
    ] {
        let url = format!("{base}/executions?api-version={NEW}&identifier={id}");
        let body: Value = server.authed(server.http().post(url)).json(&json!({ "code": "6 * 7" })).send().unwrap().json().unwrap();
        assert_eq!(body["result"]["executionResult"], 42, "{base}");
        // A trailing slash on the endpoint is harmless too.
        let url = format!("{base}//files?api-version={NEW}&identifier={id}");
        assert_eq!(server.authed(server.http().get(url)).send().unwrap().status(), 200, "{base}");
    }
}

#[test]
fn shell_lines_and_subprocesses_use_the_sessions_python() {
    let server = TestServer::start();
    let id = new_id("shell");
    let body = server.execute(&id, "!echo from-the-shell\n%matplotlib inline\n!pip --version");
    assert_eq!(body["status"], "Succeeded", "{body}");
    let stdout = body["result"]["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("from-the-shell\n"), "{stdout}");
    assert!(stdout.contains("pip ") && stdout.contains("/opt/sandpool/venv"), "{stdout}");
    let version = server.eval(&id, "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import numpy; print(numpy.__version__)'], capture_output=True, text=True).stdout.strip()");
    assert_eq!(version, json!("2.4.6"));
    // Valid Python is never rewritten, even when a line starts with '!' inside a string.
    assert_eq!(server.eval(&id, "text = '''\n!not a command\n'''\ntext.strip()"), json!("!not a command"));
}
