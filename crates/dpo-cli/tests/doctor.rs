//! `dpo-train doctor --device cpu` runs the fused-op self-check and passes.

use std::process::Command;

#[test]
fn doctor_passes_on_cpu() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_dpo-train")).args(["doctor", "--device", "cpu"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "doctor failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("RESULT: PASS"), "{stdout}");
    for op in ["masked_softmax", "rms_norm", "rope", "silu_mul"] {
        assert!(stdout.contains(op), "{op} missing from the report:\n{stdout}");
    }
}

#[test]
fn doctor_rejects_an_unknown_device() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_dpo-train")).args(["doctor", "--device", "tpu"]).output().unwrap();
    assert!(!out.status.success());
}
