//! Prop. 3.1 on a tabular problem solved exactly: constraints break the RLHF/DPO equivalence.
//!
//! Each prompt `x` (probability `w_x`) has `K` responses, a reference `pi_ref(.|x)`, a known
//! reward `r*(x, .)`, and `lambda` (the trainer's `beta`). A policy is a softmax of logits `s`.
//! ```text
//! pi**(y|x)   = pi_ref(y|x) exp(r*(x,y) / lambda) / Z(x)                                 eq. (4)/(17)
//! RLHF(pi)    = sum_x w_x sum_y pi(y|x) [lambda log(pi(y|x) / pi_ref(y|x)) - r*(x,y)]      eq. (3)
//!             = lambda sum_x w_x KL(pi(.|x) || pi**(.|x)) - lambda sum_x w_x log Z(x)     eq. (16)
//! DPO(pi)     = sum_x w_x sum_{i != j} W_x(i,j) softplus(-lambda (rho_i - rho_j))         eq. (6)
//!   rho_i     = log(pi(i|x) / pi_ref(i|x)),
//!   W_x(i,j)  = 2 pi_ref(i|x) pi_ref(j|x) sigmoid(r*_i - r*_j) / (1 - sum_y pi_ref(y|x)^2)
//! ```
//! `DPO` is the exact expectation of eq. (6) when `(y1, y2) ~ pi_ref x pi_ref` given
//! `y1 != y2` and the winner is drawn by Bradley-Terry with `r*` (summed over all ordered pairs;
//! `i` wins the pair `{i, j}` with probability `sigmoid(r*_i - r*_j)`, both orders counted).
//! With `pi_ref` uniform over two responses and `lambda = 1` (Appendix C), `DPO(pi) =
//! sum_x w_x KL(pi** || pi) + sum_x w_x H(pi**)`, the forward KL where RLHF has the backward one;
//! in general DPO is not a KL, and this module just minimizes it.
//!
//! Over all policies both objectives are minimized by `pi**` (for DPO: at a stationary point
//! `lambda (rho_i - rho_j) = r*_i - r*_j` for every pair). Over a constraint set `S_pi` the
//! minimizers differ. Families here ([`Family`]): a log-linear policy `pi_theta(y|x) ∝
//! pi_ref(y|x) exp(theta . phi(x,y))` with `theta` in `R^d` shared across prompts, a step budget
//! (`T` steps of gradient descent from `pi_ref`), and a ball `||s_x - log pi_ref(.|x)|| <= rho`
//! around the reference logits of each prompt.

use serde::Serialize;

/// One prompt of a tabular problem.
#[derive(Debug, Clone, Serialize)]
pub struct Prompt {
    /// Probability of the prompt, `D_x(x)`.
    pub weight: f64,
    /// `pi_ref(.|x)`, positive, summing to 1.
    pub pi_ref: Vec<f64>,
    /// `r*(x, .)`.
    pub reward: Vec<f64>,
    /// `phi(x, y)`: one row of `d` features per response (the log-linear family).
    pub features: Vec<Vec<f64>>,
}

/// Prompts, responses, rewards and `lambda`.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub lambda: f64,
    pub prompts: Vec<Prompt>,
}

/// Logits per prompt; the policy is their softmax.
pub type Logits = Vec<Vec<f64>>;

/// The two objectives of Prop. 3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Eq. (3) with the true reward `r*`.
    Rlhf,
    /// The expectation of eq. (6) under the data distribution.
    Dpo,
}

/// A constraint set `S_pi`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "family")]
pub enum Family {
    /// All policies (softmax logits per prompt, unconstrained).
    Unconstrained,
    /// `pi_theta(y|x) ∝ pi_ref(y|x) exp(theta . phi(x,y))`, `theta` shared by all prompts.
    LogLinear,
    /// The end of `steps` steps of gradient descent on the logits from `pi_ref` at a fixed
    /// learning rate (on `RLHF / lambda`, so that both objectives are in nats and have gradients
    /// of the same scale at any `lambda`).
    StepBudget { steps: usize, learning_rate: f64 },
    /// `||s_x - log pi_ref(.|x)||_2 <= radius` for every prompt (projected gradient).
    L2Ball { radius: f64 },
}

/// A policy with both objectives evaluated at it.
#[derive(Debug, Clone, Serialize)]
pub struct Solution {
    /// `pi(.|x)` per prompt.
    pub policy: Vec<Vec<f64>>,
    pub rlhf: f64,
    pub dpo: f64,
    /// Max over prompts of the total variation to `pi**`.
    pub tv_to_optimal: f64,
    /// `sum_x w_x KL(pi || pi**)` (mode seeking; RLHF's) and `KL(pi** || pi)` (mode covering).
    pub kl_to_optimal: f64,
    pub kl_from_optimal: f64,
}

/// Both minimizers within one family and how far apart they are.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyResult {
    #[serde(flatten)]
    pub family: Family,
    pub rlhf_minimizer: Solution,
    pub dpo_minimizer: Solution,
    /// Max over prompts of `TV(pi_rlhf, pi_dpo) = 0.5 sum_y |pi_rlhf - pi_dpo|`.
    pub tv: f64,
    /// Max over prompts and responses of `|pi_rlhf - pi_dpo|`.
    pub max_abs: f64,
}

/// The Appendix C special case: its identities checked on random policies, and its families.
#[derive(Debug, Clone, Serialize)]
pub struct AppendixC {
    pub problem: Problem,
    /// Max over random policies of `|DPO - KL(pi** || pi) - H(pi**)|` (eq. 22).
    pub dpo_forward_kl_error: f64,
    /// Max over random policies of `|RLHF - lambda KL(pi || pi**) + lambda log Z|` (eq. 16).
    pub rlhf_backward_kl_error: f64,
    /// With one shared `theta` (`pi_theta(y_1|x) = sigmoid(theta)` for every prompt), the
    /// closed forms: DPO's minimizer is the mean `sum_x w_x pi**(y_1|x)` (forward KL: moment
    /// matching), RLHF's has `logit = sum_x w_x logit pi**(y_1|x)` (backward KL).
    pub shared_dpo_closed_form: f64,
    pub shared_rlhf_closed_form: f64,
    pub families: Vec<FamilyResult>,
}

/// Everything `dpo-train experiment constraint-gap` writes.
#[derive(Debug, Clone, Serialize)]
pub struct GapReport {
    pub problem: Problem,
    /// `pi**` per prompt.
    pub optimal: Vec<Vec<f64>>,
    pub families: Vec<FamilyResult>,
    pub appendix_c: AppendixC,
}

/// Knobs of the experiment.
#[derive(Debug, Clone, Copy)]
pub struct GapSettings {
    pub lambda: f64,
    pub steps: usize,
    pub learning_rate: f64,
    pub radius: f64,
}

impl Default for GapSettings {
    fn default() -> Self {
        GapSettings { lambda: 1.0, steps: 20, learning_rate: 1.0, radius: 0.75 }
    }
}

/// Runs the experiment: the example problem under every family, and Appendix C's case.
pub fn constraint_gap(s: &GapSettings) -> GapReport {
    let problem = Problem::example(s.lambda);
    let families = [
        Family::Unconstrained,
        Family::LogLinear,
        Family::StepBudget { steps: s.steps, learning_rate: s.learning_rate },
        Family::L2Ball { radius: s.radius },
    ];
    let results = families.iter().map(|f| problem.compare(*f)).collect();
    let c = Problem::appendix_c();
    let mut rng = SplitMix(3);
    let (mut dpo_err, mut rlhf_err) = (0.0f64, 0.0f64);
    let opt = c.optimal();
    let entropy: f64 =
        c.prompts.iter().zip(&opt).map(|(p, q)| -p.weight * q.iter().map(|v| v * v.ln()).sum::<f64>()).sum();
    let log_z: f64 = c.prompts.iter().map(|p| p.weight * p.log_partition(c.lambda)).sum();
    for _ in 0..200 {
        let s: Logits =
            c.prompts.iter().map(|p| p.pi_ref.iter().map(|_| rng.uniform(-6.0, 6.0)).collect()).collect();
        let pol = policies(&s);
        dpo_err = dpo_err.max((c.value(Objective::Dpo, &s) - c.kl(&opt, &pol) - entropy).abs());
        rlhf_err = rlhf_err
            .max((c.value(Objective::Rlhf, &s) - c.lambda * c.kl(&pol, &opt) + c.lambda * log_z).abs());
    }
    let q1: Vec<f64> = opt.iter().map(|q| q[0]).collect();
    let w: Vec<f64> = c.prompts.iter().map(|p| p.weight).collect();
    let logit = |p: f64| (p / (1.0 - p)).ln();
    let appendix_c = AppendixC {
        dpo_forward_kl_error: dpo_err,
        rlhf_backward_kl_error: rlhf_err,
        shared_dpo_closed_form: w.iter().zip(&q1).map(|(w, q)| w * q).sum(),
        shared_rlhf_closed_form: sigmoid(w.iter().zip(&q1).map(|(w, q)| w * logit(*q)).sum()),
        families: [Family::Unconstrained, Family::LogLinear].iter().map(|f| c.compare(*f)).collect(),
        problem: c,
    };
    GapReport { optimal: problem.optimal(), problem, families: results, appendix_c }
}

impl Prompt {
    fn log_partition(&self, lambda: f64) -> f64 {
        log_sum_exp(
            &self.pi_ref.iter().zip(&self.reward).map(|(p, r)| p.ln() + r / lambda).collect::<Vec<_>>(),
        )
    }
}

impl Problem {
    /// Three prompts with `K = 8` responses, non-uniform references and a bimodal reward on the
    /// first; features `phi(y) = (t, t^2)`, `t = (y - 3.5) / 3.5`, cannot represent `r*`.
    pub fn example(lambda: f64) -> Problem {
        let features: Vec<Vec<f64>> = (0..8)
            .map(|y| {
                let t = (y as f64 - 3.5) / 3.5;
                vec![t, t * t]
            })
            .collect();
        let prompt = |weight, pi_ref: [f64; 8], reward: [f64; 8]| Prompt {
            weight,
            pi_ref: pi_ref.to_vec(),
            reward: reward.to_vec(),
            features: features.clone(),
        };
        Problem {
            lambda,
            prompts: vec![
                prompt(
                    0.5,
                    [0.08, 0.12, 0.15, 0.17, 0.16, 0.13, 0.11, 0.08],
                    [-1.0, 2.0, 0.0, -1.5, -1.5, 0.0, 1.5, -1.0],
                ),
                prompt(0.25, [0.125; 8], [1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.0, 2.0]),
                prompt(
                    0.25,
                    [0.3, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05],
                    [0.0, 0.5, 1.0, 1.5, 1.0, 0.5, 3.0, 0.0],
                ),
            ],
        }
    }

    /// Appendix C: `pi_ref` uniform over two responses, `lambda = 1`; three prompts with
    /// different rewards, feature `phi(x, y) = (+1/2, -1/2)` (so `pi_theta(y_1|x) = sigmoid(theta)`).
    pub fn appendix_c() -> Problem {
        let prompt = |weight, r1: f64| Prompt {
            weight,
            pi_ref: vec![0.5, 0.5],
            reward: vec![r1, 0.0],
            features: vec![vec![0.5], vec![-0.5]],
        };
        Problem { lambda: 1.0, prompts: vec![prompt(0.5, 2.5), prompt(0.3, -0.5), prompt(0.2, 0.25)] }
    }

    /// `log pi_ref` per prompt.
    pub fn ref_logits(&self) -> Logits {
        self.prompts.iter().map(|p| p.pi_ref.iter().map(|v| v.ln()).collect()).collect()
    }

    /// `pi**` per prompt, eq. (4)/(17).
    pub fn optimal(&self) -> Vec<Vec<f64>> {
        self.prompts
            .iter()
            .map(|p| {
                softmax(
                    &p.pi_ref
                        .iter()
                        .zip(&p.reward)
                        .map(|(q, r)| q.ln() + r / self.lambda)
                        .collect::<Vec<_>>(),
                )
            })
            .collect()
    }

    /// `sum_x w_x KL(a(.|x) || b(.|x))`.
    pub fn kl(&self, a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
        let kl = |a: &[f64], b: &[f64]| -> f64 {
            a.iter().zip(b).filter(|(p, _)| **p > 0.0).map(|(p, q)| p * (p.ln() - q.ln())).sum()
        };
        self.prompts.iter().zip(a.iter().zip(b)).map(|(p, (a, b))| p.weight * kl(a, b)).sum()
    }

    /// The objective at the policy `softmax(s)`.
    pub fn value(&self, objective: Objective, s: &Logits) -> f64 {
        self.value_and_grad(objective, s).0
    }

    /// The objective and its gradient w.r.t. the logits (analytic).
    pub fn value_and_grad(&self, objective: Objective, s: &Logits) -> (f64, Logits) {
        let lambda = self.lambda;
        let mut total = 0.0;
        let mut grads = Vec::with_capacity(s.len());
        for (p, s) in self.prompts.iter().zip(s) {
            let k = s.len();
            let mut g = vec![0.0; k];
            match objective {
                Objective::Rlhf => {
                    // h_y = lambda (log pi_y - log pi_ref_y) - r_y; dL/ds_k = pi_k (h_k - <pi, h>).
                    let lp = log_softmax(s);
                    let pi: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
                    let h: Vec<f64> =
                        (0..k).map(|y| lambda * (lp[y] - p.pi_ref[y].ln()) - p.reward[y]).collect();
                    let mean: f64 = (0..k).map(|y| pi[y] * h[y]).sum();
                    total += p.weight * mean;
                    (0..k).for_each(|y| g[y] = p.weight * pi[y] * (h[y] - mean));
                }
                Objective::Dpo => {
                    let collision: f64 = p.pi_ref.iter().map(|v| v * v).sum();
                    for i in 0..k {
                        for j in 0..k {
                            if i == j {
                                continue;
                            }
                            let w = 2.0 * p.pi_ref[i] * p.pi_ref[j] * sigmoid(p.reward[i] - p.reward[j])
                                / (1.0 - collision);
                            let delta = (s[i] - s[j]) - (p.pi_ref[i].ln() - p.pi_ref[j].ln());
                            total += p.weight * w * softplus(-lambda * delta);
                            let d = -p.weight * w * lambda * sigmoid(-lambda * delta);
                            g[i] += d;
                            g[j] -= d;
                        }
                    }
                }
            }
            grads.push(g);
        }
        (total, grads)
    }

    /// The policy in `family` that minimizes (or, for a step budget, descends) `objective`.
    pub fn solve(&self, family: Family, objective: Objective) -> Logits {
        let base = self.ref_logits();
        let shape: Vec<usize> = base.iter().map(Vec::len).collect();
        match family {
            Family::Unconstrained => {
                let f = |x: &[f64]| {
                    let (v, g) = self.value_and_grad(objective, &unflatten(x, &shape));
                    (v, g.concat())
                };
                unflatten(&lbfgs(&f, base.concat()), &shape)
            }
            Family::LogLinear => {
                let d = self.prompts[0].features[0].len();
                let logits = |theta: &[f64]| -> Logits {
                    self.prompts
                        .iter()
                        .zip(&base)
                        .map(|(p, b)| b.iter().zip(&p.features).map(|(b, phi)| b + dot(phi, theta)).collect())
                        .collect()
                };
                let f = |theta: &[f64]| {
                    let (v, g) = self.value_and_grad(objective, &logits(theta));
                    let mut gt = vec![0.0; d];
                    for (p, g) in self.prompts.iter().zip(&g) {
                        for (phi, gy) in p.features.iter().zip(g) {
                            gt.iter_mut().zip(phi).for_each(|(t, f)| *t += gy * f);
                        }
                    }
                    (v, gt)
                };
                logits(&lbfgs(&f, vec![0.0; d]))
            }
            Family::StepBudget { steps, learning_rate } => {
                let scale = if objective == Objective::Rlhf { 1.0 / self.lambda } else { 1.0 };
                let mut s = base;
                for _ in 0..steps {
                    let (_, g) = self.value_and_grad(objective, &s);
                    for (s, g) in s.iter_mut().zip(g) {
                        s.iter_mut().zip(g).for_each(|(s, g)| *s -= learning_rate * scale * g);
                    }
                }
                s
            }
            Family::L2Ball { radius } => {
                let project = |x: &mut [f64]| {
                    let mut at = 0;
                    for &k in &shape {
                        let part = &mut x[at..at + k];
                        let norm = part.iter().map(|v| v * v).sum::<f64>().sqrt();
                        if norm > radius {
                            part.iter_mut().for_each(|v| *v *= radius / norm);
                        }
                        at += k;
                    }
                };
                let b = base.concat();
                let f = |delta: &[f64]| {
                    let s: Vec<f64> = b.iter().zip(delta).map(|(b, d)| b + d).collect();
                    let (v, g) = self.value_and_grad(objective, &unflatten(&s, &shape));
                    (v, g.concat())
                };
                let delta = projected_gradient(&f, &project, vec![0.0; b.len()]);
                unflatten(&b.iter().zip(&delta).map(|(b, d)| b + d).collect::<Vec<_>>(), &shape)
            }
        }
    }

    /// Both objectives' solutions in `family`, evaluated under both objectives.
    pub fn compare(&self, family: Family) -> FamilyResult {
        let optimal = self.optimal();
        let solution = |s: Logits| {
            let policy = policies(&s);
            Solution {
                rlhf: self.value(Objective::Rlhf, &s),
                dpo: self.value(Objective::Dpo, &s),
                tv_to_optimal: policy.iter().zip(&optimal).map(|(a, b)| tv(a, b)).fold(0.0, f64::max),
                kl_to_optimal: self.kl(&policy, &optimal),
                kl_from_optimal: self.kl(&optimal, &policy),
                policy,
            }
        };
        let rlhf = solution(self.solve(family, Objective::Rlhf));
        let dpo = solution(self.solve(family, Objective::Dpo));
        let pairs = || rlhf.policy.iter().zip(&dpo.policy);
        FamilyResult {
            family,
            tv: pairs().map(|(a, b)| tv(a, b)).fold(0.0, f64::max),
            max_abs: pairs()
                .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
                .fold(0.0, f64::max),
            rlhf_minimizer: rlhf,
            dpo_minimizer: dpo,
        }
    }
}

/// The penalty `log(gamma + u)` of Sec. 5, normalized affinely to value 0 and slope 1 at `u0`:
/// `(gamma + u0) (log(gamma + u) - log(gamma + u0))`. `gamma -> 0` gives `u0 log(u / u0)` (the
/// `l0`-like `log u`), `gamma -> inf` gives `u - u0` (the `l1` norm), Fig. 2.
pub fn normalized_penalty(gamma: f64, u: f64, u0: f64) -> f64 {
    (gamma + u0) * ((u - u0) / (gamma + u0)).ln_1p()
}

/// Total variation `0.5 sum |a - b|`.
pub fn tv(a: &[f64], b: &[f64]) -> f64 {
    0.5 * a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>()
}

/// `softmax` of each prompt's logits.
pub fn policies(s: &Logits) -> Vec<Vec<f64>> {
    s.iter().map(|s| softmax(s)).collect()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) }
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn log_sum_exp(x: &[f64]) -> f64 {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let z = log_sum_exp(x);
    x.iter().map(|v| v - z).collect()
}

fn softmax(x: &[f64]) -> Vec<f64> {
    log_softmax(x).iter().map(|v| v.exp()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unflatten(x: &[f64], shape: &[usize]) -> Logits {
    let mut at = 0;
    shape
        .iter()
        .map(|&k| {
            at += k;
            x[at - k..at].to_vec()
        })
        .collect()
}

/// A function and its gradient.
type ValueAndGrad<'a> = dyn Fn(&[f64]) -> (f64, Vec<f64>) + 'a;

/// L-BFGS (memory 10) with an Armijo backtracking line search and steps of at most 1 per
/// coordinate; stops when the gradient's
/// largest entry is below 1e-12 or no step decreases `f` any more (f64 exhausted).
fn lbfgs(f: &ValueAndGrad, mut x: Vec<f64>) -> Vec<f64> {
    let (mut fx, mut g) = f(&x);
    let mut memory: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    for _ in 0..10_000 {
        if g.iter().all(|v| v.abs() < 1e-12) {
            break;
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(memory.len());
        for (s, y, rho) in memory.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(q, y)| *q -= a * y);
            alphas.push(a);
        }
        if let Some((s, y, _)) = memory.back() {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|q| *q *= gamma);
        }
        for ((s, y, rho), a) in memory.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - b) * s);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        if dot(&d, &g) >= 0.0 {
            d = g.iter().map(|v| -v).collect();
            memory.clear();
        }
        // At most 1 per logit a step: a long step can push a logit far down, where softmax's
        // gradient vanishes and RLHF stalls on a plateau far from its minimum.
        let longest = d.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if longest > 1.0 {
            d.iter_mut().for_each(|v| *v /= longest);
        }
        let slope = dot(&d, &g);
        let mut t = 1.0;
        let accepted = loop {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(x, d)| x + t * d).collect();
            let (fnew, gnew) = f(&xn);
            if fnew <= fx + 1e-4 * t * slope {
                break Some((xn, fnew, gnew));
            }
            t *= 0.5;
            if t < 1e-20 {
                break None;
            }
        };
        let Some((xn, fnew, gnew)) = accepted else { break };
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gnew.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-300 {
            if memory.len() == 10 {
                memory.pop_front();
            }
            memory.push_back((s, y, 1.0 / sy));
        }
        let no_progress = fnew == fx && xn == x;
        (x, fx, g) = (xn, fnew, gnew);
        if no_progress {
            break;
        }
    }
    x
}

/// Projected gradient descent with a backtracking step (sufficient decrease of the projected
/// step); stops when an accepted step moves no entry by more than 1e-14.
fn projected_gradient(f: &ValueAndGrad, project: &dyn Fn(&mut [f64]), mut x: Vec<f64>) -> Vec<f64> {
    let (mut fx, mut g) = f(&x);
    let mut step = 1.0;
    for _ in 0..200_000 {
        let (xn, fnew, gnew) = loop {
            let mut xn: Vec<f64> = x.iter().zip(&g).map(|(x, g)| x - step * g).collect();
            project(&mut xn);
            let diff: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
            let (fnew, gnew) = f(&xn);
            if fnew <= fx + dot(&g, &diff) + dot(&diff, &diff) / (2.0 * step) || step < 1e-12 {
                break (xn, fnew, gnew);
            }
            step *= 0.5;
        };
        let moved = xn.iter().zip(&x).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        (x, fx, g) = (xn, fnew, gnew);
        if moved < 1e-14 {
            break;
        }
        step = (step * 1.5).min(100.0);
    }
    x
}

/// SplitMix64, for seeded random policies.
struct SplitMix(u64);
impl SplitMix {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        lo + (hi - lo) * (((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_logits(p: &Problem, rng: &mut SplitMix) -> Logits {
        p.prompts.iter().map(|q| q.pi_ref.iter().map(|_| rng.uniform(-3.0, 3.0)).collect()).collect()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = SplitMix(11);
        for lambda in [0.3, 1.0, 2.5] {
            let p = Problem::example(lambda);
            for objective in [Objective::Rlhf, Objective::Dpo] {
                for _ in 0..5 {
                    let s = random_logits(&p, &mut rng);
                    let (_, g) = p.value_and_grad(objective, &s);
                    for x in 0..s.len() {
                        for y in 0..s[x].len() {
                            let h = 1e-5;
                            let mut plus = s.clone();
                            let mut minus = s.clone();
                            plus[x][y] += h;
                            minus[x][y] -= h;
                            let fd = (p.value(objective, &plus) - p.value(objective, &minus)) / (2.0 * h);
                            assert!(
                                (fd - g[x][y]).abs() < 1e-8,
                                "{objective:?} {x} {y}: {fd} vs {}",
                                g[x][y]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rlhf_is_lambda_times_backward_kl_to_optimal_up_to_a_constant() {
        let mut rng = SplitMix(5);
        let p = Problem::example(0.7);
        let opt = p.optimal();
        let log_z: f64 = p.prompts.iter().map(|q| q.weight * q.log_partition(p.lambda)).sum();
        for _ in 0..50 {
            let s = random_logits(&p, &mut rng);
            let kl = p.kl(&policies(&s), &opt);
            assert!((p.value(Objective::Rlhf, &s) - (p.lambda * kl - p.lambda * log_z)).abs() < 1e-12);
        }
    }

    #[test]
    fn appendix_c_identities_hold() {
        let r = constraint_gap(&GapSettings::default());
        assert!(r.appendix_c.dpo_forward_kl_error < 1e-12, "{}", r.appendix_c.dpo_forward_kl_error);
        assert!(r.appendix_c.rlhf_backward_kl_error < 1e-12, "{}", r.appendix_c.rlhf_backward_kl_error);
        let [unc, shared] = &r.appendix_c.families[..] else { panic!() };
        assert!(
            unc.tv < 1e-6
                && unc.rlhf_minimizer.tv_to_optimal < 1e-6
                && unc.dpo_minimizer.tv_to_optimal < 1e-6
        );
        // The shared-theta family: both closed forms reproduced, and they differ.
        let dpo = shared.dpo_minimizer.policy[0][0];
        let rlhf = shared.rlhf_minimizer.policy[0][0];
        assert!((dpo - r.appendix_c.shared_dpo_closed_form).abs() < 1e-9, "{dpo}");
        assert!((rlhf - r.appendix_c.shared_rlhf_closed_form).abs() < 1e-9, "{rlhf}");
        assert!(shared.tv > 1e-2, "{}", shared.tv);
    }

    #[test]
    fn unconstrained_minimizers_coincide_with_pi_star_star() {
        for lambda in [0.5, 1.0, 2.0] {
            let r = Problem::example(lambda).compare(Family::Unconstrained);
            assert!(r.tv < 1e-6 && r.max_abs < 1e-6, "lambda {lambda}: tv {:e}", r.tv);
            assert!(r.rlhf_minimizer.tv_to_optimal < 1e-6 && r.dpo_minimizer.tv_to_optimal < 1e-6);
        }
    }

    #[test]
    fn constrained_minimizers_differ() {
        let s = GapSettings::default();
        let p = Problem::example(s.lambda);
        for family in [
            Family::LogLinear,
            Family::StepBudget { steps: s.steps, learning_rate: s.learning_rate },
            Family::L2Ball { radius: s.radius },
        ] {
            let r = p.compare(family);
            assert!(r.tv > 1e-2, "{family:?}: tv {:e}", r.tv);
            if !matches!(family, Family::StepBudget { .. }) {
                // Each is the better one under its own objective.
                assert!(r.rlhf_minimizer.rlhf < r.dpo_minimizer.rlhf - 1e-6, "{family:?}");
                assert!(r.dpo_minimizer.dpo < r.rlhf_minimizer.dpo - 1e-6, "{family:?}");
            }
        }
        // A step budget large enough reaches pi** under both.
        let long = p.compare(Family::StepBudget { steps: 20_000, learning_rate: 1.0 });
        assert!(long.tv < 1e-6, "{:e}", long.tv);
    }

    #[test]
    fn penalty_limits() {
        // gamma -> 0: u0 log(u / u0); gamma -> inf: u - u0.
        assert!((normalized_penalty(1e-12, 3.0, 1.0) - 3f64.ln()).abs() < 1e-9);
        assert!((normalized_penalty(1e9, 3.0, 1.0) - 2.0).abs() < 1e-8);
    }
}
