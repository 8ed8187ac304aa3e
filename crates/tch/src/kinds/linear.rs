//! Linear: `z = W a + b`, `W` of shape `out × in`, inputs `(batch, in)`.
//!
//! Factors: `u = a` (`B × in`), `v = −η·δ` (`B × out`); `ΔW_i = v_i u_iᵀ`
//! and `‖ΔW_i‖ = ‖v_i‖·‖u_i‖`, which the recorder's writer thread computes
//! from the stored factors.
use super::{CheckProducts, Kind};
use crate::Result;
use crate::factors::Factors;
use reptrace_format::LinearSpec;
use tch::Tensor;

/// The spec of a traced Linear layer `name` from `in_features` to
/// `out_features`.
pub fn spec(name: &str, in_features: usize, out_features: usize, bias: bool) -> LinearSpec {
    LinearSpec::new(name, in_features, out_features, bias)
}

/// Linear: `u = a`, `v = −η·δ`; `‖ΔW_i‖ = ‖v_i‖·‖u_i‖` is left to the
/// recorder (`update_norm` none), which takes it from the stored factors
/// on its own thread instead of the training's.
pub fn factors(input: &Tensor, delta: &Tensor, lr: f64) -> Result<Factors> {
    let u = input.f_detach()?.f_contiguous()?;
    let v = delta.f_detach()?.f_mul_scalar(-lr)?.f_contiguous()?;
    Ok(Factors {
        u,
        v,
        update_norm: None,
    })
}

impl Kind for LinearSpec {
    fn fits(&self, size: &[usize]) -> bool {
        size[1..] == [self.in_features]
    }

    fn traced_input(&self) -> String {
        format!("(batch, {}) inputs", self.in_features)
    }

    fn output_shape(
        &self,
        module: usize,
        shape: &[usize],
    ) -> std::result::Result<Vec<usize>, String> {
        if shape != [self.in_features] || self.out_features == 0 {
            return Err(format!(
                "layer {} expects [{}] inputs, gets {shape:?} (module {module})",
                self.name, self.in_features
            ));
        }
        Ok(vec![self.out_features])
    }

    fn apply(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(x.f_linear(weight, bias)?)
    }

    fn factors(&self, input: &Tensor, delta: &Tensor, lr: f64) -> Result<Factors> {
        factors(input, delta, lr)
    }

    fn check_products(&self, input: &Tensor, g: &Tensor, r: &Tensor) -> Result<CheckProducts> {
        let sum0 = |t: &Tensor| t.f_sum_dim_intlist(&[0i64][..], false, None::<tch::Kind>);
        let u = input.f_detach()?.f_to_kind(tch::Kind::Float)?;
        let ur = u.f_mv(r)?; // B
        Ok(CheckProducts {
            weight: g.f_tr()?.f_mv(&ur)?,
            weight_magnitude: g.f_abs()?.f_tr()?.f_mv(&ur.f_abs()?)?,
            bias: sum0(g)?,
            bias_magnitude: sum0(&g.f_abs()?)?,
        })
    }
}
