//! The header's one-line description of the optimizer: its name once, the
//! learning rate once, as the range the steps applied (one value when it
//! did not vary), every number to a few significant digits.
use reptrace_format::{LrSchedule, Optimizer};

/// Significant digits of the numbers shown.
const DIGITS: i32 = 4;

/// `x` to four significant digits, trailing zeros dropped:
/// `0.0040000000000000036` is `0.004`; very small or large values in
/// exponent form (`1e-7`).
pub fn significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let exponent = x.abs().log10().floor() as i32;
    if !(-4..6).contains(&exponent) {
        let s = format!("{:.*e}", (DIGITS - 1) as usize, x);
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exp}", trim(mantissa));
    }
    let decimals = (DIGITS - 1 - exponent).max(0) as usize;
    trim(&format!("{x:.decimals$}"))
}

fn trim(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s.to_owned()
    }
}

/// `name` (the producer's, e.g. PyTorch's class name; else the kind), the
/// learning rate over the steps (`lr [smallest, largest]`), then momentum,
/// Nesterov, weight decay and the schedule.
pub fn describe(o: &Optimizer, name: Option<&str>, lr: [f64; 2]) -> String {
    let kind = format!("{:?}", o.kind).to_lowercase();
    let mut s = name.unwrap_or(&kind).to_owned();
    let (lo, hi) = (significant(lr[0]), significant(lr[1]));
    if lo == hi {
        s.push_str(&format!(" lr {lo}"));
    } else {
        s.push_str(&format!(" lr {lo} to {hi}"));
    }
    if o.momentum != 0.0 {
        s.push_str(&format!(", momentum {}", significant(o.momentum)));
    }
    if o.nesterov {
        s.push_str(", nesterov");
    }
    if o.weight_decay != 0.0 {
        s.push_str(&format!(", weight decay {}", significant(o.weight_decay)));
    }
    s.push_str(", schedule ");
    s.push_str(&match &o.schedule {
        LrSchedule::Constant => "constant".to_owned(),
        LrSchedule::Step {
            every_epochs,
            gamma,
        } => format!(
            "step (×{} every {every_epochs} epochs)",
            significant(*gamma)
        ),
        LrSchedule::Cosine { .. } => "cosine".to_owned(),
        LrSchedule::External { name } => name.clone(),
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_have_a_few_significant_digits() {
        assert_eq!(significant(0.0040000000000000036), "0.004");
        assert_eq!(significant(0.1), "0.1");
        assert_eq!(significant(0.123456), "0.1235");
        assert_eq!(significant(2.0), "2");
        assert_eq!(significant(1e-7), "1e-7");
        assert_eq!(significant(0.0), "0");
    }

    #[test]
    fn the_rate_shows_once_as_its_range() {
        let mut o = Optimizer::sgd(0.0040000000000000036);
        o.momentum = 0.9;
        o.schedule = LrSchedule::External {
            name: "StepLR".into(),
        };
        let constant = describe(&o, Some("SGD"), [o.lr; 2]);
        assert_eq!(constant, "SGD lr 0.004, momentum 0.9, schedule StepLR");
        let varied = describe(&o, None, [0.00040000000000000034, o.lr]);
        assert_eq!(
            varied,
            "sgd lr 0.0004 to 0.004, momentum 0.9, schedule StepLR"
        );
    }
}
