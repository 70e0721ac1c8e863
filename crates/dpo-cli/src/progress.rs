//! A progress bar with loss and tokens/s on a terminal; plain `tracing` lines otherwise. It also
//! answers the trainer's `stop_requested` from SIGINT / SIGTERM ([`Interrupt`]).

use std::io::IsTerminal;

use dpo_trainer::Observer;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

use crate::interrupt::Interrupt;

pub struct Progress {
    bar: Option<ProgressBar>,
    /// Test hook: `DPO_TRAIN_TEST_STEP_DELAY_MS` slows each step so a test can kill a run
    /// mid-training at a known point.
    step_delay: Option<std::time::Duration>,
    /// SIGINT / SIGTERM, listened to from the loop's start.
    pub interrupt: Interrupt,
}

impl Progress {
    /// A bar if `wanted` and stderr is a terminal.
    pub fn new(wanted: bool) -> Self {
        let step_delay = std::env::var("DPO_TRAIN_TEST_STEP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis);
        let bar = (wanted && std::io::stderr().is_terminal()).then(ProgressBar::hidden);
        Progress { bar, step_delay, interrupt: Interrupt::default() }
    }

    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }
}

/// `step 10 | loss 0.6931 | eval_loss ...`: a record as one short line.
fn compact(rec: &Map<String, Value>) -> String {
    rec.iter()
        .filter(|(k, _)| !k.starts_with("logps") && *k != "num_tokens")
        .map(|(k, v)| match v.as_f64() {
            Some(x) if v.is_f64() => format!("{k} {x:.4}"),
            _ => format!("{k} {v}"),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

impl Observer for Progress {
    fn on_start(&mut self, total_steps: u64) {
        match Interrupt::listen() {
            Ok(i) => self.interrupt = i,
            Err(e) => tracing::warn!(
                "cannot listen for SIGINT/SIGTERM ({e}): they stop the run without a checkpoint"
            ),
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total_steps);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
                    .expect("valid template"),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }

    fn on_step(&mut self, step: u64, loss: f64, tokens_per_second: f64) {
        if let Some(d) = self.step_delay {
            std::thread::sleep(d);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4} | {tokens_per_second:.0} tok/s"));
        }
    }

    fn on_log(&mut self, rec: &Map<String, Value>) {
        if let Some(bar) = &self.bar {
            bar.println(compact(rec));
        }
    }

    fn stop_requested(&mut self) -> bool {
        self.interrupt.signal().is_some()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
