//! Runs [`dpo_model::ops::self_check`] on a device without the CLI (same as `dpo-train doctor`):
//! `cargo run --release --features cuda -p dpo-model --example ops_self_check -- cuda`.

fn main() -> std::process::ExitCode {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "cpu".to_string());
    let device = match arg.as_str() {
        "cpu" => candle_core::Device::Cpu,
        s => {
            let ordinal = s.strip_prefix("cuda:").map_or(Ok(0), str::parse).expect("cpu, cuda or cuda:N");
            candle_core::Device::new_cuda(ordinal).expect("CUDA device")
        }
    };
    match dpo_model::ops::self_check(&device) {
        Ok(report) => {
            print!("{report}");
            if report.contains("FAIL") {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
