//! The training run: setup, then the loop (in [`Trainer::run`], on one screen).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, TensorId};
use dpo_loader::{
    DataPosition, EpochStats, PreferenceDataset, PreferenceTokenizer, Prefetch, SkipCounts, batches, collate,
};
use dpo_model::{CausalLm, Checkpoint, Policy, profile};
use serde_json::{Map, Value, json};

use crate::checkpoint::{self, Fingerprint, TrainerState};
use crate::config::{Precision, TrainConfig};
use crate::constraints::{Constraints, ImplicitKl};
use crate::data_counts::DataCounts;
use crate::error::{Result, TrainError};
use crate::logprobs::{LmHead, sequence_logps, token_kl_sum};
use crate::metrics::{BatchStats, Window, eval_metrics};
use crate::optim::{AdamW, AdamWConfig, Clip, global_norm};
use crate::outputs::Outputs;
use crate::ref_cache::{self, RefCache};
use crate::schedule::lr_factor;
use crate::step::{DeviceBatch, HostBatch, Scored, loss_of, pair_logps, score, with_layout};

/// Hooks for a front end (progress bar); all optional.
pub trait Observer {
    fn on_start(&mut self, _total_steps: u64) {}
    fn on_step(&mut self, _step: u64, _loss: f64, _tokens_per_second: f64) {}
    fn on_log(&mut self, _record: &Map<String, Value>) {}
    /// A checkpoint folder was just written (complete, renamed into place).
    fn on_checkpoint(&mut self, _dir: &std::path::Path) {}
    /// Asked after every optimizer step: `true` ends the run there with a checkpoint of that
    /// step (written even without `save_steps`) and no final model
    /// ([`StopReason::Interrupted`]; a front end's answer to SIGINT or SIGTERM).
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// An observer that does nothing.
pub struct Silent;
impl Observer for Silent {}

/// Where to continue from: a checkpoint folder or `latest` (in `output_dir`).
#[derive(Debug, Clone)]
pub struct Resume {
    pub checkpoint: std::path::PathBuf,
    /// Accept changed hyperparameters (model and data must still match).
    pub allow_changed: bool,
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StepBudget,
    EarlyStopping,
    /// The front end asked to stop ([`Observer::stop_requested`]); resume from the checkpoint.
    Interrupted,
}

/// Everything loaded and checked before anything is written.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    pub checkpoint_dir: std::path::PathBuf,
    pub stored_dtype: DType,
    pub policy: Policy,
    /// The frozen reference; dropped once its log-probs are precomputed.
    pub reference: Option<CausalLm>,
    ref_cache: Option<(RefCache, Option<RefCache>)>,
    compute_dtype: DType,
    tokenizer: Arc<PreferenceTokenizer>,
    train: Arc<PreferenceDataset>,
    eval: Option<Arc<PreferenceDataset>>,
    /// The data's epoch counts (`counts.train`, `counts.eval`) and the training data's hash.
    pub counts: DataCounts,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
}

/// Parses `cpu`, `cuda`, `cuda:N`, `metal`.
pub fn parse_device(s: &str) -> Result<Device> {
    let unavailable = |what: &str| {
        TrainError::Config(format!(
            "device `{s}`: {what} (build with `--features {}`)",
            s.split(':').next().unwrap_or(s)
        ))
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        "metal" if candle_core::utils::metal_is_available() => Ok(Device::new_metal(0)?),
        "metal" => Err(unavailable("this binary has no Metal support")),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                return Err(unavailable("this binary has no CUDA support"));
            }
            let ordinal = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), |n| n.parse::<usize>())
                .map_err(|_| TrainError::Config(format!("device `{s}`: expected cuda:<ordinal>")))?;
            let device = Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(cuda) = &device {
                tune_cuda(cuda);
            }
            Ok(device)
        }
        other => Err(TrainError::Config(format!("unknown device `{other}` (cpu, cuda, cuda:N, metal)"))),
    }
}

/// Two settings of cudarc's defaults that cost time on a training step; each can be kept as it
/// was (`DPO_TRAIN_CUDA_EVENTS=1`, `DPO_TRAIN_CUDA_POOL=default`) to measure the difference.
///
/// * Per-allocation events: cudarc gives every allocation two CUDA events (four driver calls per
///   tensor, thousands of tensors a step) to order its uses across streams. candle runs all
///   work on one stream and dpo-train touches the device from one thread, so stream order
///   already orders every use: the events order nothing here.
/// * The memory pool's release threshold: candle allocates with `cuMemAllocAsync` from the
///   device's pool, whose default threshold of 0 hands all freed memory back to the driver at
///   every synchronization (each step has several: the loss, the gradient norm), so the next
///   forward maps its activations anew. Keeping it holds the pool at the step's peak.
#[cfg(feature = "cuda")]
fn tune_cuda(cuda: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    if std::env::var_os("DPO_TRAIN_CUDA_EVENTS").is_none() {
        // SAFETY: one stream (candle's), used from the thread that created the device.
        unsafe { cuda.disable_event_tracking() };
    }
    if std::env::var("DPO_TRAIN_CUDA_POOL").as_deref() != Ok("default") {
        let device = cuda.cuda_stream().context().cu_device();
        let mut keep = u64::MAX;
        // SAFETY: `device` is a valid CUdevice; the attribute takes a u64 (cuuint64_t).
        let set = unsafe {
            result::device::get_mem_pool(device).and_then(|pool| {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                )
            })
        };
        if let Err(e) = set {
            tracing::warn!("could not keep freed device memory in the pool ({e:?}); training goes on");
        }
    }
}

impl Trainer {
    /// Loads the model twice (policy and reference), the tokenizer and the data, and checks
    /// every row, so that bad input fails here, before `output_dir` is touched.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.validate().map_err(TrainError::Config)?;
        let device = parse_device(&cfg.device)?;
        let compute = match cfg.dtype {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
        let fused = fused_ops(&cfg, dpo_model::has_fused_kernels(&device)).map_err(TrainError::Config)?;
        if fused && device.is_cuda() && std::env::var_os("DPO_TRAIN_SKIP_KERNEL_CHECK").is_none() {
            let started = std::time::Instant::now();
            dpo_model::ops::verify(&device).map_err(|e| {
                TrainError::Numerics(format!(
                    "the fused kernels disagree with their CPU reference on {}: {e}; train without them \
                     with `fused_ops = false`, or skip this check with DPO_TRAIN_SKIP_KERNEL_CHECK=1",
                    cfg.device
                ))
            })?;
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "fused kernels agree with the CPU's");
        }
        let ck = Checkpoint::open(&cfg.model, cfg.model_weights.as_deref())?;
        if cfg.lm_head_f32 && !cfg.lm_head_bf16_operands && compute == DType::BF16 && device.is_cuda() {
            // f32 head matmuls on tensor cores (TF32); bf16 matmuls keep f32 accumulation.
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        let mut policy = Policy::load(&ck, DType::F32, compute, &device)?;
        policy.model = configure(policy.model, &cfg, compute)?;
        let reference = Some(configure(CausalLm::load_frozen(&ck, compute, &device)?, &cfg, compute)?);
        let tokenizer = Arc::new(PreferenceTokenizer::from_model_dir(&cfg.model)?);
        let train = Arc::new(PreferenceDataset::open(&cfg.train_file)?);
        let eval = cfg.eval_file.as_ref().map(PreferenceDataset::open).transpose()?.map(Arc::new);
        let counts = DataCounts::load_or_count(&cfg, &tokenizer, &train, eval.as_deref())?;
        let train_stats = &counts.train;
        if train_stats.batches == 0 {
            return Err(TrainError::Config(format!(
                "{}: no usable pairs ({} rows; skipped: {})",
                cfg.train_file.display(),
                train_stats.rows,
                train_stats.skips
            )));
        }
        let ga = cfg.gradient_accumulation_steps as u64;
        let steps_per_epoch = (train_stats.batches as u64).div_ceil(ga).max(1);
        let total_steps =
            cfg.max_steps.unwrap_or_else(|| (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64);
        tracing::info!(
            model = %cfg.model.display(), arch = ?ck.config.arch, params = policy.num_parameters(),
            pairs = train_stats.pairs, skipped = %train_stats.skips, steps = total_steps, "ready"
        );
        Ok(Trainer {
            checkpoint_dir: cfg.model.clone(),
            stored_dtype: ck.stored_dtype,
            cfg,
            device,
            policy,
            reference,
            ref_cache: None,
            compute_dtype: compute,
            tokenizer,
            train,
            eval,
            counts,
            total_steps,
            steps_per_epoch,
        })
    }

    /// Trains until the step budget is spent or early stopping fires (continuing from a
    /// checkpoint with `resume`); writes the outputs and returns the run summary.
    pub fn run(&mut self, observer: &mut dyn Observer, resume: Option<&Resume>) -> Result<serde_json::Value> {
        let cfg = self.cfg.clone();
        let mut opt = AdamW::new(
            &self.policy.params,
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let fresh = self.initial_state(&opt)?;
        let (mut st, mut out) = match resume {
            None => (fresh, Outputs::create(&cfg.output_dir, cfg.overwrite_output_dir)?),
            Some(r) => self.restore(r, &mut opt, fresh)?,
        };
        self.counts.save(&cfg.output_dir)?;
        self.precompute_reference(&st.fingerprint)?;
        let largest_batch = if cfg.probe_largest_batch { self.probe_largest_batch()? } else { None };
        let warmup = cfg.warmup_for(self.total_steps);
        let mut data = self.epoch_stream(st.data_position, st.seen_in_epoch)?;
        let (mut stop, started, mut window_start, mut last_log) =
            (StopReason::StepBudget, Instant::now(), Instant::now(), None);
        observer.on_start(self.total_steps);
        if cfg.eval_on_start && resume.is_none() {
            self.evaluate(0, &mut out, observer, &mut st.constraints)?;
        }
        for step in st.step + 1..=self.total_steps {
            // 1. Up to `gradient_accumulation_steps` micro-batches (fewer at an epoch's end).
            let micro = self.next_micro_batches(&mut data)?;
            let lr = cfg.learning_rate * lr_factor(cfg.lr_scheduler_type, step - 1, warmup, self.total_steps);
            // 2. Forward both models, backward the policy; each micro-batch weighs 1 / n.
            let mut grads: Vec<Option<Tensor>> = vec![None; self.policy.params.len()];
            let mut scored = Vec::with_capacity(micro.len());
            profile::start(&self.device)?;
            for (batch, host) in &micro {
                let db = host.upload(&self.device)?;
                profile::phase(&self.device, "batch")?;
                let (micro_grads, stats) = self.micro_step(batch, &db, micro.len())?;
                accumulate(&mut grads, &micro_grads, &self.policy.params)?;
                profile::phase(&self.device, "accumulate")?;
                scored.push(stats);
            }
            // 3. Clip by global norm (AdamW scales the gradients as it reads them), the update.
            //    On CUDA both are queued without a wait: the factor stays on the device.
            let grads: Vec<Tensor> =
                grads.into_iter().map(|g| g.expect("every parameter has a gradient")).collect();
            let clip = Clip::of(&grads, cfg.max_grad_norm)?;
            profile::phase(&self.device, "clip")?;
            opt.step(&grads, lr, &clip)?;
            profile::phase(&self.device, "adamw")?;
            // 4. The step's numbers on the host: its one wait for the device.
            for stats in scored {
                let stats = stats.read()?;
                st.tokens_total += stats.tokens;
                st.window.push(stats);
            }
            st.window.end_step();
            let (grad_norm, factor) = clip.read()?;
            // The step's gradients are spent: freed before the record, the eval and the save.
            drop((grads, clip));
            if !grad_norm.is_finite() {
                let why = format!("step {step}: gradient norm is {grad_norm} (the update was skipped)");
                return Err(TrainError::Numerics(why));
            }
            if let Some(report) = profile::report(step)? {
                eprintln!("{report}");
            }
            (st.step, st.optimizer_steps, st.data_position, st.seen_in_epoch) =
                (step, opt.steps(), data.position, data.seen);
            st.constraints.record_step(grad_norm, factor < 1.0);
            // 5. Log, evaluate, save, maybe stop.
            let tps = st.window.tokens() as f64 / window_start.elapsed().as_secs_f64();
            observer.on_step(step, st.window.last_step_loss(), tps);
            if step % cfg.logging_steps == 0 || step == self.total_steps {
                let mut rec = Map::new();
                rec.insert("step".into(), step.into());
                rec.insert("epoch".into(), data.epoch_progress().into());
                rec.append(&mut st.window.drain());
                for (k, v) in [("grad_norm", grad_norm), ("learning_rate", lr), ("tokens_per_second", tps)] {
                    rec.insert(k.into(), v.into());
                }
                rec.insert("num_tokens".into(), st.tokens_total.into());
                rec.append(&mut crate::memory::record(&self.device));
                self.log(&mut out, observer, &rec)?;
                last_log = Some(rec);
                window_start = Instant::now();
            }
            let eval_now = cfg.eval_steps.is_some_and(|e| step % e == 0 || step == self.total_steps);
            let stop_early = eval_now && self.evaluate(step, &mut out, observer, &mut st.constraints)?;
            let interrupted = step < self.total_steps && !stop_early && observer.stop_requested();
            if cfg.save_steps.is_some_and(|s| step % s == 0) || interrupted {
                let dir = checkpoint::save(
                    &out,
                    &self.checkpoint_dir,
                    &self.policy.named_tensors(DType::F32)?,
                    &opt.state_tensors(),
                    &st,
                    cfg.save_total_limit,
                )?;
                tracing::info!(step, path = %dir.display(), "checkpoint saved");
                observer.on_checkpoint(&dir);
            }
            if stop_early || interrupted {
                stop = if interrupted { StopReason::Interrupted } else { StopReason::EarlyStopping };
                break;
            }
        }
        // 6. Save the policy as a Hugging Face model folder (not when interrupted: the last
        //    checkpoint is the run's state), and the run's record.
        let mut constraints = st.constraints.clone();
        let final_dir = if stop == StopReason::Interrupted {
            None
        } else {
            constraints.weight_decay.weight_norm_end = Some(self.decayed_weight_norm(&opt)?);
            constraints.implicit_kl_to_reference = self.implicit_kl()?;
            Some(out.save_model(
                "final",
                &self.checkpoint_dir,
                &self.policy.named_tensors(self.stored_dtype)?,
            )?)
        };
        let mut summary =
            self.summary(stop, &st, constraints, final_dir.as_deref(), last_log, started, resume);
        summary["data"]["train"]["largest_batch_probed"] = json!(largest_batch);
        out.write_json("run_summary.json", &summary)?;
        Ok(summary)
    }

    /// One micro-batch (`db`: `batch` on the device): the reference's log-probs, the policy's
    /// forward and backward (autograd, activation checkpointing or the manual block backward);
    /// the loss weighs `1 / n_micro`. The batch's statistics stay on the device until read.
    fn micro_step(
        &self,
        batch: &dpo_loader::Batch,
        db: &DeviceBatch,
        n_micro: usize,
    ) -> Result<(HashMap<TensorId, Tensor>, Scored)> {
        let cfg = &self.cfg;
        let ref_logps = self.reference_logps(batch, db)?;
        profile::phase(&self.device, "reference")?;
        let policy = &self.policy.model;
        let mut scored = None;
        let mut head = |hidden: &Tensor| -> candle_core::Result<Tensor> {
            let logps = sequence_logps(hidden, &LmHead::of(policy, cfg.logprob_chunk)?, &db.index)?;
            let x = pair_logps(&logps, &ref_logps, db)?;
            let (loss, s) = score(&x, &loss_of(cfg, &x)?, db.tokens)?;
            scored = Some(s);
            loss / n_micro as f64
        };
        let grads = if cfg.manual_backward {
            policy.manual_grads(&db.ids, &db.mask, head, cfg.gradient_checkpointing)?.1
        } else if cfg.gradient_checkpointing {
            policy.checkpointed_grads(&db.ids, &db.mask, head)?.1
        } else {
            let hidden = policy.hidden_states(&db.ids, &db.mask)?;
            profile::phase(&self.device, "policy_fwd")?;
            let loss = head(&hidden)?;
            profile::phase(&self.device, "head_loss")?;
            let store = loss.backward()?;
            let params = self.policy.params.iter();
            params.filter_map(|(_, v)| store.get(v).map(|g| (v.id(), g.clone()))).collect()
        };
        profile::phase(&self.device, "backward")?;
        Ok((grads, scored.expect("the loss was computed")))
    }

    /// One record to `metrics.jsonl`, the observer, and the log.
    fn log(&self, out: &mut Outputs, observer: &mut dyn Observer, rec: &Map<String, Value>) -> Result<()> {
        out.log(rec)?;
        observer.on_log(rec);
        tracing::info!(target: "dpo_train::metrics", "{}", serde_json::Value::Object(rec.clone()));
        Ok(())
    }

    /// `run_summary.json`: why the run stopped, its constraint record, data counts, the config.
    #[allow(clippy::too_many_arguments)]
    fn summary(
        &self,
        stop: StopReason,
        st: &TrainerState,
        constraints: Constraints,
        final_dir: Option<&std::path::Path>,
        last_log: Option<Map<String, Value>>,
        started: Instant,
        resume: Option<&Resume>,
    ) -> Value {
        let cfg = &self.cfg;
        json!({
            "stopped_because": stop,
            "steps_run": constraints.step_budget.used,
            "total_steps": self.total_steps,
            "resumed_from": resume.map(|r| r.checkpoint.clone()),
            "wall_time_seconds": started.elapsed().as_secs_f64(),
            "tokens_per_second": st.tokens_total as f64 / started.elapsed().as_secs_f64(),
            "constraints": constraints,
            "final_model": final_dir,
            "last_log": last_log,
            "data": {
                "train": {"rows": self.counts.train.rows, "pairs": self.counts.train.pairs,
                          "batches_per_epoch": self.counts.train.batches, "skipped": self.counts.train.skips},
                "eval": self.counts.eval.as_ref().map(|s| json!({"rows": s.rows, "pairs": s.pairs, "skipped": s.skips})),
            },
            "model": {"arch": self.policy.model.config.arch, "parameters": self.policy.num_parameters()},
            "fingerprint": st.fingerprint,
            "config": cfg,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }

    /// The state before the first step.
    fn initial_state(&self, opt: &AdamW) -> Result<TrainerState> {
        let cfg = &self.cfg;
        let (decay, exempt) = opt.groups();
        let constraints = Constraints::new(
            cfg,
            self.total_steps,
            self.steps_per_epoch,
            (decay.len(), exempt.len()),
            self.decayed_weight_norm(opt)?,
            self.policy.num_parameters(),
        );
        Ok(TrainerState {
            step: 0,
            data_position: DataPosition::start_of(0),
            seen_in_epoch: 0,
            tokens_total: 0,
            optimizer_steps: 0,
            window: Window::default(),
            constraints,
            total_steps: self.total_steps,
            fingerprint: Fingerprint::new(
                cfg,
                self.counts.train_hash.clone(),
                self.counts.tokenizer_hash.clone(),
            )?,
            config: cfg.clone(),
        })
    }

    /// Loads a checkpoint into the policy and optimizer after checking that it belongs to this
    /// model, data and config; reopens `output_dir` at its step.
    fn restore(
        &mut self,
        r: &Resume,
        opt: &mut AdamW,
        fresh: TrainerState,
    ) -> Result<(TrainerState, Outputs)> {
        let dir = checkpoint::resolve(&r.checkpoint, &self.cfg.output_dir)?;
        let (saved, weights, moments) = checkpoint::load(&dir, &self.device)?;
        checkpoint::check_compatible(&saved.fingerprint, &fresh.fingerprint, r.allow_changed)
            .map_err(|msg| TrainError::Config(format!("cannot resume from {}: {msg}", dir.display())))?;
        // Mid-window, the position means "batch k of this window": only the same batching
        // rebuilds the same window, whatever `--resume-allow-changed` says.
        let batching = |c: &TrainConfig| c.data_config(c.batch_size).with_tokenizer_threads(0);
        if saved.data_position.batch_in_window > 0 && batching(&saved.config) != batching(&self.cfg) {
            return Err(TrainError::Config(format!(
                "cannot resume from {}: it stopped inside a length-grouping window, and the batching \
                 settings (batch_size, group_by_length, length_group_batches, shuffle, seed, max_length, ...) \
                 changed since; resume from a checkpoint at a window boundary or keep them",
                dir.display()
            )));
        }
        if saved.step >= self.total_steps {
            return Err(TrainError::Config(format!(
                "cannot resume from {}: it is at step {}, the run's budget is {} steps (raise max_steps to extend it)",
                dir.display(),
                saved.step,
                self.total_steps
            )));
        }
        self.policy.set_weights(&weights)?;
        opt.load_state(&moments, saved.optimizer_steps)?;
        let mut st = TrainerState {
            fingerprint: fresh.fingerprint,
            config: fresh.config,
            total_steps: fresh.total_steps,
            ..saved
        };
        st.constraints.step_budget.allowed = self.total_steps;
        tracing::info!(checkpoint = %dir.display(), step = st.step, "resuming");
        let out = Outputs::resume(&self.cfg.output_dir, st.step)?;
        Ok((st, out))
    }

    /// One pass over the eval set; logs `eval_*` metrics; returns whether to stop early.
    fn evaluate(
        &self,
        step: u64,
        out: &mut Outputs,
        observer: &mut dyn Observer,
        constraints: &mut Constraints,
    ) -> Result<bool> {
        let Some(eval) = &self.eval else { return Ok(false) };
        let cfg = &self.cfg;
        let policy = self.policy.model.detached();
        let data_cfg = cfg.eval_data_config();
        let mut all: Vec<BatchStats> = Vec::new();
        for batch in batches(eval.clone(), self.tokenizer.clone(), data_cfg, DataPosition::start_of(0))? {
            let batch = batch?;
            all.push(self.eval_batch(&policy, &batch, &self.device_batch(&batch)?)?);
        }
        let mut rec = Map::new();
        rec.insert("step".into(), step.into());
        rec.append(&mut eval_metrics(&all));
        let eval_loss = rec["eval_loss"].as_f64().unwrap_or(f64::NAN);
        self.log(out, observer, &rec)?;
        Ok(constraints.record_eval(step, eval_loss))
    }

    /// The metrics of one eval batch (`db`: `batch` on the device) under `policy` (detached).
    fn eval_batch(
        &self,
        policy: &CausalLm,
        batch: &dpo_loader::Batch,
        db: &DeviceBatch,
    ) -> Result<BatchStats> {
        let cfg = &self.cfg;
        let x =
            pair_logps(&db.logps(policy, cfg.logprob_chunk)?, &self.eval_reference_logps(batch, db)?, db)?;
        Ok(score(&x, &loss_of(cfg, &x)?, db.tokens)?.1.read()?)
    }

    /// With `probe_largest_batch`: the largest training batch (the longest pair of the run's
    /// layout, `batch_size` times) forward and backward, and the largest eval batch through
    /// the eval forward, results discarded (nothing of the run's state changes). Returns the
    /// training batch's shape on the device, `[rows, seq]`.
    pub fn probe_largest_batch(&self) -> Result<Option<(usize, usize)>> {
        let cfg = &self.cfg;
        let largest = |stats: &EpochStats, n: usize| {
            stats.longest.as_ref().map(|l| {
                let pair = if cfg.prefix_sharing { &l.shared } else { &l.standard };
                collate(
                    &vec![pair.clone(); n],
                    self.tokenizer.pad_id(),
                    cfg.max_length,
                    cfg.pad_to_multiple_of,
                )
            })
        };
        let Some(batch) = largest(&self.counts.train, cfg.batch_size) else { return Ok(None) };
        // Runs `f` on `batch` and its upload; a failure names the batch's shape on the device.
        type Probed<'a> = &'a dyn Fn(&dpo_loader::Batch, &DeviceBatch) -> Result<()>;
        let probe = |batch: &dpo_loader::Batch, f: Probed| {
            let db = self.device_batch(batch)?;
            let (rows, seq) = db.ids.dims2()?;
            f(batch, &db).map_err(|e| TrainError::LargestBatch { rows, seq, source: Box::new(e) })?;
            Ok::<_, TrainError>((rows, seq))
        };
        let started = Instant::now();
        let (rows, seq) = probe(&batch, &|b, db| self.micro_step(b, db, 1).map(drop))?;
        let eval_size = cfg.eval_batch_size.unwrap_or(cfg.batch_size);
        if let Some(batch) = self.counts.eval.as_ref().and_then(|s| largest(s, eval_size)) {
            let policy = self.policy.model.detached();
            probe(&batch, &|b, db| self.eval_batch(&policy, b, db).map(drop))?;
        }
        tracing::info!(rows, seq, seconds = started.elapsed().as_secs_f64(), "the largest batch fits");
        Ok(Some((rows, seq)))
    }

    /// Per-token KL and mean log-ratios of the policy against the reference on the eval set.
    fn implicit_kl(&self) -> Result<Option<ImplicitKl>> {
        let Some(eval) = &self.eval else { return Ok(None) };
        let cfg = &self.cfg;
        let policy = self.policy.model.detached();
        let reference = match &self.reference {
            Some(r) => r.clone(),
            None => self.load_reference()?,
        };
        let (wp, wr) = (LmHead::of(&policy, cfg.logprob_chunk)?, LmHead::of(&reference, cfg.logprob_chunk)?);
        let data_cfg = cfg.eval_data_config();
        let (mut kl, mut positions) = (0f64, 0usize);
        let (mut chosen, mut rejected, mut pairs) = (0f64, 0f64, 0usize);
        for batch in batches(eval.clone(), self.tokenizer.clone(), data_cfg, DataPosition::start_of(0))? {
            let db = DeviceBatch::new(&batch?, policy.config.sliding_window, &self.device)?;
            let (hp, hr) =
                (policy.hidden_states(&db.ids, &db.mask)?, reference.hidden_states(&db.ids, &db.mask)?);
            let select = |h: &Tensor| -> Result<Tensor> {
                let (rows, seq, hidden) = h.dims3()?;
                Ok(h.reshape((rows * seq, hidden))?.index_select(&db.index.positions, 0)?)
            };
            kl += token_kl_sum(&select(&hp)?, &wp, &select(&hr)?, &wr)?;
            positions += db.index.counts.iter().sum::<usize>();
            let ratio: Vec<f64> = (sequence_logps(&hp, &wp, &db.index)?
                - sequence_logps(&hr, &wr, &db.index)?)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
            chosen += ratio[..db.pairs].iter().sum::<f64>();
            rejected += ratio[db.pairs..].iter().sum::<f64>();
            pairs += db.pairs;
        }
        Ok(Some(ImplicitKl {
            per_token_kl_mean: kl / positions.max(1) as f64,
            positions,
            mean_log_ratio_chosen: chosen / pairs.max(1) as f64,
            mean_log_ratio_rejected: rejected / pairs.max(1) as f64,
        }))
    }

    /// A batch on the device in the configured layout (standard, or prefix-shared).
    fn device_batch(&self, batch: &dpo_loader::Batch) -> Result<DeviceBatch> {
        Ok(HostBatch::of(batch, self.cfg.prefix_sharing, self.policy.model.config.sliding_window)
            .upload(&self.device)?)
    }

    /// Reference log-probs of a training batch: precomputed, or a forward of the reference.
    fn reference_logps(&self, batch: &dpo_loader::Batch, db: &DeviceBatch) -> Result<Tensor> {
        match (&self.ref_cache, &self.reference) {
            (Some((train, _)), _) => train.lookup(batch, &self.device),
            (None, Some(r)) => Ok(db.logps(r, self.cfg.logprob_chunk)?),
            (None, None) => Err(TrainError::Config("no reference model and no precomputed log-probs".into())),
        }
    }

    fn eval_reference_logps(&self, batch: &dpo_loader::Batch, db: &DeviceBatch) -> Result<Tensor> {
        match (&self.ref_cache, &self.reference) {
            (Some((_, Some(eval))), _) => eval.lookup(batch, &self.device),
            (_, Some(r)) => Ok(db.logps(r, self.cfg.logprob_chunk)?),
            _ => Err(TrainError::Config("no reference model and no precomputed eval log-probs".into())),
        }
    }

    /// Loads the reference model again (after precomputing dropped it).
    fn load_reference(&self) -> Result<CausalLm> {
        let ck = Checkpoint::open(&self.cfg.model, self.cfg.model_weights.as_deref())?;
        let model = CausalLm::load_frozen(&ck, self.compute_dtype, &self.device)?;
        configure(model, &self.cfg, self.compute_dtype)
    }

    /// With `precompute_ref_log_probs`: the reference's log-probs of every train and eval pair,
    /// from the cache or one pass; then the reference model is freed.
    fn precompute_reference(&mut self, fingerprint: &Fingerprint) -> Result<()> {
        let cfg = &self.cfg;
        if !cfg.precompute_ref_log_probs || self.ref_cache.is_some() {
            return Ok(());
        }
        let reference = self.reference.as_ref().expect("loaded at setup");
        let dir = cfg.ref_cache_dir.clone().unwrap_or_else(|| cfg.output_dir.join("ref_logps"));
        let data_cfg = cfg.data_config(cfg.eval_batch_size.unwrap_or(cfg.batch_size));
        // Each dataset is keyed by its own bytes (hashed once at setup, see `DataCounts`).
        let compute = |split: &str, ds: &Arc<PreferenceDataset>, data_fingerprint: &str| {
            let precision = (self.compute_dtype, reference.head_dtype(), reference.head_operands());
            let key = ref_cache::cache_key(
                &fingerprint.model,
                data_fingerprint,
                ds,
                &cfg.model,
                cfg.max_length,
                precision,
            )?;
            RefCache::load_or_compute(
                dir.join(format!("{split}-{key}.safetensors")),
                ds,
                &self.tokenizer,
                data_cfg.clone(),
                reference,
                cfg.prefix_sharing,
                cfg.logprob_chunk,
                &self.device,
            )
        };
        let train = compute("train", &self.train, &fingerprint.train_data)?;
        let eval = match &self.eval {
            Some(ds) => Some(compute("eval", ds, self.counts.eval_hash.as_deref().unwrap_or_default())?),
            None => None,
        };
        self.ref_cache = Some((train, eval));
        self.reference = None;
        Ok(())
    }

    fn epoch_stream(&self, start: DataPosition, seen: usize) -> Result<EpochStream> {
        let data_cfg = self.cfg.data_config(self.cfg.batch_size);
        let iter = batches(self.train.clone(), self.tokenizer.clone(), data_cfg, start)?;
        // The device layout is built on the prefetch thread too: the step only uploads it.
        let layout = with_layout(self.cfg.prefix_sharing, self.policy.model.config.sliding_window);
        Ok(EpochStream {
            batches: iter.prefetch_with(4, layout)?,
            position: start,
            seen,
            per_epoch: self.counts.train.batches,
        })
    }

    /// The next optimizer step's micro-batches: `gradient_accumulation_steps` of them, or the
    /// rest of the epoch if fewer remain (as the HF Trainer does).
    fn next_micro_batches(&self, data: &mut EpochStream) -> Result<Vec<(dpo_loader::Batch, HostBatch)>> {
        let mut micro = Vec::with_capacity(self.cfg.gradient_accumulation_steps);
        while micro.len() < self.cfg.gradient_accumulation_steps {
            match data.batches.next() {
                Some(item) => {
                    let (batch, position) = item?;
                    micro.push(batch);
                    (data.position, data.seen) = (position, data.seen + 1);
                }
                None if micro.is_empty() => {
                    *data = self.epoch_stream(DataPosition::start_of(data.position.epoch + 1), 0)?
                }
                None => break,
            }
        }
        Ok(micro)
    }

    fn decayed_weight_norm(&self, opt: &AdamW) -> Result<f64> {
        let (decay, _) = opt.groups();
        let tensors: Vec<Tensor> = self
            .policy
            .params
            .iter()
            .filter(|(n, _)| decay.contains(&n.as_str()))
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        Ok(global_norm(&tensors)?)
    }

    /// Rows skipped or dropped in the training data (counted when the run was set up).
    pub fn skips(&self) -> &SkipCounts {
        &self.counts.train.skips
    }
}

/// The batches of the current epoch and how far into it the run is.
struct EpochStream {
    /// Each batch with its device layout.
    batches: Prefetch<(dpo_loader::Batch, HostBatch)>,
    /// Position after the last micro-batch taken.
    position: DataPosition,
    seen: usize,
    per_epoch: usize,
}

impl EpochStream {
    /// HF's logged `epoch`: epochs done plus the fraction of this one's batches consumed.
    fn epoch_progress(&self) -> f64 {
        self.position.epoch as f64 + self.seen as f64 / self.per_epoch.max(1) as f64
    }
}

/// Whether the model runs the fused ops: as the config asks where the device has their kernels
/// (`has_kernels`); elsewhere (Metal) the composed candle ops (same math) with a warning, unless
/// the manual backward, which has no composed form, needs them.
fn fused_ops(cfg: &TrainConfig, has_kernels: bool) -> std::result::Result<bool, String> {
    match (cfg.fused_ops, has_kernels) {
        (true, false) if cfg.manual_backward => Err(format!(
            "`manual_backward` needs the fused kernels, which exist for the CPU and CUDA only, not `{}`",
            cfg.device
        )),
        (true, false) => {
            tracing::warn!(device = %cfg.device, "no fused kernels for this device: composed candle ops run instead");
            Ok(false)
        }
        (on, _) => Ok(on),
    }
}

/// The forward options of the config: fused ops, attention recompute, and the LM head's dtypes.
///
/// Stacked projections ([`CausalLm::with_stacked_projections`]) copy the weights they stack. The
/// copy replaces a frozen model's weights, and the bf16 cast the manual backward makes of the
/// policy's; with f32 compute there is no cast to replace, so the policy stays unstacked there.
/// `DPO_TRAIN_STACK_PROJECTIONS=0` keeps every model unstacked (same math), to measure.
fn configure(model: CausalLm, cfg: &TrainConfig, compute: DType) -> Result<CausalLm> {
    let head = if cfg.lm_head_f32 { DType::F32 } else { compute };
    let operands = if cfg.lm_head_bf16_operands && compute == DType::BF16 { DType::BF16 } else { head };
    let stack = std::env::var("DPO_TRAIN_STACK_PROJECTIONS").as_deref() != Ok("0")
        && (!model.trainable() || compute != DType::F32);
    let fused = cfg.fused_ops && dpo_model::has_fused_kernels(model.device());
    let model = model.with_fused_ops(fused).with_attention_recompute(cfg.recompute_attention);
    Ok(model.with_head_dtype(head).with_head_operands(operands).with_stacked_projections(stack)?)
}

/// Adds this micro-batch's gradients to the running sums, one per parameter.
fn accumulate(
    sums: &mut [Option<Tensor>],
    micro: &HashMap<TensorId, Tensor>,
    params: &[(String, candle_core::Var)],
) -> Result<()> {
    for (sum, (name, var)) in sums.iter_mut().zip(params) {
        let g = micro.get(&var.as_tensor().id()).ok_or_else(|| {
            TrainError::Numerics(format!("parameter {name} received no gradient (a bug: please report it)"))
        })?;
        *sum = Some(match sum.take() {
            Some(s) => (s + g)?,
            None => g.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metal has no fused kernels: the composed ops run there, unless the manual backward (which
    /// has no composed form) asks for them; elsewhere the config decides.
    #[test]
    fn fused_ops_fall_back_where_the_device_has_no_kernels() {
        let cfg = |fused_ops, manual_backward| TrainConfig {
            fused_ops,
            manual_backward,
            device: "metal".into(),
            ..TrainConfig::default()
        };
        assert_eq!(fused_ops(&cfg(true, false), true), Ok(true));
        assert_eq!(fused_ops(&cfg(false, false), true), Ok(false));
        assert_eq!(fused_ops(&cfg(true, false), false), Ok(false));
        assert_eq!(fused_ops(&cfg(false, false), false), Ok(false));
        let e = fused_ops(&cfg(true, true), false).unwrap_err();
        assert!(e.contains("manual_backward") && e.contains("`metal`"), "{e}");
    }
}
