//! The Hugging Face Hub, through the `hf-hub` crate's blocking API.
//!
//! - Download: `model = "org/name"` (or `hub:org/name[@revision]`) fetches the files a run reads
//!   (config, tokenizer, safetensors or the sharded index and its shards, generation config) into
//!   the standard cache (`$HF_HOME/hub`, shared with Python) and points the run at the snapshot
//!   folder. `HF_HUB_OFFLINE=1` uses the cache only.
//! - Upload: `push_to_hub` creates the repo if needed and commits `final/` with a generated model
//!   card (`hub_strategy = "every_save"`: each checkpoint too, into `checkpoint-<step>/`);
//!   `dpo-train push DIR --repo org/name` does the same for a folder later. hf-hub's commit API
//!   asks the Hub which files go through Xet (large ones) and sends the others inline.
//! - Failures: network errors, 408/429 and 5xx are retried with exponential backoff
//!   (`DPO_TRAIN_HUB_RETRIES` attempts, first delay `DPO_TRAIN_HUB_RETRY_DELAY_MS`); 401/403 are
//!   not. A failed upload never touches the local outputs.
//! - The token (`HF_TOKEN`, else `HF_TOKEN_PATH`, else `$HF_HOME/token`) is only ever sent as a
//!   header: it is redacted from every message this module makes and written nowhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use dpo_trainer::{HubStrategy, Observer, TrainConfig};
use hf_hub::repository::CommitOperation;
use hf_hub::{HFClient, HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use serde_json::{Map, Value};

/// Files of a model folder a run reads or carries into `final/` (besides the weights).
const MODEL_FILES: &[&str] = dpo_trainer::MODEL_SIDE_FILES;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A model on the Hub: `org/name` at a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// `hub:org/name[@revision]` always; `org/name[@revision]` when no such local path exists.
    /// `None`: a local path.
    pub fn parse(spec: &str, exists_locally: bool) -> Result<Option<HubId>> {
        let (text, explicit) = match spec.strip_prefix("hub:") {
            Some(rest) => (rest, true),
            None => (spec, false),
        };
        if !explicit && exists_locally {
            return Ok(None);
        }
        let (repo, revision) = match text.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (text, None),
        };
        let valid = is_repo_id(repo) && revision.as_deref().is_none_or(|r| !r.is_empty());
        match (valid, explicit) {
            (true, _) => Ok(Some(HubId { repo: repo.to_string(), revision })),
            (false, true) => bail!("`{spec}`: expected `hub:org/name` or `hub:org/name@revision`"),
            (false, false) => Ok(None),
        }
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// `org/name`: two non-empty parts of ASCII letters, digits, `-`, `_`, `.`, each starting with a
/// letter or digit.
pub fn is_repo_id(id: &str) -> bool {
    let part = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!(id.split_once('/'), Some((org, name)) if part(org) && part(name))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface` (as hf-hub and
/// huggingface_hub resolve it).
fn hf_home() -> PathBuf {
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home);
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("huggingface");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/huggingface")
}

fn token_file() -> PathBuf {
    std::env::var_os("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home().join("token"))
}

/// The user's token: `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`).
pub fn token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let text = std::fs::read_to_string(token_file()).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn endpoint() -> String {
    let e = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string());
    e.trim_end_matches('/').to_string()
}

/// `msg` with every occurrence of the token replaced.
fn redact(msg: &str, token: Option<&str>) -> String {
    match token {
        Some(t) if !t.is_empty() => msg.replace(t, "<token>"),
        _ => msg.to_string(),
    }
}

/// An hf-hub error with its causes, token redacted (hf-hub's messages carry the URL and the
/// server's message, never request headers; the redaction guards against a server echoing it).
fn describe(e: &HFError, token: Option<&str>) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !msg.contains(&s_text) {
            msg = format!("{msg}: {s_text}");
        }
        source = s.source();
    }
    redact(&msg, token)
}

/// Worth another try: the network, timeouts, rate limits, server errors, Xet transfers.
fn transient(e: &HFError) -> bool {
    match e {
        HFError::Request { .. } | HFError::RateLimited { .. } | HFError::Xet { .. } => true,
        HFError::Http { context } => {
            context.status.is_server_error() || matches!(context.status.as_u16(), 408 | 429)
        }
        _ => false,
    }
}

/// A blocking client, and the cache folder it uses (`HF_HUB_CACHE`, else `$HF_HOME/hub`).
fn client(token: Option<&str>, retries: usize) -> Result<(HFClientSync, PathBuf)> {
    let mut builder = HFClient::builder()
        .user_agent(format!("dpo-train/{}", env!("CARGO_PKG_VERSION")))
        .retry_max_attempts(retries);
    if let Some(t) = token {
        builder = builder.token(t);
    }
    let err = |e: HFError| anyhow!("setting up the Hub client: {}", describe(&e, token));
    let client = builder.build().map_err(err)?;
    let cache = client.cache_dir().to_path_buf();
    Ok((HFClientSync::from_inner(client).map_err(err)?, cache))
}

fn model_repo(client: &HFClientSync, repo: &str) -> HFRepositorySync<RepoTypeModel> {
    let (owner, name) = hf_hub::split_id(repo);
    client.model(owner, name)
}

/// A downloaded model: its snapshot folder in the cache.
#[derive(Debug, Clone)]
pub struct HubModel {
    pub commit: String,
    pub dir: PathBuf,
}

/// If `cfg.model` names a Hub model, downloads it (or finds it in the cache when offline) and
/// points `cfg.model` at the snapshot folder.
pub fn resolve_model(cfg: &mut TrainConfig) -> Result<Option<HubModel>> {
    let spec = cfg.model.to_string_lossy().to_string();
    let Some(id) = HubId::parse(&spec, cfg.model.exists())? else { return Ok(None) };
    let model = download(&id).with_context(|| format!("model `{spec}` (Hugging Face Hub)"))?;
    tracing::info!(model = %id.repo, revision = id.revision(), commit = %model.commit, path = %model.dir.display(), "model from the Hub");
    cfg.model = model.dir.clone();
    Ok(Some(model))
}

/// Downloads the files of `id` that a run needs into the cache; returns the snapshot folder.
pub fn download(id: &HubId) -> Result<HubModel> {
    let token = token();
    let (client, cache) = client(token.as_deref(), 5)?;
    let repo = model_repo(&client, &id.repo);
    let err = |e: HFError| anyhow!("{}", describe(&e, token.as_deref()));
    let rev = id.revision();
    if offline() {
        let dir = repo.snapshot_download().revision(rev).local_files_only(true).send().map_err(|_| {
            anyhow!(
                "HF_HUB_OFFLINE is set and {}@{rev} is not in the cache ({}); run once without \
                 HF_HUB_OFFLINE to download it",
                id.repo,
                cache.display()
            )
        })?;
        if !dir.join("config.json").is_file() {
            bail!("HF_HUB_OFFLINE is set and the cached snapshot {} has no config.json", dir.display());
        }
        let commit = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        return Ok(HubModel { commit, dir });
    }
    let info = repo.info().revision(rev).send().map_err(err)?;
    let commit = info.sha.ok_or_else(|| anyhow!("the Hub sent no commit for {}@{rev}", id.repo))?;
    let files: Vec<String> = info.siblings.unwrap_or_default().into_iter().map(|s| s.rfilename).collect();
    let has = |f: &str| files.iter().any(|x| x == f);
    if !has("config.json") {
        bail!("{}@{rev} has no config.json: not a transformers model", id.repo);
    }
    let mut wanted: Vec<String> = MODEL_FILES.iter().filter(|f| has(f)).map(|f| f.to_string()).collect();
    let index = "model.safetensors.index.json";
    let sharded = !has("model.safetensors") && has(index);
    if has("model.safetensors") {
        wanted.push("model.safetensors".into());
    } else if sharded {
        wanted.push(index.into());
    } else {
        bail!(
            "{}@{rev} has no model.safetensors or {index}: dpo-train reads safetensors weights only",
            id.repo
        );
    }
    let fetch = |file: &str| -> Result<PathBuf> {
        tracing::info!(file, "downloading from {}", id.repo);
        repo.download_file()
            .filename(file)
            .revision(commit.clone())
            .send()
            .map_err(|e| anyhow!("{file}: {}", describe(&e, token.as_deref())))
    };
    let mut config = None;
    for file in &wanted {
        let path = fetch(file)?;
        if file == "config.json" {
            config = Some(path.clone());
        }
        if file == index {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let v: Value =
                serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
            let mut shards: Vec<&str> =
                v["weight_map"].as_object().into_iter().flatten().filter_map(|(_, f)| f.as_str()).collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                fetch(shard)?;
            }
        }
    }
    let dir = config.and_then(|p| p.parent().map(Path::to_path_buf)).expect("config.json was fetched");
    // The cache's `refs/<revision>` (what offline mode reads): files were fetched by commit so that
    // a branch moving mid-download cannot mix two commits.
    if rev != commit {
        let folder = format!("models--{}", id.repo.replace('/', "--"));
        let ref_path = cache.join(folder).join("refs").join(rev);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&ref_path, &commit).with_context(|| format!("writing {}", ref_path.display()))?;
    }
    Ok(HubModel { commit, dir })
}

/// Upload attempts and the first delay between them (doubling after each).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: usize,
    pub base_delay: Duration,
}

impl Retry {
    /// 5 attempts, 2 s then 4, 8, 16 s; `DPO_TRAIN_HUB_RETRIES`, `DPO_TRAIN_HUB_RETRY_DELAY_MS`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<u64>().ok());
        Retry {
            attempts: var("DPO_TRAIN_HUB_RETRIES").map_or(5, |n| n.max(1) as usize),
            base_delay: Duration::from_millis(var("DPO_TRAIN_HUB_RETRY_DELAY_MS").unwrap_or(2000)),
        }
    }
}

/// Where to push: the repo, its visibility if it is created, the branch.
#[derive(Debug, Clone)]
pub struct Target {
    pub repo: String,
    pub private: bool,
    pub revision: Option<String>,
}

impl Target {
    /// The command that pushes `dir` later.
    pub fn push_command(&self, dir: &Path) -> String {
        let mut cmd = format!("dpo-train push {} --repo {}", dir.display(), self.repo);
        if let Some(r) = &self.revision {
            cmd.push_str(&format!(" --revision {r}"));
        }
        if self.private {
            cmd.push_str(" --private");
        }
        cmd
    }
}

/// Uploads folders to one Hub repo, creating it (and the branch) on first use.
pub struct Pusher {
    client: HFClientSync,
    token: String,
    pub target: Target,
    pub strategy: HubStrategy,
    retry: Retry,
    ready: bool,
}

impl Pusher {
    /// Fails without a token, or offline.
    pub fn new(target: Target, strategy: HubStrategy) -> Result<Self> {
        if offline() {
            bail!(
                "HF_HUB_OFFLINE is set, so nothing can be pushed to the Hub: unset it, or turn push_to_hub off"
            );
        }
        let token = token().ok_or_else(|| {
            anyhow!(
                "pushing to the Hub needs a token with write access: set HF_TOKEN or write it to {}",
                token_file().display()
            )
        })?;
        // hf-hub's own per-request retries are off: `retrying` retries whole steps, with warnings.
        let (client, _) = client(Some(&token), 0)?;
        Ok(Pusher { client, token, target, strategy, retry: Retry::from_env(), ready: false })
    }

    /// From `push_to_hub` and the `hub_*` keys (`None` when push_to_hub is off).
    pub fn from_config(cfg: &TrainConfig) -> Result<Option<Self>> {
        if !cfg.push_to_hub {
            return Ok(None);
        }
        let repo = cfg.hub_model_id.clone().context("`push_to_hub` needs `hub_model_id`")?;
        let target = Target { repo, private: cfg.hub_private, revision: cfg.hub_revision.clone() };
        Ok(Some(Pusher::new(target, cfg.hub_strategy)?))
    }

    fn repo(&self) -> HFRepositorySync<RepoTypeModel> {
        model_repo(&self.client, &self.target.repo)
    }

    /// Runs `op` until it succeeds, fails for good (401, 403, 404, ...), or runs out of attempts.
    fn retrying<T>(&self, what: &str, mut op: impl FnMut() -> Result<T, HFError>) -> Result<T> {
        let mut delay = self.retry.base_delay;
        let mut attempt = 1;
        loop {
            let e = match op() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let msg = describe(&e, Some(&self.token));
            if !transient(&e) {
                let hint = match e {
                    HFError::AuthRequired { .. } => {
                        "\nthe Hub refused the token: check that HF_TOKEN (or the token file) holds a valid token"
                    }
                    HFError::Forbidden { .. } => "\nthe token may not write to this repo or organization",
                    _ => "",
                };
                bail!("{what}: {msg}{hint}");
            }
            if attempt >= self.retry.attempts {
                bail!("{what}: {msg} (gave up after {attempt} attempts)");
            }
            tracing::warn!(
                "{what}: attempt {attempt}/{} failed: {msg}; retrying in {delay:?}",
                self.retry.attempts
            );
            std::thread::sleep(delay);
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }

    /// Creates the repo (if needed) and the branch (if not main), once.
    fn ensure_repo(&mut self) -> Result<()> {
        if self.ready {
            return Ok(());
        }
        let (id, private) = (self.target.repo.clone(), self.target.private);
        self.retrying(&format!("creating the Hub repo {id}"), || {
            self.client
                .create_repository()
                .repo_id(&id)
                .repo_type(RepoTypeModel)
                .private(private)
                .exist_ok(true)
                .send()
        })?;
        if let Some(branch) = self.target.revision.clone().filter(|b| b != "main") {
            let repo = self.repo();
            self.retrying(&format!("creating the branch {branch} of {id}"), || {
                match repo.create_branch().branch(&branch).send() {
                    Err(HFError::Conflict { .. }) => Ok(()),
                    r => r,
                }
            })?;
        }
        self.ready = true;
        Ok(())
    }

    /// Commits the files of `dir` (recursively; hidden ones left out) under `path_in_repo`, plus
    /// `extra` (path, bytes) files that replace same-named ones; returns the commit URL.
    pub fn upload(
        &mut self,
        dir: &Path,
        path_in_repo: &str,
        extra: &[(&str, Vec<u8>)],
        message: &str,
    ) -> Result<String> {
        self.ensure_repo()?;
        let prefix = if path_in_repo.is_empty() { String::new() } else { format!("{path_in_repo}/") };
        let mut ops = Vec::new();
        for (rel, path) in files_of(dir)? {
            if !extra.iter().any(|(p, _)| *p == rel) {
                ops.push(CommitOperation::add_file(format!("{prefix}{rel}"), path));
            }
        }
        for (p, bytes) in extra {
            ops.push(CommitOperation::add_bytes(format!("{prefix}{p}"), bytes.clone()));
        }
        let repo = self.repo();
        let target = format!(
            "{}{}",
            self.target.repo,
            self.target.revision.as_ref().map_or(String::new(), |r| format!("@{r}"))
        );
        let info = self.retrying(&format!("uploading {} to {target}", dir.display()), || {
            repo.create_commit()
                .operations(ops.clone())
                .commit_message(message)
                .maybe_revision(self.target.revision.clone())
                .send()
        })?;
        let url = info.commit_url.unwrap_or_else(|| format!("{}/{}", endpoint(), self.target.repo));
        tracing::info!("pushed {} to {target}: {url}", dir.display());
        Ok(url)
    }

    /// `hub_strategy = "every_save"`: a checkpoint into `checkpoint-<step>/` of the repo.
    pub fn push_checkpoint(&mut self, dir: &Path) -> Result<String> {
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let step = name.strip_prefix("checkpoint-").unwrap_or(&name).to_string();
        self.upload(dir, &name, &[], &format!("Training in progress, step {step}"))
    }

    /// The end of a run: `output_dir/final` with the model card, at the repo's root. The error
    /// says how to push later.
    pub fn push_final(&mut self, output_dir: &Path, summary: &Value) -> Result<String> {
        let final_dir = output_dir.join("final");
        let card = model_card(&CardInput::from_summary(&self.target.repo, summary, output_dir));
        self.upload(
            &final_dir,
            "",
            &[("README.md", card.into_bytes())],
            "Upload model trained with dpo-train",
        )
        .map_err(|e| {
            anyhow!(
                "pushing to the Hugging Face Hub failed: {e:#}\nthe local outputs in {} are complete; \
                     push them later with:\n  {}",
                output_dir.display(),
                self.target.push_command(&final_dir)
            )
        })
    }
}

/// The regular files under `dir`, as (`/`-separated relative path, path), sorted; names
/// starting with `.` (temporary files) are left out.
fn files_of(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if path.is_file() {
                let rel = path.strip_prefix(root).expect("under root");
                let rel: Vec<String> =
                    rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
                out.push((rel.join("/"), path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Passes everything to `inner`; with `every_save`, uploads each checkpoint as it is written (a
/// failure is a warning: training goes on).
pub struct HubObserver<'a> {
    pub inner: &'a mut dyn Observer,
    pub pusher: Option<&'a mut Pusher>,
}

impl Observer for HubObserver<'_> {
    fn on_start(&mut self, total_steps: u64) {
        self.inner.on_start(total_steps);
    }

    fn on_step(&mut self, step: u64, loss: f64, tokens_per_second: f64) {
        self.inner.on_step(step, loss, tokens_per_second);
    }

    fn on_log(&mut self, record: &Map<String, Value>) {
        self.inner.on_log(record);
    }

    fn stop_requested(&mut self) -> bool {
        self.inner.stop_requested()
    }

    fn on_checkpoint(&mut self, dir: &Path) {
        self.inner.on_checkpoint(dir);
        if let Some(p) = self.pusher.as_deref_mut()
            && p.strategy == HubStrategy::EverySave
            && let Err(e) = p.push_checkpoint(dir)
        {
            tracing::warn!("{e:#} (training goes on; the checkpoint is kept locally)");
        }
    }
}

/// What the model card says, gathered from a run's record.
#[derive(Debug, Clone, Default)]
pub struct CardInput {
    pub repo: String,
    /// The Hub id of the base model (from a cache snapshot path), for the `base_model` metadata.
    pub base_model: Option<String>,
    /// The `model` of the config as given (a path when not from the Hub).
    pub model: Option<String>,
    pub train_file: Option<String>,
    pub train_sha256: Option<String>,
    pub steps: Option<u64>,
    pub stopped_because: Option<String>,
    /// The last train record and the last eval record of `metrics.jsonl`.
    pub metrics: Map<String, Value>,
    pub constraints: Option<Value>,
    pub config: Option<Value>,
    pub version: Option<String>,
}

impl CardInput {
    /// From a run summary (`run_summary.json`) and the run's `metrics.jsonl` in `output_dir`.
    pub fn from_summary(repo: &str, summary: &Value, output_dir: &Path) -> Self {
        let mut input = CardInput::from_record(repo, &summary["config"], &summary["fingerprint"]);
        input.steps = summary["steps_run"].as_u64();
        input.stopped_because = summary["stopped_because"].as_str().map(String::from);
        input.constraints = Some(summary["constraints"].clone()).filter(|v| !v.is_null());
        input.version = summary["version"].as_str().map(String::from);
        input.metrics = last_metrics(&output_dir.join("metrics.jsonl"), None);
        if input.metrics.is_empty()
            && let Some(log) = summary["last_log"].as_object()
        {
            input.metrics = log.clone();
        }
        input
    }

    /// From a checkpoint's `trainer_state.json` and the run's `metrics.jsonl` up to its step.
    pub fn from_trainer_state(repo: &str, state: &Value, output_dir: &Path) -> Self {
        let mut input = CardInput::from_record(repo, &state["config"], &state["fingerprint"]);
        input.steps = state["step"].as_u64();
        input.constraints = Some(state["constraints"].clone()).filter(|v| !v.is_null());
        input.metrics = last_metrics(&output_dir.join("metrics.jsonl"), input.steps);
        input
    }

    fn from_record(repo: &str, config: &Value, fingerprint: &Value) -> Self {
        let model = config["model"].as_str().map(String::from);
        CardInput {
            repo: repo.to_string(),
            base_model: model.as_deref().and_then(hub_id_from_cache_path),
            model,
            train_file: config["train_file"]
                .as_str()
                .map(|f| Path::new(f).file_name().map_or(f.to_string(), |n| n.to_string_lossy().to_string())),
            train_sha256: fingerprint["train_data"].as_str().map(String::from),
            config: Some(config.clone()).filter(|v| !v.is_null()),
            ..CardInput::default()
        }
    }

    /// For `dpo-train push DIR`: from `DIR/trainer_state.json` (a checkpoint) or a
    /// `run_summary.json` next to `DIR`; bare (repo and base model unknown) otherwise.
    pub fn for_folder(repo: &str, dir: &Path) -> Self {
        let read =
            |p: PathBuf| -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok() };
        let run_dir = dir.parent().unwrap_or(Path::new("."));
        if let Some(state) = read(dir.join("trainer_state.json")) {
            return CardInput::from_trainer_state(repo, &state, run_dir);
        }
        if let Some(summary) = read(run_dir.join("run_summary.json")) {
            return CardInput::from_summary(repo, &summary, run_dir);
        }
        CardInput { repo: repo.to_string(), ..CardInput::default() }
    }
}

/// The last train record and the last `eval_*` record (at most `up_to` step), merged.
fn last_metrics(path: &Path, up_to: Option<u64>) -> Map<String, Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut train, mut eval) = (Map::new(), Map::new());
    for line in text.lines() {
        let Ok(Value::Object(rec)) = serde_json::from_str::<Value>(line) else { continue };
        if up_to.is_some_and(|s| rec.get("step").and_then(Value::as_u64).is_some_and(|r| r > s)) {
            continue;
        }
        if rec.keys().any(|k| k.starts_with("eval_")) {
            eval = rec;
        } else {
            train = rec;
        }
    }
    for (k, v) in eval {
        if k != "step" {
            train.insert(k, v);
        }
    }
    train
}

/// `org/name` from a Hub cache snapshot path (`.../models--org--name/snapshots/<commit>`).
pub fn hub_id_from_cache_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split(['/', '\\']).collect();
    parts.windows(2).find_map(|w| {
        let rest = w[0].strip_prefix("models--")?;
        let (org, name) = rest.split_once("--")?;
        let id = format!("{org}/{name}");
        (w[1] == "snapshots" && is_repo_id(&id)).then_some(id)
    })
}

/// The model card (`README.md`): the metadata block the Hub reads (`library_name`, `tags`,
/// `base_model`), then the base model, the data (file name and sha256), the final metrics, the
/// constraint record and the config.
pub fn model_card(c: &CardInput) -> String {
    let mut s = String::from("---\nlibrary_name: transformers\ntags:\n- dpo\n- dpo-train\n");
    if let Some(base) = &c.base_model {
        s.push_str(&format!("base_model: {base}\n"));
    }
    s.push_str("pipeline_tag: text-generation\n---\n\n");
    let name = c.repo.rsplit('/').next().unwrap_or(&c.repo);
    s.push_str(&format!("# {name}\n\n"));
    let base = match (&c.base_model, &c.model) {
        (Some(id), _) => format!("[{id}]({DEFAULT_ENDPOINT}/{id})"),
        (None, Some(path)) => format!("the local model folder `{path}`"),
        (None, None) => "a base model".to_string(),
    };
    s.push_str(&format!(
        "This model is {base} fine-tuned with Direct Preference Optimization (DPO) by dpo-train{}.\n",
        c.version.as_ref().map_or(String::new(), |v| format!(" {v}"))
    ));
    if let Some(steps) = c.steps {
        let why = c.stopped_because.as_ref().map_or(String::new(), |w| format!(" (stopped: {w})"));
        s.push_str(&format!("It was trained for {steps} optimizer steps{why}.\n"));
    }
    s.push_str("\n## Training data\n\n");
    match (&c.train_file, &c.train_sha256) {
        // The checkpoint fingerprint's hash: of the file, or of a folder's / pattern's shards.
        (Some(f), Some(h)) => {
            s.push_str(&format!("- `{f}` (sha256 `{h}` of its bytes, shard files in row order)\n"))
        }
        (Some(f), None) => s.push_str(&format!("- `{f}`\n")),
        _ => s.push_str("- unknown (no run record next to the uploaded folder)\n"),
    }
    if !c.metrics.is_empty() {
        s.push_str("\n## Final metrics\n\n| metric | value |\n|---|---|\n");
        for (k, v) in &c.metrics {
            let shown = match v.as_f64() {
                Some(x) if v.is_f64() => format!("{x:.6}"),
                _ => v.to_string(),
            };
            s.push_str(&format!("| {k} | {shown} |\n"));
        }
    }
    let block = |v: &Value| serde_json::to_string_pretty(v).expect("plain JSON");
    if let Some(con) = &c.constraints {
        s.push_str("\n## Constraints\n\nWhat shaped the policy besides the loss (dpo-train's constraint record):\n\n");
        s.push_str(&format!("```json\n{}\n```\n", block(con)));
    }
    if let Some(cfg) = &c.config {
        s.push_str("\n## Config\n\n");
        s.push_str(&format!("```json\n{}\n```\n", block(cfg)));
    }
    s
}

/// `dpo-train push DIR --repo org/name`: upload a model folder (a run's `final/` or a checkpoint).
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The folder to upload: a run's `final/` or a `checkpoint-<step>/`.
    pub dir: PathBuf,
    /// The Hub repo, `org/name` (created if needed).
    #[arg(long)]
    pub repo: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// The branch to push to (default main; created if needed).
    #[arg(long)]
    pub revision: Option<String>,
}

pub fn push(args: PushArgs) -> Result<()> {
    if !is_repo_id(&args.repo) {
        bail!("--repo {}: expected `org/name`", args.repo);
    }
    if !args.dir.join("config.json").is_file() {
        bail!(
            "{}: not a model folder (no config.json); push a run's final/ or a checkpoint",
            args.dir.display()
        );
    }
    let target = Target { repo: args.repo.clone(), private: args.private, revision: args.revision };
    let mut pusher = Pusher::new(target, HubStrategy::End)?;
    let card = model_card(&CardInput::for_folder(&args.repo, &args.dir));
    pusher.upload(
        &args.dir,
        "",
        &[("README.md", card.into_bytes())],
        "Upload model trained with dpo-train",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse() {
        let id = |repo: &str, rev: Option<&str>| {
            Some(HubId { repo: repo.into(), revision: rev.map(String::from) })
        };
        assert_eq!(HubId::parse("hub:org/name", false).unwrap(), id("org/name", None));
        assert_eq!(HubId::parse("hub:org/name@v1.0", true).unwrap(), id("org/name", Some("v1.0")));
        assert_eq!(HubId::parse("Qwen/Qwen2.5-0.5B", false).unwrap(), id("Qwen/Qwen2.5-0.5B", None));
        assert_eq!(HubId::parse("org/name@refs/pr/1", false).unwrap(), id("org/name", Some("refs/pr/1")));
        // Existing local paths and things that are no repo id stay paths.
        assert_eq!(HubId::parse("data/tiny-model", true).unwrap(), None);
        for local in ["./m", "../a/b", "/abs/path", "a/b/c", "model", "org/"] {
            assert_eq!(HubId::parse(local, false).unwrap(), None, "{local}");
        }
        assert!(HubId::parse("hub:nope", false).is_err());
        assert!(HubId::parse("hub:org/name@", false).is_err());
    }

    #[test]
    fn base_model_comes_from_the_cache_path() {
        let p = "/home/u/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abcd";
        assert_eq!(hub_id_from_cache_path(p).as_deref(), Some("Qwen/Qwen2.5-0.5B"));
        assert_eq!(hub_id_from_cache_path("data/tiny-model"), None);
    }

    #[test]
    fn token_is_redacted() {
        assert_eq!(redact("bad hf_secret here hf_secret", Some("hf_secret")), "bad <token> here <token>");
        assert_eq!(redact("nothing", None), "nothing");
    }

    #[test]
    fn model_card_has_the_metadata_and_the_record() {
        let summary = serde_json::json!({
            "steps_run": 4,
            "stopped_because": "step_budget",
            "version": "0.1.0",
            "constraints": {"step_budget": {"used": 4, "allowed": 4}},
            "fingerprint": {"train_data": "ab12", "model": "cd34", "hyperparameters": "{}"},
            "last_log": {"step": 4, "loss": 0.5},
            "config": {
                "model": "/c/hub/models--org--tiny/snapshots/0000000000000000000000000000000000000000",
                "train_file": "/data/pairs/train.jsonl",
                "beta": 0.1
            }
        });
        let dir = std::env::temp_dir().join(format!("dpo-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("metrics.jsonl"),
            "{\"step\":4,\"loss\":0.25}\n{\"step\":4,\"eval_loss\":0.5,\"eval_rewards/accuracies\":1.0}\n",
        )
        .unwrap();
        let card = model_card(&CardInput::from_summary("me/tiny-dpo", &summary, &dir));
        let (meta, body) = card.strip_prefix("---\n").unwrap().split_once("\n---\n").unwrap();
        for line in ["library_name: transformers", "- dpo", "base_model: org/tiny"] {
            assert!(meta.lines().any(|l| l == line), "{line} missing from\n{meta}");
        }
        for text in [
            "# tiny-dpo",
            "[org/tiny](https://huggingface.co/org/tiny)",
            "`train.jsonl` (sha256 `ab12` of its bytes, shard files in row order)",
            "| loss | 0.250000 |",
            "| eval_loss | 0.500000 |",
            "\"allowed\": 4",
            "\"beta\": 0.1",
            "4 optimizer steps (stopped: step_budget)",
        ] {
            assert!(body.contains(text), "{text} missing from\n{body}");
        }
        // A local base model: no base_model metadata (the Hub wants a repo id there).
        let mut local = summary.clone();
        local["config"]["model"] = "data/tiny-model".into();
        let card = model_card(&CardInput::from_summary("me/x", &local, &dir));
        assert!(!card.contains("base_model:") && card.contains("the local model folder `data/tiny-model`"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
