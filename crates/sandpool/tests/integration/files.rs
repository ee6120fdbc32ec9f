//! The files API: both generations, Semantic Kernel's quirks, the upload limit, and
//! confinement to the session's `/mnt/data`.

use serde_json::{json, Value};

use crate::support::{assert_error, new_id, TestServer, LEGACY, NEW};

fn binary_payload() -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..=255).collect();
    bytes.extend((0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    bytes
}

#[test]
fn new_generation_files_round_trip_with_paths() {
    let server = TestServer::start();
    let id = new_id("files");
    let payload = binary_payload();
    let uploaded = server.upload(&id, "data.bin", payload.clone(), Some("/mnt/data/sub"));
    assert_eq!(uploaded.status(), 200);
    let entry: Value = uploaded.json().unwrap();
    assert_eq!(entry["name"], "data.bin");
    assert_eq!(entry["type"], "File");
    assert_eq!(entry["sizeInBytes"], payload.len());
    assert!(entry["lastModifiedAt"].as_str().unwrap().ends_with('Z'));

    // The code sees the file where the API put it, and the API sees files the code makes.
    assert_eq!(server.eval(&id, "open('/mnt/data/sub/data.bin', 'rb').read()[:4].hex()"), json!("00010203"));
    server.eval(&id, "open('made-by-code.txt', 'w').write('from python')");

    let get = |route: &str, extra: &str| {
        server.authed(server.http().get(format!("{}{extra}", server.url(route, Some(&id), NEW)))).send().unwrap()
    };
    let top: Value = get("files", "").json().unwrap();
    let names: Vec<(&str, &str)> =
        top["value"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap())).collect();
    assert_eq!(names, vec![("made-by-code.txt", "File"), ("sub", "Directory")]);
    assert!(top["nextLink"].is_null());
    let sub: Value = get("files", "&path=sub").json().unwrap();
    assert_eq!(sub["value"][0]["name"], "data.bin");
    let all: Value = get("files", "&recursive=true").json().unwrap();
    let deep = all["value"].as_array().unwrap().iter().find(|e| e["name"] == "data.bin").expect("recursive listing");
    assert_eq!(deep["directory"], "sub");

    let meta: Value = get("files/data.bin", "&path=sub").json().unwrap();
    assert_eq!(meta["sizeInBytes"], payload.len());
    let content = get("files/data.bin/content", "&path=sub");
    assert_eq!(content.status(), 200);
    assert_eq!(content.bytes().unwrap().to_vec(), payload);
    // `dir/name` in the name works as well as `path=` (the az CLI splits it, others do not).
    assert_eq!(get("files/sub/data.bin/content", "").bytes().unwrap().to_vec(), payload);

    let deleted = server.authed(server.http().delete(format!("{}&path=sub", server.url("files/data.bin", Some(&id), NEW)))).send().unwrap();
    assert_eq!(deleted.status(), 204);
    assert_error(get("files/data.bin/content", "&path=sub"), 404, "FileNotFound");
    assert_eq!(server.eval(&id, "import os\nos.path.exists('sub/data.bin')"), json!(false));
    assert_error(server.authed(server.http().delete(server.url("files/nope.txt", Some(&id), NEW))).send().unwrap(), 404, "FileNotFound");
}

#[test]
fn legacy_files_and_the_semantic_kernel_quirks() {
    let server = TestServer::start();
    let id = new_id("legacyfiles");
    let payload = binary_payload();
    // Semantic Kernel: a multipart body labelled application/json, and an absolute filename.
    let boundary = "----sandpoolboundary42";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/mnt/data/sk.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").into_bytes();
    body.extend_from_slice(&payload);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let response = server
        .authed(server.http().post(server.url("files/upload", Some(&id), LEGACY)))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let uploaded: Value = response.json().unwrap();
    assert_eq!(uploaded["value"][0]["properties"]["filename"], "sk.bin");
    assert_eq!(uploaded["value"][0]["properties"]["size"], payload.len());

    // A file in a subdirectory, made by code, is listed with its relative path.
    server.eval(&id, "import os\nos.makedirs('out', exist_ok=True)\nopen('out/result.csv', 'w').write('a,b\\n1,2\\n')");
    let list: Value = server.authed(server.http().get(server.url("files", Some(&id), LEGACY))).send().unwrap().json().unwrap();
    let names: Vec<&str> = list["value"].as_array().unwrap().iter().map(|e| e["properties"]["filename"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["out/result.csv", "sk.bin"]);
    let time = list["value"][0]["properties"]["lastModifiedTime"].as_str().unwrap();
    assert_eq!(time.len(), "2024-05-02T07:21:07.9922617Z".len(), "{time}");

    let download = server.authed(server.http().get(server.url("files/content/sk.bin", Some(&id), LEGACY))).send().unwrap();
    assert_eq!(download.bytes().unwrap().to_vec(), payload);
    let csv = server.authed(server.http().get(server.url("files/content/out/result.csv", Some(&id), LEGACY))).send().unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv");
    assert_eq!(csv.text().unwrap(), "a,b\n1,2\n");

    // Not multipart at all.
    let raw = server.authed(server.http().post(server.url("files/upload", Some(&id), LEGACY))).body("just bytes").send().unwrap();
    assert!(assert_error(raw, 400, "SessionRequestValidationFailed").contains("multipart"));
}

#[test]
fn uploads_over_128_mib_are_refused_with_413_and_leave_nothing_behind() {
    let server = TestServer::start();
    let id = new_id("big");
    let too_big = vec![b'x'; 128 * 1024 * 1024 + 1];
    let response = server.upload(&id, "huge.bin", too_big, None);
    assert_error(response, 413, "PayloadTooLarge");
    assert_eq!(server.eval(&id, "import os\nos.path.exists('huge.bin')"), json!(false));
    // A file that fills the session's /mnt/data (256 MiB in tests) fails cleanly too.
    let fits = server.upload(&id, "ok.bin", vec![b'y'; 1024 * 1024], None);
    assert_eq!(fits.status(), 200);
}

#[test]
fn the_files_api_never_leaves_the_sessions_data_directory() {
    let server = TestServer::start();
    let victim = new_id("victim");
    let attacker = new_id("attacker");
    server.eval(&victim, "open('secret.txt', 'w').write('victim secret')");
    let victim_pid = server.eval(&victim, "import os\nos.getpid()");

    // Names that try to climb out are refused before anything is touched.
    for name in ["../etc/passwd", "a/../../etc/passwd", "/etc/passwd", "/mnt/data/../../etc/passwd"] {
        let url = format!("{}/files/{}/content?api-version={NEW}&identifier={attacker}", server.endpoint(), crate::support::encode(name));
        assert_error(server.authed(server.http().get(url)).send().unwrap(), 400, "SessionRequestValidationFailed");
    }
    let response = server.authed(server.http().get(format!("{}&path=..", server.url("files", Some(&attacker), NEW)))).send().unwrap();
    assert_error(response, 400, "SessionRequestValidationFailed");

    // Links planted by the session's own code lead nowhere through the API.
    let state_dir = server.state_path().display().to_string();
    server.eval(
        &attacker,
        &format!(
            "import os\n\
             os.symlink('/etc/passwd', 'abs')\n\
             os.symlink('../../../../../../../../etc/hostname', 'rel')\n\
             os.symlink('/proc/{victim_pid}/root/mnt/data/secret.txt', 'other')\n\
             os.symlink('{state_dir}/keys/local-issuer.pem', 'key')\n\
             os.symlink('/', 'root')"
        ),
    );
    for name in ["abs", "rel", "other", "key", "root/etc/passwd"] {
        let response =
            server.authed(server.http().get(server.url(&format!("files/content/{name}"), Some(&attacker), LEGACY))).send().unwrap();
        let status = response.status().as_u16();
        let body = response.text().unwrap();
        assert!(status == 403 || status == 404, "{name}: {status} {body}");
        assert!(!body.contains("victim secret") && !body.contains("PRIVATE KEY") && !body.contains("root:"), "{name} leaked: {body}");
    }
    // Uploading through a link does not write outside either.
    let response = server.upload(&attacker, "root/tmp/planted.txt", b"x".to_vec(), None);
    assert!(response.status() == 403 || response.status() == 409, "{}", response.status());
    assert!(!std::path::Path::new("/tmp/planted.txt").exists());
    // Listing skips links that lead out.
    let list: Value = server.authed(server.http().get(server.url("files", Some(&attacker), LEGACY))).send().unwrap().json().unwrap();
    assert!(list["value"].as_array().unwrap().is_empty(), "{list}");
    // The victim is untouched.
    assert_eq!(server.eval(&victim, "open('secret.txt').read()"), json!("victim secret"));
}
