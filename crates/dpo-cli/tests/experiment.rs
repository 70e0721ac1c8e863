//! `dpo-train experiment constraint-gap`: runs into a temporary folder, checks the JSON's facts
//! and that both figures are non-trivial SVG.

use std::process::Command;

use serde_json::Value;

#[test]
fn constraint_gap_writes_json_and_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gap");
    let run = Command::new(env!("CARGO_BIN_EXE_dpo-train"))
        .args(["experiment", "constraint-gap", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "stderr: {}", String::from_utf8_lossy(&run.stderr));

    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("constraint_gap.json")).unwrap()).unwrap();
    let families = report["families"].as_array().unwrap();
    let names: Vec<&str> = families.iter().map(|f| f["family"].as_str().unwrap()).collect();
    assert_eq!(names, ["unconstrained", "log_linear", "step_budget", "l2_ball"]);
    for f in families {
        let tv = f["tv"].as_f64().unwrap();
        if f["family"] == "unconstrained" {
            assert!(tv < 1e-6, "unconstrained gap {tv}");
        } else {
            assert!(tv > 1e-3, "{}: gap {tv}", f["family"]);
        }
        for who in ["rlhf_minimizer", "dpo_minimizer"] {
            let policy = f[who]["policy"].as_array().unwrap();
            let total: f64 = policy[0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
            assert!((total - 1.0).abs() < 1e-12);
            assert!(f[who]["rlhf"].is_f64() && f[who]["dpo"].is_f64());
        }
    }
    assert_eq!(
        report["optimal"].as_array().unwrap().len(),
        report["problem"]["prompts"].as_array().unwrap().len()
    );
    assert!(report["appendix_c"]["dpo_forward_kl_error"].as_f64().unwrap() < 1e-12);

    for (name, element) in [("constraint_gap.svg", "<rect"), ("relative_concavity.svg", "<polyline")] {
        let svg = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{name}");
        assert!(svg.matches(element).count() >= 20, "{name}: too few {element}");
        assert!(svg.contains("<text"), "{name}: no labels");
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("l2_ball"), "{stdout}");
}

#[test]
fn constraint_gap_rejects_a_non_positive_lambda() {
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_dpo-train"))
        .args(["experiment", "constraint-gap", "--lambda", "0", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--lambda"));
}
