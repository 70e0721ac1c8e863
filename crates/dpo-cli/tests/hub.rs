//! The Hugging Face Hub: downloads and uploads against a stand-in for the Hub's endpoints on
//! 127.0.0.1 (model info, file resolve; repo create, branch, preupload, commit), with hf-hub
//! pointed at it through HF_ENDPOINT and HF_HOME a temporary folder.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};

use common::fixtures;

mod common;

/// The commit every served model is at.
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Debug, Clone)]
struct Commit {
    repo: String,
    revision: String,
    summary: String,
    files: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
struct State {
    /// Models served for download: repo -> (path -> bytes).
    models: HashMap<String, BTreeMap<String, Vec<u8>>>,
    /// The token the write endpoints accept.
    token: String,
    /// Statuses answered instead of the real thing, per endpoint, first first.
    faults: HashMap<&'static str, Vec<u16>>,
    /// (endpoint, Authorization header) of every request.
    log: Vec<(&'static str, Option<String>)>,
    created: Vec<Value>,
    branches: Vec<(String, String)>,
    commits: Vec<Commit>,
}

struct Hub {
    url: String,
    state: Arc<Mutex<State>>,
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn json_response(status: u16, v: Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type", "application/json".into())],
        body: v.to_string().into_bytes(),
    }
}

fn etag(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), bytes.len())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

impl Hub {
    fn start(token: &str) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { token: token.into(), ..State::default() }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &shared);
                });
            }
        });
        Hub { url, state }
    }

    fn serve_model(&self, repo: &str, dir: &Path) {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            files.insert(p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap());
        }
        self.state.lock().unwrap().models.insert(repo.into(), files);
    }

    fn fail(&self, endpoint: &'static str, statuses: &[u16]) {
        self.state.lock().unwrap().faults.insert(endpoint, statuses.to_vec());
    }

    fn requests(&self, endpoint: &str) -> usize {
        self.state.lock().unwrap().log.iter().filter(|(e, _)| *e == endpoint).count()
    }

    fn total_requests(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }

    fn commits(&self) -> Vec<Commit> {
        self.state.lock().unwrap().commits.clone()
    }
}

/// One request per connection (answered with `Connection: close`).
fn serve(conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(n) = headers.get("content-length").and_then(|n| n.parse::<usize>().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let path = percent_decode(target.split('?').next().unwrap_or_default());
    let host = headers.get("host").cloned().unwrap_or_default();
    let resp = route(&method, &path, &headers, &body, &host, &mut state.lock().unwrap());
    let mut conn = conn;
    let reason = match resp.status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        conn.write_all(&resp.body)?;
    }
    conn.flush()
}

fn route(
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    host: &str,
    st: &mut State,
) -> Response {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let endpoint = match (method, segs.as_slice()) {
        ("GET", ["api", "models", _, _, "revision", ..]) => "info",
        ("HEAD" | "GET", [_, _, "resolve", _, ..]) => "resolve",
        ("POST", ["api", "repos", "create"]) => "create",
        ("POST", ["api", "models", _, _, "branch", _]) => "branch",
        ("POST", ["api", "models", _, _, "preupload", _]) => "preupload",
        ("POST", ["api", "models", _, _, "commit", _]) => "commit",
        _ => return json_response(404, json!({"error": format!("no route {method} {path}")})),
    };
    let auth = headers.get("authorization").cloned();
    st.log.push((endpoint, auth.clone()));
    if let Some(faults) = st.faults.get_mut(endpoint)
        && !faults.is_empty()
    {
        let status = faults.remove(0);
        return json_response(status, json!({"error": "injected failure"}));
    }
    let writes = matches!(endpoint, "create" | "branch" | "preupload" | "commit");
    if writes && auth != Some(format!("Bearer {}", st.token)) {
        return json_response(401, json!({"error": "Invalid username or password."}));
    }
    let repo = || format!("{}/{}", segs[2], segs[3]);
    match endpoint {
        "info" => {
            let repo = repo();
            let Some(files) = st.models.get(&repo) else {
                return json_response(404, json!({"error": "Repository not found"}));
            };
            let siblings: Vec<Value> = files.keys().map(|f| json!({"rfilename": f})).collect();
            json_response(200, json!({"id": repo, "sha": SHA, "siblings": siblings}))
        }
        "resolve" => {
            let (repo, rev, file) = (format!("{}/{}", segs[0], segs[1]), segs[3], segs[4..].join("/"));
            let found =
                st.models.get(&repo).and_then(|m| m.get(&file)).filter(|_| rev == "main" || rev == SHA);
            let Some(bytes) = found else {
                let mut r = json_response(404, json!({"error": "Entry not found"}));
                r.headers.push(("X-Error-Code", "EntryNotFound".into()));
                return r;
            };
            Response {
                status: 200,
                headers: vec![
                    ("Content-Type", "application/octet-stream".into()),
                    ("ETag", format!("\"{}\"", etag(bytes))),
                    ("X-Repo-Commit", SHA.into()),
                ],
                body: bytes.clone(),
            }
        }
        "create" => {
            let v: Value = serde_json::from_slice(body).unwrap();
            let url = format!(
                "http://{host}/{}/{}",
                v["organization"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap()
            );
            st.created.push(v);
            json_response(200, json!({ "url": url }))
        }
        "branch" => {
            st.branches.push((repo(), segs[5].to_string()));
            json_response(200, json!({}))
        }
        "preupload" => {
            let v: Value = serde_json::from_slice(body).unwrap();
            let files: Vec<Value> = v["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| json!({"path": f["path"], "uploadMode": "regular", "shouldIgnore": false}))
                .collect();
            json_response(200, json!({ "files": files, "commitOid": SHA }))
        }
        "commit" => {
            let mut commit = Commit {
                repo: repo(),
                revision: segs[5].to_string(),
                summary: String::new(),
                files: BTreeMap::new(),
            };
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: Value = serde_json::from_slice(line).unwrap();
                match v["key"].as_str().unwrap() {
                    "header" => commit.summary = v["value"]["summary"].as_str().unwrap_or_default().into(),
                    "file" => {
                        assert_eq!(v["value"]["encoding"], "base64");
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v["value"]["content"].as_str().unwrap())
                            .unwrap();
                        commit.files.insert(v["value"]["path"].as_str().unwrap().into(), bytes);
                    }
                    other => panic!("unexpected commit entry {other}"),
                }
            }
            let url = format!("http://{host}/{}/commit/{SHA}", commit.repo);
            st.commits.push(commit);
            json_response(200, json!({"commitUrl": url, "commitOid": SHA}))
        }
        _ => unreachable!(),
    }
}

/// A 2-step run of the TRL fixture model on its data, plus `extra` TOML lines.
fn write_config(dir: &Path, model: &str, extra: &str) -> PathBuf {
    let f = fixtures();
    let cfg = format!(
        "model = \"{model}\"\ntrain_file = \"{t}\"\noutput_dir = \"{o}\"\nlearning_rate = 5e-3\nbatch_size = 4\n\
         max_length = 40\nmax_steps = 2\nlogging_steps = 1\nprogress_bar = false\n{extra}\n",
        t = f.join("train.jsonl").display(),
        o = dir.join("out").display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// `dpo-train` with the Hub at `hub`, `HF_HOME` = `home`, fast retries, and no ambient Hub
/// settings.
fn dpo_train(hub: &Hub, home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dpo-train"));
    for k in [
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "RUST_LOG",
    ] {
        c.env_remove(k);
    }
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        c.env_remove(k);
    }
    c.env("NO_PROXY", "127.0.0.1,localhost")
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HOME", home)
        .env("DPO_TRAIN_HUB_RETRIES", "3")
        .env("DPO_TRAIN_HUB_RETRY_DELAY_MS", "10")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run(mut c: Command) -> (Output, String) {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stderr)
}

fn run_ok(c: Command) -> String {
    let (out, stderr) = run(c);
    assert!(out.status.success(), "dpo-train failed:\n{stderr}");
    stderr
}

/// The files under `dir` (relative, `/`-separated) with their bytes.
fn files_on_disk(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.insert(p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap());
        }
    }
    out
}

/// The commit holds exactly the files of `dir` under `prefix` (plus README.md at the root when
/// `card`), byte for byte.
fn assert_commit_is_folder(commit: &Commit, dir: &Path, prefix: &str, card: bool) {
    let mut expected: BTreeMap<String, Vec<u8>> =
        files_on_disk(dir).into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect();
    let mut got = commit.files.clone();
    if card {
        assert!(got.remove("README.md").is_some(), "no model card in the commit");
    }
    assert!(expected.contains_key(&format!("{prefix}model.safetensors")));
    for (k, v) in &got {
        let want = expected.remove(k).unwrap_or_else(|| panic!("{k} uploaded but not in {}", dir.display()));
        assert!(*v == want, "{k}: the uploaded bytes differ from the file on disk");
    }
    assert!(expected.is_empty(), "not uploaded: {:?}", expected.keys().collect::<Vec<_>>());
}

fn assert_no_token(token: &str, texts: &[(&str, &str)]) {
    for (what, text) in texts {
        assert!(!text.contains(token), "the token appears in {what}:\n{text}");
    }
}

#[test]
fn downloads_a_hub_model_trains_from_it_then_works_offline() {
    let hub = Hub::start("unused");
    hub.serve_model("org/tiny", &fixtures().join("model"));
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    run_ok({
        let mut c = dpo_train(&hub, &home);
        c.arg("--config").arg(write_config(dir.path(), "hub:org/tiny", ""));
        c
    });
    // The standard cache layout, with refs/main for offline use.
    let repo = home.join("hub/models--org--tiny");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap().trim(), SHA);
    let snapshot = repo.join("snapshots").join(SHA);
    for (name, bytes) in files_on_disk(&fixtures().join("model")) {
        assert!(std::fs::read(snapshot.join(&name)).unwrap() == bytes, "{name} differs in the cache");
    }
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/run_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps_run"], 2);
    assert!(summary["config"]["model"].as_str().unwrap().ends_with(&format!("snapshots/{SHA}")));
    assert!(dir.path().join("out/final/model.safetensors").is_file());
    assert!(hub.requests("info") >= 1 && hub.requests("resolve") >= 4);

    // Offline: the cache only, no request at all (the `org/name` form: no such local path).
    let before = hub.total_requests();
    let offline = tempfile::tempdir().unwrap();
    run_ok({
        let mut c = dpo_train(&hub, &home);
        c.arg("--config").arg(write_config(offline.path(), "org/tiny", "")).env("HF_HUB_OFFLINE", "1");
        c
    });
    assert!(offline.path().join("out/final/model.safetensors").is_file());
    // Not cached: a clear error, still no request.
    let (out, stderr) = run({
        let mut c = dpo_train(&hub, &home);
        c.arg("--config")
            .arg(write_config(offline.path(), "hub:org/missing@main", ""))
            .env("HF_HUB_OFFLINE", "1");
        c
    });
    assert!(!out.status.success());
    assert!(stderr.contains("HF_HUB_OFFLINE") && stderr.contains("not in the cache"), "{stderr}");
    assert_eq!(hub.total_requests(), before, "offline mode made requests");
}

#[test]
fn push_uploads_final_with_a_card_and_the_token_stays_secret() {
    let token = "hf_TESTtoken_c0ffee_91c2";
    let hub = Hub::start(token);
    hub.serve_model("org/tiny", &fixtures().join("model"));
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    let extra = "push_to_hub = true\nhub_model_id = \"me/tiny-dpo\"\neval_file = \"".to_string()
        + &fixtures().join("eval.jsonl").display().to_string()
        + "\"\neval_steps = 2\n";
    let stderr = run_ok({
        let mut c = dpo_train(&hub, &home);
        c.arg("--config").arg(write_config(dir.path(), "hub:org/tiny", &extra)).env("HF_TOKEN", token);
        c
    });
    let out = dir.path().join("out");
    {
        let st = hub.state.lock().unwrap();
        assert_eq!(st.created.len(), 1);
        assert_eq!(
            (st.created[0]["organization"].as_str(), st.created[0]["name"].as_str()),
            (Some("me"), Some("tiny-dpo"))
        );
        assert_eq!(st.created[0]["private"], false);
        let bearer = format!("Bearer {token}");
        assert!(
            st.log.iter().filter(|(e, _)| *e == "commit").all(|(_, a)| a.as_deref() == Some(bearer.as_str()))
        );
    }
    let commits = hub.commits();
    assert_eq!(commits.len(), 1);
    assert_eq!((commits[0].repo.as_str(), commits[0].revision.as_str()), ("me/tiny-dpo", "main"));
    assert_commit_is_folder(&commits[0], &out.join("final"), "", true);

    let card = String::from_utf8(commits[0].files["README.md"].clone()).unwrap();
    let summary_text = std::fs::read_to_string(out.join("run_summary.json")).unwrap();
    let summary: Value = serde_json::from_str(&summary_text).unwrap();
    let meta = card.strip_prefix("---\n").unwrap().split_once("\n---\n").unwrap().0;
    for line in ["library_name: transformers", "tags:", "- dpo", "base_model: org/tiny"] {
        assert!(meta.lines().any(|l| l == line), "{line} missing from the card's metadata:\n{meta}");
    }
    let data_hash = summary["fingerprint"]["train_data"].as_str().unwrap();
    for text in ["`train.jsonl`", data_hash, "## Constraints", "## Config", "| eval_loss |", "| loss |"] {
        assert!(card.contains(text), "{text} missing from the card:\n{card}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_no_token(
        token,
        &[
            ("stderr", &stderr),
            ("the card", &card),
            ("run_summary.json", &summary_text),
            ("metrics.jsonl", &metrics),
        ],
    );

    // Later: `dpo-train push`, the token from $HF_HOME/token, a private repo on a branch.
    std::fs::write(home.join("token"), format!("{token}\n")).unwrap();
    let stderr = run_ok({
        let mut c = dpo_train(&hub, &home);
        c.arg("push").arg(out.join("final")).args(["--repo", "me/other", "--private", "--revision", "dev"]);
        c
    });
    assert_no_token(token, &[("stderr of push", &stderr)]);
    let st = hub.state.lock().unwrap();
    assert_eq!((st.created[1]["name"].as_str(), &st.created[1]["private"]), (Some("other"), &json!(true)));
    assert_eq!(st.branches, [("me/other".to_string(), "dev".to_string())]);
    let c = &st.commits[1];
    assert_eq!((c.repo.as_str(), c.revision.as_str()), ("me/other", "dev"));
    assert_commit_is_folder(c, &out.join("final"), "", true);
    let card = String::from_utf8(c.files["README.md"].clone()).unwrap();
    assert!(card.contains("base_model: org/tiny") && card.contains(data_hash), "{card}");
}

#[test]
fn a_refused_token_fails_clearly_without_retrying_and_keeps_the_outputs() {
    let token = "hf_wrong_token_7f3a9";
    let hub = Hub::start("the-right-one");
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("model").display().to_string();
    let extra = "push_to_hub = true\nhub_model_id = \"me/x\"\nhub_revision = \"exp\"";
    let (out, stderr) = run({
        let mut c = dpo_train(&hub, &dir.path().join("hf"));
        c.arg("--config").arg(write_config(dir.path(), &model, extra)).env("HF_TOKEN", token);
        c
    });
    assert!(!out.status.success(), "{stderr}");
    let final_dir = dir.path().join("out/final");
    for text in ["Authentication required", "refused the token", "push them later", "dpo-train push"] {
        assert!(stderr.contains(text), "{text} missing from:\n{stderr}");
    }
    assert!(stderr.contains(&format!("{} --repo me/x --revision exp", final_dir.display())), "{stderr}");
    assert_eq!(hub.requests("create"), 1, "a 401 was retried");
    assert!(hub.commits().is_empty());
    assert!(
        final_dir.join("model.safetensors").is_file() && dir.path().join("out/run_summary.json").is_file()
    );
    let summary = std::fs::read_to_string(dir.path().join("out/run_summary.json")).unwrap();
    assert_no_token(token, &[("stderr", &stderr), ("run_summary.json", &summary)]);
}

#[test]
fn a_server_error_is_retried_then_the_upload_succeeds() {
    let token = "hf_retry_token_5150";
    let hub = Hub::start(token);
    hub.fail("commit", &[500]);
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("model").display().to_string();
    let stderr = run_ok({
        let mut c = dpo_train(&hub, &dir.path().join("hf"));
        c.arg("--config")
            .arg(write_config(dir.path(), &model, "push_to_hub = true\nhub_model_id = \"me/x\""))
            .env("HF_TOKEN", token);
        c
    });
    assert!(stderr.contains("attempt 1/3 failed") && stderr.contains("retrying"), "{stderr}");
    assert_eq!(hub.requests("commit"), 2);
    let commits = hub.commits();
    assert_eq!(commits.len(), 1);
    assert_commit_is_folder(&commits[0], &dir.path().join("out/final"), "", true);
    // A base model from a local folder: no base_model metadata.
    assert!(!String::from_utf8_lossy(&commits[0].files["README.md"]).contains("base_model:"));
}

#[test]
fn every_save_uploads_checkpoints_and_a_failed_one_only_warns() {
    let token = "hf_file_token_e5e5";
    let hub = Hub::start(token);
    // The first checkpoint's upload fails all 3 attempts; the run goes on.
    hub.fail("commit", &[500, 502, 503]);
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), token).unwrap();
    let model = fixtures().join("model").display().to_string();
    let extra = "push_to_hub = true\nhub_model_id = \"me/x\"\nhub_strategy = \"every_save\"\nsave_steps = 1";
    let stderr = run_ok({
        let mut c = dpo_train(&hub, &home);
        c.arg("--config").arg(write_config(dir.path(), &model, extra));
        c
    });
    assert!(stderr.contains("gave up after 3 attempts") && stderr.contains("training goes on"), "{stderr}");
    let out = dir.path().join("out");
    let commits = hub.commits();
    let summaries: Vec<&str> = commits.iter().map(|c| c.summary.as_str()).collect();
    assert_eq!(summaries, ["Training in progress, step 2", "Upload model trained with dpo-train"]);
    assert_commit_is_folder(&commits[0], &out.join("checkpoint-2"), "checkpoint-2/", false);
    assert_commit_is_folder(&commits[1], &out.join("final"), "", true);
    assert!(out.join("checkpoint-1/trainer_state.json").is_file());
    assert_eq!(hub.requests("create"), 1);
}

#[test]
fn push_without_a_token_fails_before_training() {
    let hub = Hub::start("x");
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("model").display().to_string();
    let (out, stderr) = run({
        let mut c = dpo_train(&hub, &dir.path().join("hf"));
        c.arg("--config").arg(write_config(
            dir.path(),
            &model,
            "push_to_hub = true\nhub_model_id = \"me/x\"",
        ));
        c
    });
    assert!(!out.status.success());
    assert!(stderr.contains("needs a token") && stderr.contains("HF_TOKEN"), "{stderr}");
    assert!(!dir.path().join("out").exists(), "training started");
    assert_eq!(hub.total_requests(), 0);
}
