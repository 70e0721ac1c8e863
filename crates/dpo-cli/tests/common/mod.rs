//! What the CLI tests share: the TRL fixture (tiny Qwen2 and its data) and a run config for it.
#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trl")
}

/// Writes `dir/run.toml`: the fixture model, `train` and `eval`, `output_dir = dir/out`, then
/// `rest` (TOML lines). Returns its path.
pub fn write_config(dir: &Path, train: &Path, eval: &Path, rest: &str) -> PathBuf {
    let cfg = format!(
        "model = \"{m}\"\ntrain_file = \"{t}\"\neval_file = \"{e}\"\noutput_dir = \"{o}\"\n{rest}\n",
        m = fixtures().join("model").display(),
        t = train.display(),
        e = eval.display(),
        o = dir.join("out").display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}
