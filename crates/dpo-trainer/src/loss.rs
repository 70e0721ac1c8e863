//! DPO losses as pure functions of per-pair sequence log-probs.
//!
//! Notation of the paper (Wipf, "Unavoidable Learning Constraints Alter the Foundations of
//! Direct Preference Optimization"): `beta` is its `lambda`, `w` the chosen and `l` the
//! rejected response, `p*` policy and `r*` reference log-probs (`pw = log pi_theta(y_w|x)`, ...):
//! ```text
//! r_w = beta (pw - rw),   r_l = beta (pl - rl),   z = r_w - r_l        implicit rewards, margin
//! u     = (pi_theta(y_l|x) / pi_theta(y_w|x))^beta = exp(beta (pl - pw))   eq. (12), the variable
//! gamma = (pi_ref(y_l|x)   / pi_ref(y_w|x))^beta   = exp(beta (rl - rw))   eq. (12), the "noise"
//! z = log gamma - log u
//! ```
//! Every loss takes `[pairs]` tensors and returns per-pair losses; the trainer averages them
//! (TRL: `loss = per_pair.mean()`), plus an optional SFT term ([`sft`], [`LossOutput::total`]).
//!
//! | `loss_type` | per pair | `grad_weight = abs(d loss / d z)` |
//! |---|---|---|
//! | `sigmoid`, eq. (6) | `-log sigmoid(z) = log(gamma + u) - log gamma` | `sigmoid(-z) = u / (gamma + u)` |
//! | `gaussian`, eq. (26)-(27) | `log(gamma + u)` | `sigmoid(-z) = u / (gamma + u)` |
//! | `robust` (eps = label_smoothing) | `[(1-eps)(-log sigmoid(z)) - eps(-log sigmoid(-z))] / (1-2eps)` | `[(1-eps) u + eps gamma] / [(1-2eps)(gamma + u)]` |
//! | `hinge` | `relu(1 - z)` | `1[z < 1]` |
//! | `ipo` | `(z_ipo / beta - 1/(2 beta))^2`, `z_ipo = beta (cw/nw - cl/nl)` | `2 abs(z_ipo - 1/2) / beta^2` (w.r.t. `z_ipo`) |
//!
//! In the paper's view (Sec. 5) the sigmoid/gaussian weight is `d log(gamma + u) / d log u`:
//! a pair whose reference is already wrong (large `gamma`) pulls less for the same `u`.
//! IPO is not a function of `z` (it averages the log-ratios `cw = pw - rw`, `cl = pl - rl`
//! over the `nw`, `nl` completion tokens), so its weight is taken w.r.t. its own margin `z_ipo`.

use candle_core::{Result, Tensor};

/// Sequence log-probs of one batch of pairs, each `[pairs]`, and the completion lengths.
#[derive(Debug, Clone)]
pub struct PairLogps {
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    /// Completion tokens of each chosen / rejected row, `[pairs]` in the log-probs' dtype: TRL's
    /// `completion_mask.sum(dim=1)`, used only by IPO's per-token averages.
    pub chosen_len: Tensor,
    pub rejected_len: Tensor,
    /// Chosen completion tokens scored in the batch (TRL's shifted mask): the SFT denominator.
    /// It equals the sum of `chosen_len` unless a prompt is empty after TRL's prefix split (the
    /// completion's first token, at position 0, is then never scored).
    pub chosen_scored: usize,
}

/// Per-pair losses, the implicit rewards and the noise diagnostics (all `[pairs]`, detached
/// except `per_pair` and `sft_term`).
#[derive(Debug, Clone)]
pub struct LossOutput {
    pub per_pair: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
    /// `log gamma = beta (rl - rw)`, the reference's "noise" of eq. (12).
    pub log_gamma: Tensor,
    /// `abs(d per_pair / d z)`, the pair's effective gradient weight (table above).
    pub grad_weight: Tensor,
    /// `sft_weight * sft`, a differentiable scalar, when the SFT term is on.
    pub sft_term: Option<Tensor>,
}

impl PairLogps {
    /// Pairs with every completion length 1 (so IPO sees summed log-ratios).
    pub fn new(
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        ref_chosen: Tensor,
        ref_rejected: Tensor,
    ) -> Result<Self> {
        let ones = policy_chosen.ones_like()?;
        let pairs = policy_chosen.elem_count();
        Ok(PairLogps {
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            chosen_len: ones.clone(),
            rejected_len: ones,
            chosen_scored: pairs,
        })
    }

    /// Sets the completion lengths (see the fields).
    pub fn with_lengths(
        mut self,
        chosen: &[usize],
        rejected: &[usize],
        chosen_scored: usize,
    ) -> Result<Self> {
        let t = |v: &[usize]| {
            let v: Vec<f64> = v.iter().map(|&n| n as f64).collect();
            Tensor::new(v, self.policy_chosen.device())?.to_dtype(self.policy_chosen.dtype())
        };
        self.chosen_len = t(chosen)?;
        self.rejected_len = t(rejected)?;
        self.chosen_scored = chosen_scored;
        Ok(self)
    }

    /// `(r_w, r_l)`, the implicit rewards, differentiable.
    pub fn rewards(&self, beta: f64) -> Result<(Tensor, Tensor)> {
        let r_w = ((&self.policy_chosen - &self.ref_chosen)? * beta)?;
        let r_l = ((&self.policy_rejected - &self.ref_rejected)? * beta)?;
        Ok((r_w, r_l))
    }

    /// `log gamma = beta (rl - rw)`, differentiable in the reference log-probs.
    pub fn log_gamma(&self, beta: f64) -> Result<Tensor> {
        (&self.ref_rejected - &self.ref_chosen)? * beta
    }

    /// `log u = beta (pl - pw)`, differentiable.
    pub fn log_u(&self, beta: f64) -> Result<Tensor> {
        (&self.policy_rejected - &self.policy_chosen)? * beta
    }
}

impl LossOutput {
    fn new(x: &PairLogps, beta: f64, per_pair: Tensor, grad_weight: Tensor) -> Result<Self> {
        let (r_w, r_l) = x.rewards(beta)?;
        Ok(LossOutput {
            per_pair,
            chosen_rewards: r_w.detach(),
            rejected_rewards: r_l.detach(),
            log_gamma: x.log_gamma(beta)?.detach(),
            grad_weight: grad_weight.detach(),
            sft_term: None,
        })
    }

    /// Adds `weight * sft(x)` (TRL: `loss_type = [..., "sft"]`, `loss_weights = [1, weight]`).
    pub fn with_sft(mut self, x: &PairLogps, weight: f64) -> Result<Self> {
        self.sft_term = Some((sft(x)? * weight)?);
        Ok(self)
    }

    /// The batch loss, differentiable: `mean(per_pair) + sft_term`.
    pub fn total(&self) -> Result<Tensor> {
        let mean = self.per_pair.mean_all()?;
        match &self.sft_term {
            Some(s) => mean + s,
            None => Ok(mean),
        }
    }
}

/// `-log sigmoid(z)`, stable for any `z`, with the exact gradient `-sigmoid(-z)` everywhere,
/// including `z = 0` where policy equals reference (DPO's first step). Written as
/// `m + log(exp(-m) + exp(-z - m))` with `m = max(-z, 0)` held constant, so no `relu` or `abs`
/// kink sits on the gradient path.
pub fn neg_log_sigmoid(z: &Tensor) -> Result<Tensor> {
    let m = z.neg()?.relu()?.detach();
    let a = m.neg()?.exp()?;
    let b = (z.neg()? - &m)?.exp()?;
    (a + b)?.log()? + m
}

/// Eq. (6), `loss_type = "sigmoid"`: `-log sigmoid(r_w - r_l)`.
pub fn sigmoid(x: &PairLogps, beta: f64) -> Result<LossOutput> {
    let (r_w, r_l) = x.rewards(beta)?;
    let z = (&r_w - &r_l)?;
    let weight = candle_nn::ops::sigmoid(&z.detach().neg()?)?;
    LossOutput::new(x, beta, neg_log_sigmoid(&z)?, weight)
}

/// Eqs. (10)-(11) with each pair's variance minimized out, eqs. (24)-(26), and
/// `mu(.) = (.)^(beta/2)`, eq. (27): `log(xi_theta^2 + xi_ref^2) = log(u + gamma)`,
/// `loss_type = "gaussian"`. Computed as `m + log(exp(log u - m) + exp(log gamma - m))` with
/// `m = max(log u, log gamma)` held constant.
///
/// Prop. 4.1: since `log(a + b) = log b + log(1 + a/b)` with `a = u`, `b = gamma`,
/// `gaussian = sigmoid + log gamma = sigmoid + beta (rl - rw)` per pair, a constant that does
/// not depend on the policy, so both losses have the same policy gradients. The trainer reports
/// the value as is (it is what the model minimizes): at the start it is `ln 2 + mean log gamma`,
/// not `ln 2`; `loss - mean(log_gamma)` is the `sigmoid` loss of the same batch.
pub fn gaussian(x: &PairLogps, beta: f64) -> Result<LossOutput> {
    let (log_u, log_gamma) = (x.log_u(beta)?, x.log_gamma(beta)?);
    let m = log_u.maximum(&log_gamma)?.detach();
    let per_pair = (((&log_u - &m)?.exp()? + (log_gamma - &m)?.exp()?)?.log()? + m)?;
    let weight = (log_u.detach() - per_pair.detach())?.exp()?; // u / (gamma + u)
    LossOutput::new(x, beta, per_pair, weight)
}

/// TRL `robust` (Chowdhury et al. 2024), `eps = label_smoothing` in `[0, 0.5)`:
/// `[(1 - eps)(-log sigmoid(z)) - eps (-log sigmoid(-z))] / (1 - 2 eps)`; `eps = 0` is `sigmoid`.
pub fn robust(x: &PairLogps, beta: f64, eps: f64) -> Result<LossOutput> {
    let (r_w, r_l) = x.rewards(beta)?;
    let z = (&r_w - &r_l)?;
    let clean = (neg_log_sigmoid(&z)? * (1.0 - eps))?;
    let flipped = (neg_log_sigmoid(&z.neg()?)? * eps)?;
    let per_pair = ((clean - flipped)? / (1.0 - 2.0 * eps))?;
    let zd = z.detach();
    let weight = ((candle_nn::ops::sigmoid(&zd.neg()?)? * (1.0 - eps))?
        + (candle_nn::ops::sigmoid(&zd)? * eps)?)?
        / (1.0 - 2.0 * eps);
    LossOutput::new(x, beta, per_pair, weight?)
}

/// TRL `hinge` (SLiC): `relu(1 - z)`, with PyTorch's `relu'(0) = 0` (the mask is held
/// constant, so candle's `relu'(0) = 1` never enters).
pub fn hinge(x: &PairLogps, beta: f64) -> Result<LossOutput> {
    let (r_w, r_l) = x.rewards(beta)?;
    let slack = (&r_w - &r_l)?.affine(-1.0, 1.0)?;
    let active = slack.gt(&slack.zeros_like()?)?.to_dtype(slack.dtype())?.detach();
    LossOutput::new(x, beta, (slack * &active)?, active)
}

/// TRL `ipo` (Azar et al. 2024, eq. 17, per-token averaged as in TRL):
/// `(cw / nw - cl / nl - 1 / (2 beta))^2` with log-ratios `cw = pw - rw`, `cl = pl - rl` and
/// completion lengths `nw`, `nl` (clamped to at least 1).
pub fn ipo(x: &PairLogps, beta: f64) -> Result<LossOutput> {
    let avg = |p: &Tensor, r: &Tensor, n: &Tensor| (p - r)? / n.maximum(&n.ones_like()?)?;
    let chosen = avg(&x.policy_chosen, &x.ref_chosen, &x.chosen_len)?;
    let rejected = avg(&x.policy_rejected, &x.ref_rejected, &x.rejected_len)?;
    let h = ((chosen - rejected)? - 1.0 / (2.0 * beta))?;
    let weight = (h.detach().abs()? * (2.0 / beta))?;
    LossOutput::new(x, beta, h.sqr()?, weight)
}

/// The SFT term on the chosen responses: minus the mean log-prob per scored chosen completion
/// token of the batch, `-(sum of chosen logps) / chosen_scored` (TRL's `sft`: a batch-level
/// token mean, not a mean of per-sequence means). 0 for a batch with no scored chosen token
/// (TRL: NaN).
pub fn sft(x: &PairLogps) -> Result<Tensor> {
    let sum = x.policy_chosen.sum_all()?;
    if x.chosen_scored == 0 {
        return sum.zeros_like();
    }
    sum * (-1.0 / x.chosen_scored as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn v(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    }

    /// pw = -2, pl = -5, rw = -3, rl = -4, beta = 0.5: z = 0.5 * ((-2 + 3) - (-5 + 4)) = 1,
    /// log u = 0.5 * (-5 + 2) = -1.5, log gamma = 0.5 * (-4 + 3) = -0.5.
    fn one_pair() -> PairLogps {
        PairLogps::new(t(&[-2.0]), t(&[-5.0]), t(&[-3.0]), t(&[-4.0])).unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn neg_log_sigmoid_value_and_gradient_at_zero_and_extremes() {
        let z = Var::new(&[0.0f64, 1.0, -1.0, 80.0, -80.0, 1000.0, -1000.0], &Device::Cpu).unwrap();
        let y = neg_log_sigmoid(z.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let grad: Vec<f64> = g.get(z.as_tensor()).unwrap().to_vec1().unwrap();
        let val: Vec<f64> = y.to_vec1().unwrap();
        for (i, zi) in [0.0f64, 1.0, -1.0, 80.0, -80.0, 1000.0, -1000.0].iter().enumerate() {
            let expect = if *zi > 0.0 { (-zi).exp().ln_1p() } else { -zi + zi.exp().ln_1p() };
            let expect_grad = -1.0 / (1.0 + zi.exp());
            assert!((val[i] - expect).abs() < 1e-12, "value at {zi}: {} vs {expect}", val[i]);
            assert!((grad[i] - expect_grad).abs() < 1e-12, "grad at {zi}: {} vs {expect_grad}", grad[i]);
        }
        assert_eq!(val[0], std::f64::consts::LN_2);
        assert_eq!(grad[0], -0.5);
    }

    #[test]
    fn sigmoid_loss_is_ln2_when_policy_equals_reference() {
        let lp = t(&[-3.0, -7.5]);
        let x = PairLogps::new(lp.clone(), t(&[-4.0, -1.0]), lp, t(&[-4.0, -1.0])).unwrap();
        let out = sigmoid(&x, 0.1).unwrap();
        assert_eq!(v(&out.per_pair), vec![std::f64::consts::LN_2; 2]);
        assert_eq!(v(&out.grad_weight), vec![0.5; 2]);
    }

    #[test]
    fn sigmoid_loss_matches_closed_form() {
        let out = sigmoid(&one_pair(), 0.5).unwrap();
        // -log sigmoid(1) = ln(1 + e^-1) = 0.31326168751822286; sigmoid(-1) = 0.2689414213699951
        assert!(close(v(&out.per_pair)[0], 0.313_261_687_518_222_86, 1e-15));
        assert!(close(v(&out.grad_weight)[0], 0.268_941_421_369_995_1, 1e-15));
        assert_eq!(v(&out.chosen_rewards), vec![0.5]);
        assert_eq!(v(&out.rejected_rewards), vec![-0.5]);
        assert_eq!(v(&out.log_gamma), vec![-0.5]);
    }

    #[test]
    fn gaussian_loss_matches_closed_form() {
        let out = gaussian(&one_pair(), 0.5).unwrap();
        // ln(e^-1.5 + e^-0.5) = ln(0.22313016014842982 + 0.6065306597126334) = -0.18673831248177714
        //                     = -0.5 + ln(1 + e^-1): the sigmoid value plus log gamma.
        assert!(close(v(&out.per_pair)[0], -0.186_738_312_481_777_14, 1e-15));
        assert!(close(v(&out.grad_weight)[0], 0.268_941_421_369_995_1, 1e-15));
        assert_eq!(v(&out.log_gamma), vec![-0.5]);
        // At policy = reference: log(2 gamma) = ln 2 + log gamma.
        let x = PairLogps::new(t(&[-3.0]), t(&[-4.0]), t(&[-3.0]), t(&[-4.0])).unwrap();
        let at_ref = v(&gaussian(&x, 0.5).unwrap().per_pair)[0];
        assert!(close(at_ref, std::f64::consts::LN_2 - 0.5, 1e-15));
    }

    #[test]
    fn robust_loss_matches_closed_form() {
        let out = robust(&one_pair(), 0.5, 0.1).unwrap();
        // z = 1: [0.9 ln(1 + e^-1) - 0.1 ln(1 + e)] / 0.8
        //      = [0.9 * 0.31326168751822286 - 0.1 * 1.3132616875182228] / 0.8 = 0.18826168751822283
        assert!(close(v(&out.per_pair)[0], 0.188_261_687_518_222_83, 1e-15));
        // [0.9 sigmoid(-1) + 0.1 sigmoid(1)] / 0.8 = [0.24204727923299559 + 0.07310585786300049] / 0.8
        assert!(close(v(&out.grad_weight)[0], 0.393_941_421_369_995_05, 1e-15));
        let plain = robust(&one_pair(), 0.5, 0.0).unwrap();
        assert_eq!(v(&plain.per_pair), v(&sigmoid(&one_pair(), 0.5).unwrap().per_pair));
    }

    #[test]
    fn hinge_loss_matches_closed_form() {
        // z = beta * 2: 0.25 -> 0.5 (active); 0.5 -> z = 1, the kink (relu'(0) = 0 as PyTorch);
        // 1.5 -> z = 3 (inactive).
        for (beta, loss, weight) in [(0.25, 0.5, 1.0), (0.5, 0.0, 0.0), (1.5, 0.0, 0.0)] {
            let x = one_pair();
            let pc = Var::from_tensor(&x.policy_chosen).unwrap();
            let x = PairLogps { policy_chosen: pc.as_tensor().clone(), ..x };
            let out = hinge(&x, beta).unwrap();
            assert_eq!((v(&out.per_pair)[0], v(&out.grad_weight)[0]), (loss, weight), "beta {beta}");
            let g = out.per_pair.sum_all().unwrap().backward().unwrap();
            assert_eq!(v(g.get(pc.as_tensor()).unwrap())[0], -beta * weight);
        }
    }

    #[test]
    fn ipo_loss_matches_closed_form() {
        // cw = -2 + 3 = 1 over 2 tokens, cl = -5 + 4 = -1 over 4 tokens: 0.5 + 0.25 = 0.75;
        // 1 / (2 beta) = 1: (0.75 - 1)^2 = 0.0625; weight 2 * 0.25 / 0.5 = 1.
        let x = one_pair().with_lengths(&[2], &[4], 2).unwrap();
        let out = ipo(&x, 0.5).unwrap();
        assert_eq!(v(&out.per_pair), vec![0.0625]);
        assert_eq!(v(&out.grad_weight), vec![1.0]);
        // Zero lengths count as 1 (TRL's clamp): (1 + 1 - 1)^2 = 1.
        let x = one_pair().with_lengths(&[0], &[0], 0).unwrap();
        assert_eq!(v(&ipo(&x, 0.5).unwrap().per_pair), vec![1.0]);
    }

    #[test]
    fn sft_term_is_the_batch_token_mean_of_chosen_logps() {
        // chosen logps -6 (over 2 scored tokens) and -4 (over 3): -(-10) / 5 = 2, not the mean
        // of per-sequence means (3 + 4/3) / 2.
        let x = PairLogps::new(t(&[-6.0, -4.0]), t(&[-1.0, -1.0]), t(&[-6.0, -4.0]), t(&[-1.0, -1.0]))
            .unwrap()
            .with_lengths(&[2, 3], &[1, 1], 5)
            .unwrap();
        assert_eq!(v(&sft(&x).unwrap().unsqueeze(0).unwrap()), vec![2.0]);
        let out = sigmoid(&x, 0.1).unwrap().with_sft(&x, 0.25).unwrap();
        let total = v(&out.total().unwrap().unsqueeze(0).unwrap())[0];
        assert!(close(total, std::f64::consts::LN_2 + 0.5, 1e-15));
    }

    /// SplitMix64: a seeded source of uniform numbers for the property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next()
        }
    }

    /// `n` random pairs of log-probs `[pw, pl, rw, rl]` in three regimes: moderate (log-probs in
    /// [-60, 0]), large (in [-5000, 0], log-ratios up to 5e3) and near-ties of large values
    /// (`|z|` small while `log u`, `log gamma` are about 1e3).
    fn draws(rng: &mut Rng, n: usize) -> [Vec<f64>; 4] {
        let mut out: [Vec<f64>; 4] = Default::default();
        for i in 0..n {
            let row = match i % 3 {
                0 => [0; 4].map(|_| rng.uniform(-60.0, 0.0)),
                1 => [0; 4].map(|_| rng.uniform(-5000.0, 0.0)),
                _ => {
                    let (pw, rw) = (rng.uniform(-3000.0, -2000.0), rng.uniform(-3000.0, -2000.0));
                    let spread = rng.uniform(500.0, 2000.0);
                    let shift = rng.uniform(-3.0, 3.0);
                    [pw, pw - spread - shift, rw, rw - spread]
                }
            };
            for (o, x) in out.iter_mut().zip(row) {
                o.push(x);
            }
        }
        out
    }

    struct Grads {
        per_pair: Vec<f64>,
        log_gamma: Vec<f64>,
        grad_weight: Vec<f64>,
        /// d(sum of per-pair losses) / d input, for the four inputs in [`draws`] order.
        inputs: [Vec<f64>; 4],
    }

    fn run(
        loss: fn(&PairLogps, f64) -> Result<LossOutput>,
        cols: &[Vec<f64>; 4],
        beta: f64,
        dtype: DType,
    ) -> Grads {
        let vars = cols.clone().map(|c| Var::from_tensor(&t(&c).to_dtype(dtype).unwrap()).unwrap());
        let [pw, pl, rw, rl] = vars.clone().map(|v| v.as_tensor().clone());
        let out = loss(&PairLogps::new(pw, pl, rw, rl).unwrap(), beta).unwrap();
        let g = out.per_pair.sum_all().unwrap().backward().unwrap();
        Grads {
            per_pair: v(&out.per_pair),
            log_gamma: v(&out.log_gamma),
            grad_weight: v(&out.grad_weight),
            inputs: vars.map(|var| v(g.get(var.as_tensor()).unwrap())),
        }
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// Prop. 4.1, values: per pair, `gaussian - sigmoid = log gamma = beta (rl - rw)` exactly
    /// (relative to the size of the numbers involved), whatever the policy: redrawing the policy
    /// log-probs with the reference fixed leaves the difference where it was.
    #[test]
    fn prop_4_1_gaussian_minus_sigmoid_is_log_gamma_whatever_the_policy() {
        let mut rng = Rng(41);
        for (dtype, rel) in [(DType::F64, 1e-13), (DType::F32, 1e-6)] {
            for beta in [0.01, 0.1, 0.5, 1.0, 2.0] {
                let cols = draws(&mut rng, 3000);
                let mut other = draws(&mut rng, 3000);
                other[2] = cols[2].clone();
                other[3] = cols[3].clone();
                let mut previous: Option<Vec<f64>> = None;
                for c in [&cols, &other] {
                    let (g, s) = (run(gaussian, c, beta, dtype), run(sigmoid, c, beta, dtype));
                    let diff: Vec<f64> = g.per_pair.iter().zip(&s.per_pair).map(|(a, b)| a - b).collect();
                    for i in 0..diff.len() {
                        // In f32 the inputs themselves are rounded; the identity is about those.
                        let q = |x: f64| if dtype == DType::F32 { x as f32 as f64 } else { x };
                        let log_gamma = beta * (q(c[3][i]) - q(c[2][i]));
                        let log_u = beta * (q(c[1][i]) - q(c[0][i]));
                        let scale =
                            1.0 + g.per_pair[i].abs() + s.per_pair[i].abs() + log_gamma.abs() + log_u.abs();
                        assert!(g.per_pair[i].is_finite() && s.per_pair[i].is_finite());
                        assert!(
                            (diff[i] - log_gamma).abs() <= rel * scale,
                            "{dtype:?} beta {beta} pair {i}: {} - {} vs {log_gamma} ({:?})",
                            g.per_pair[i],
                            s.per_pair[i],
                            [c[0][i], c[1][i], c[2][i], c[3][i]]
                        );
                        assert!((g.log_gamma[i] - log_gamma).abs() <= rel * scale);
                        if let Some(p) = &previous {
                            assert!((diff[i] - p[i]).abs() <= rel * scale, "policy changed the constant");
                        }
                    }
                    previous = Some(diff);
                }
            }
        }
    }

    /// Prop. 4.1, gradients: w.r.t. the policy log-probs gaussian and sigmoid agree (absolute
    /// difference; every such gradient lies in `[-beta, beta]`); w.r.t. the reference they differ
    /// by exactly `d log gamma = (-beta, +beta)`. Max differences are printed.
    #[test]
    fn prop_4_1_policy_gradients_of_gaussian_and_sigmoid_agree() {
        let mut rng = Rng(4242);
        for (dtype, tol) in [(DType::F64, 1e-6), (DType::F32, 1e-5)] {
            let (mut worst_policy, mut worst_ref) = (0.0f64, 0.0f64);
            for beta in [0.01, 0.1, 0.5, 1.0, 2.0] {
                let cols = draws(&mut rng, 3000);
                let (g, s) = (run(gaussian, &cols, beta, dtype), run(sigmoid, &cols, beta, dtype));
                for k in 0..4 {
                    assert!(g.inputs[k].iter().chain(&s.inputs[k]).all(|x| x.is_finite()));
                }
                let policy =
                    max_abs_diff(&g.inputs[0], &s.inputs[0]).max(max_abs_diff(&g.inputs[1], &s.inputs[1]));
                let shifted = |k: usize, d: f64| -> Vec<f64> { s.inputs[k].iter().map(|x| x + d).collect() };
                let reference = max_abs_diff(&g.inputs[2], &shifted(2, -beta))
                    .max(max_abs_diff(&g.inputs[3], &shifted(3, beta)));
                assert!(policy <= tol, "{dtype:?} beta {beta}: policy gradients differ by {policy:e}");
                assert!(reference <= tol, "{dtype:?} beta {beta}: reference gradients off by {reference:e}");
                worst_policy = worst_policy.max(policy);
                worst_ref = worst_ref.max(reference);
            }
            println!(
                "{dtype:?}: max |policy grad diff| {worst_policy:e}, max |ref grad diff - beta| {worst_ref:e}"
            );
        }
    }

    /// `grad_weight` is `|d loss / d z|`: `|d loss / d pw| / beta` for the losses of `z`, and
    /// `|d loss / d pw| * nw / beta` for IPO (whose margin averages over `nw` tokens).
    #[test]
    fn grad_weight_matches_autograd() {
        let mut rng = Rng(7);
        let ipo3 = |x: &PairLogps, beta: f64| ipo(&x.clone().with_lengths(&[3; 600], &[5; 600], 1800)?, beta);
        let robust02 = |x: &PairLogps, beta: f64| robust(x, beta, 0.2);
        type Loss = fn(&PairLogps, f64) -> Result<LossOutput>;
        let cases: [(&str, Loss, f64); 5] = [
            ("sigmoid", sigmoid, 1.0),
            ("gaussian", gaussian, 1.0),
            ("robust", robust02, 1.0),
            ("hinge", hinge, 1.0),
            ("ipo", ipo3, 3.0),
        ];
        for beta in [0.1, 1.0] {
            let mut cols = draws(&mut rng, 600);
            for c in cols.iter_mut() {
                c.iter_mut().for_each(|x| *x = x.max(-40.0) / 4.0); // moderate: weights not all 0/1
            }
            for (name, loss, len) in cases {
                let r = run(loss, &cols, beta, DType::F64);
                let auto: Vec<f64> = r.inputs[0].iter().map(|g| g.abs() * len / beta).collect();
                let d = max_abs_diff(&auto, &r.grad_weight);
                assert!(d < 1e-12, "{name} beta {beta}: {d:e}");
                assert!(r.grad_weight.iter().any(|w| *w > 1e-3), "{name}: trivial weights");
            }
        }
    }
}
