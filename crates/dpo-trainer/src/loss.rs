//! DPO losses as pure functions of per-pair sequence log-probs.
//!
//! Notation of the paper (Wipf, "Unavoidable Learning Constraints Alter the Foundations of
//! Direct Preference Optimization"): `beta` is its `lambda`, `w` the chosen and `l` the
//! rejected response, and the implicit rewards are
//! ```text
//! r_w = beta * log(pi_theta(y_w|x) / pi_ref(y_w|x)),   r_l = beta * log(pi_theta(y_l|x) / pi_ref(y_l|x))
//! ```
//! Every function takes `[pairs]` f32 tensors and returns per-pair losses; the trainer averages
//! them (TRL: `loss = per_pair.mean()`).

use candle_core::{Result, Tensor};

/// Sequence log-probs of one batch of pairs, each `[pairs]`.
#[derive(Debug, Clone)]
pub struct PairLogps {
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
}

/// Per-pair losses and the implicit rewards (detached).
#[derive(Debug, Clone)]
pub struct LossOutput {
    pub per_pair: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

impl PairLogps {
    /// `(r_w, r_l)`, the implicit rewards, differentiable.
    pub fn rewards(&self, beta: f64) -> Result<(Tensor, Tensor)> {
        let r_w = ((&self.policy_chosen - &self.ref_chosen)? * beta)?;
        let r_l = ((&self.policy_rejected - &self.ref_rejected)? * beta)?;
        Ok((r_w, r_l))
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
    let per_pair = neg_log_sigmoid(&(&r_w - &r_l)?)?;
    Ok(LossOutput { per_pair, chosen_rewards: r_w.detach(), rejected_rewards: r_l.detach() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
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
        let x = PairLogps {
            policy_chosen: lp.clone(),
            policy_rejected: t(&[-4.0, -1.0]),
            ref_chosen: lp,
            ref_rejected: t(&[-4.0, -1.0]),
        };
        let out = sigmoid(&x, 0.1).unwrap();
        let v: Vec<f64> = out.per_pair.to_vec1().unwrap();
        assert_eq!(v, vec![std::f64::consts::LN_2; 2]);
    }

    #[test]
    fn sigmoid_loss_matches_closed_form() {
        let x = PairLogps {
            policy_chosen: t(&[-2.0]),
            policy_rejected: t(&[-5.0]),
            ref_chosen: t(&[-3.0]),
            ref_rejected: t(&[-4.0]),
        };
        // margin = beta * ((-2 + 3) - (-5 + 4)) = 0.5 * 2 = 1
        let out = sigmoid(&x, 0.5).unwrap();
        let v: Vec<f64> = out.per_pair.to_vec1().unwrap();
        assert!((v[0] - (1.0 + (-1.0f64).exp()).ln()).abs() < 1e-12);
        assert_eq!(out.chosen_rewards.to_vec1::<f64>().unwrap(), vec![0.5]);
        assert_eq!(out.rejected_rewards.to_vec1::<f64>().unwrap(), vec![-0.5]);
    }
}
