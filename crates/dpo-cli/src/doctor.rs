//! `dpo-train doctor [--device cpu|cuda|cuda:N]`: runs the fused-op self-check
//! ([`dpo_model::ops::self_check`]) on a device, prints its report, and fails on any FAIL.

use anyhow::{Context, Result, bail};

/// The device `doctor` checks when none is given: CUDA when this binary has it, else the CPU.
pub fn default_device() -> String {
    if candle_core::utils::cuda_is_available() { "cuda" } else { "cpu" }.to_string()
}

pub fn run(device: &str) -> Result<()> {
    let dev = dpo_trainer::parse_device(device)?;
    let report = dpo_model::ops::self_check(&dev).context("running the fused-op self-check")?;
    print!("{report}");
    if report.lines().any(|l| l.contains("FAIL")) {
        bail!("fused-op self-check on {device} failed (see the FAIL lines above)");
    }
    Ok(())
}
