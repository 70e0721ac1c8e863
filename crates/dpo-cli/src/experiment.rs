//! `dpo-train experiment constraint-gap --out DIR`: Prop. 3.1 of the paper on a tabular problem
//! solved exactly (the math is `dpo_trainer::gap`), with figures in the spirit of its Fig. 1
//! (the minimizers with and without constraints) and Fig. 2 (the penalty `log(gamma + u)`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use dpo_trainer::gap::{self, GapReport, GapSettings};
use plotters::prelude::*;

#[derive(clap::Subcommand, Debug)]
pub enum Experiment {
    /// Prop. 3.1: RLHF and DPO minimizers coincide over all policies and differ under
    /// constraints. Writes constraint_gap.json, constraint_gap.svg and relative_concavity.svg.
    ConstraintGap {
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The paper's lambda (the trainer's beta).
        #[arg(long, default_value_t = GapSettings::default().lambda)]
        lambda: f64,
        /// Step-budget family: gradient steps from pi_ref.
        #[arg(long, default_value_t = GapSettings::default().steps)]
        steps: usize,
        /// Step-budget family: learning rate on the logits.
        #[arg(long, default_value_t = GapSettings::default().learning_rate)]
        learning_rate: f64,
        /// L2-ball family: radius around the reference logits of each prompt.
        #[arg(long, default_value_t = GapSettings::default().radius)]
        radius: f64,
    },
}

pub fn run(experiment: Experiment) -> Result<()> {
    let Experiment::ConstraintGap { out, lambda, steps, learning_rate, radius } = experiment;
    for (name, v) in [("--lambda", lambda), ("--learning-rate", learning_rate), ("--radius", radius)] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be positive (got {v})");
        }
    }
    let report = gap::constraint_gap(&GapSettings { lambda, steps, learning_rate, radius });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("constraint_gap.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    draw_policies(&out.join("constraint_gap.svg"), &report)?;
    draw_penalties(&out.join("relative_concavity.svg"))?;
    println!("family          TV(RLHF-opt, DPO-opt)  max |diff|   TV to pi** (RLHF, DPO)");
    for f in &report.families {
        println!(
            "{:<15} {:>21.3e}  {:>10.3e}   {:.3e}, {:.3e}",
            family_name(&f.family),
            f.tv,
            f.max_abs,
            f.rlhf_minimizer.tv_to_optimal,
            f.dpo_minimizer.tv_to_optimal
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}

fn family_name(f: &gap::Family) -> String {
    match f {
        gap::Family::Unconstrained => "unconstrained".into(),
        gap::Family::LogLinear => "log_linear".into(),
        gap::Family::StepBudget { .. } => "step_budget".into(),
        gap::Family::L2Ball { .. } => "l2_ball".into(),
    }
}

fn family_title(f: &gap::FamilyResult) -> String {
    let what = match f.family {
        gap::Family::Unconstrained => "no constraint".to_string(),
        gap::Family::LogLinear => "log-linear, phi = (t, t^2)".to_string(),
        gap::Family::StepBudget { steps, learning_rate } => format!("{steps} GD steps, lr {learning_rate}"),
        gap::Family::L2Ball { radius } => format!("||s - s_ref|| <= {radius}"),
    };
    format!("{what}: TV(RLHF, DPO) = {:.1e}", f.tv)
}

const REF: RGBColor = RGBColor(160, 160, 160);
const OPT: RGBColor = RGBColor(46, 139, 87);
const RLHF: RGBColor = RGBColor(219, 90, 140);
const DPO: RGBColor = RGBColor(50, 100, 220);

/// Fig. 1 in spirit: for the first prompt, `pi_ref`, `pi**`, and the RLHF- and DPO-optimal
/// policies of each family (one panel per family; unconstrained they coincide with `pi**`).
fn draw_policies(path: &Path, report: &GapReport) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        "Prop. 3.1: RLHF- vs DPO-optimal policies (prompt 0), without and with a constraint set S",
        ("sans-serif", 22),
    )?;
    let k = report.optimal[0].len();
    for (area, f) in root.split_evenly((2, 2)).iter().zip(&report.families) {
        let series: [(&str, &[f64], RGBColor); 4] = [
            ("pi_ref", &report.problem.prompts[0].pi_ref, REF),
            ("pi** (unconstrained optimum)", &report.optimal[0], OPT),
            ("argmin RLHF in S", &f.rlhf_minimizer.policy[0], RLHF),
            ("argmin DPO in S", &f.dpo_minimizer.policy[0], DPO),
        ];
        let top = series.iter().flat_map(|s| s.1.iter()).fold(0.0f64, |a, b| a.max(*b)) * 1.3;
        let mut chart = ChartBuilder::on(area)
            .caption(family_title(f), ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..(k as f64 - 0.5), 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(k)
            .x_label_formatter(&|x| format!("y{}", x.round() as i64))
            .y_desc("probability")
            .draw()?;
        let width = 0.8 / series.len() as f64;
        for (i, (name, p, color)) in series.iter().enumerate() {
            let color = *color;
            chart
                .draw_series(p.iter().enumerate().map(|(y, v)| {
                    let x0 = y as f64 - 0.4 + i as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
                }))?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A penalty curve to draw: `u -> value`.
type Curve = Box<dyn Fn(f64) -> f64>;

/// Fig. 2 in spirit: `log(gamma + u)` normalized to value 0 and slope 1 at `u = 1`, for several
/// `gamma`, between the `l0`-like limit `log u` (`gamma -> 0`) and the `l1` limit `u - 1`.
fn draw_penalties(path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("DPO's penalty log(gamma + u), normalized at u = 1 (Sec. 5, Fig. 2)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..3.0, -3.0f64..2.2)?;
    chart.configure_mesh().x_desc("u = (pi_theta(y_l)/pi_theta(y_w))^beta").y_desc("penalty").draw()?;
    let us: Vec<f64> = (1..=600).map(|i| i as f64 * 0.005).collect();
    let mut curves: Vec<(String, Curve, RGBColor)> = vec![
        ("l0 limit: log u (gamma -> 0)".into(), Box::new(|u: f64| u.ln()), RGBColor(220, 30, 30)),
        ("l1 limit: u - 1 (gamma -> inf)".into(), Box::new(|u: f64| u - 1.0), RGBColor(30, 160, 60)),
    ];
    let shades = [
        (0.05, RGBColor(120, 40, 160)),
        (0.3, RGBColor(230, 120, 0)),
        (1.0, RGBColor(0, 110, 210)),
        (5.0, RGBColor(0, 170, 170)),
    ];
    for (gamma, color) in shades {
        curves.push((
            format!("gamma = {gamma}"),
            Box::new(move |u| gap::normalized_penalty(gamma, u, 1.0)),
            color,
        ));
    }
    for (name, f, color) in curves {
        chart
            .draw_series(LineSeries::new(
                us.iter().map(|&u| (u, f(u))).filter(|p| p.1 >= -3.0),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
