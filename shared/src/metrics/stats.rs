//! Summary statistics and paired tests, matching scipy.
//!
//! - [`wilcoxon`]: `scipy.stats.wilcoxon(x, y)` two-sided with `zero_method="wilcox"` (zero
//!   differences dropped): the exact null distribution when at most 50 pairs remain and there
//!   are no ties and no zeros (`method="exact"`), else the normal approximation with tie
//!   correction and no continuity correction (`method="asymptotic"`, `correction=False`).
//! - [`ttest_rel`]: `scipy.stats.ttest_rel(x, y)` two-sided.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

/// Mean, sample SD (n - 1), median and n.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// `None` for fewer than two values.
    pub sd: Option<f64>,
    pub median: f64,
}

/// Summarises `values`; `None` when empty.
pub fn summary(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let sd = (n > 1)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    let mut sorted = values.to_vec();
    let median = super::distance::percentile(&mut sorted, 50.0);
    Some(Summary { n, mean, sd, median })
}

/// How a Wilcoxon p-value was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WilcoxonMethod {
    Exact,
    Asymptotic,
}

impl std::fmt::Display for WilcoxonMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Exact => "exact",
            Self::Asymptotic => "asymptotic",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wilcoxon {
    /// min(R+, R-), scipy's two-sided statistic.
    pub statistic: f64,
    pub p_value: f64,
    pub method: WilcoxonMethod,
    /// Pairs left after dropping zero differences.
    pub n: usize,
}

/// Why a paired test cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsError {
    #[error("paired samples have different lengths ({0} and {1})")]
    Unpaired(usize, usize),
    #[error("all {0} paired differences are zero: the test is undefined")]
    AllZero(usize),
    #[error("need at least {need} pairs, got {got}")]
    TooFew { need: usize, got: usize },
    #[error("a value is not finite")]
    NotFinite,
}

/// Average ranks (1-based) of `values`, ties sharing their mean rank; also returns the tie
/// group sizes.
fn rank_average(values: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut ties = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && values[idx[j + 1]] == values[idx[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = rank;
        }
        if j > i {
            ties.push(j - i + 1);
        }
        i = j + 1;
    }
    (ranks, ties)
}

/// Number of subsets of {1..n} with each rank sum, for the exact null distribution of R+.
fn signed_rank_counts(n: usize) -> Vec<f64> {
    let max = n * (n + 1) / 2;
    let mut c = vec![0.0f64; max + 1];
    c[0] = 1.0;
    for k in 1..=n {
        for s in (k..=max).rev() {
            c[s] += c[s - k];
        }
    }
    c
}

/// Paired two-sided Wilcoxon signed-rank test of `x - y`.
pub fn wilcoxon(x: &[f64], y: &[f64]) -> Result<Wilcoxon, StatsError> {
    if x.len() != y.len() {
        return Err(StatsError::Unpaired(x.len(), y.len()));
    }
    let d: Vec<f64> = x.iter().zip(y).map(|(a, b)| a - b).collect();
    if d.iter().any(|v| !v.is_finite()) {
        return Err(StatsError::NotFinite);
    }
    let had_zeros = d.contains(&0.0);
    let d: Vec<f64> = d.into_iter().filter(|&v| v != 0.0).collect();
    let n = d.len();
    if n == 0 {
        return Err(StatsError::AllZero(x.len()));
    }
    let abs: Vec<f64> = d.iter().map(|v| v.abs()).collect();
    let (ranks, ties) = rank_average(&abs);
    let r_plus: f64 = d.iter().zip(&ranks).filter(|(v, _)| **v > 0.0).map(|(_, r)| r).sum();
    let r_minus: f64 = d.iter().zip(&ranks).filter(|(v, _)| **v < 0.0).map(|(_, r)| r).sum();
    let statistic = r_plus.min(r_minus);
    if n <= 50 && ties.is_empty() && !had_zeros {
        let counts = signed_rank_counts(n);
        let total = 2f64.powi(n as i32);
        // With no ties every rank sum is an integer.
        let t = statistic.round() as usize;
        let cdf: f64 = counts[..=t].iter().sum::<f64>() / total;
        let p_value = (2.0 * cdf).min(1.0);
        return Ok(Wilcoxon { statistic, p_value, method: WilcoxonMethod::Exact, n });
    }
    let nf = n as f64;
    let mean = nf * (nf + 1.0) / 4.0;
    let tie_term: f64 = ties.iter().map(|&t| (t as f64).powi(3) - t as f64).sum::<f64>() / 48.0;
    let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term;
    let z = (statistic - mean) / var.sqrt();
    let normal = Normal::new(0.0, 1.0).expect("standard normal");
    let p_value = (2.0 * normal.cdf(-z.abs())).min(1.0);
    Ok(Wilcoxon { statistic, p_value, method: WilcoxonMethod::Asymptotic, n })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TTest {
    pub t: f64,
    pub df: f64,
    /// NaN when every difference is equal (zero variance), as scipy reports it.
    pub p_value: f64,
}

/// Paired two-sided t-test of `x - y`.
pub fn ttest_rel(x: &[f64], y: &[f64]) -> Result<TTest, StatsError> {
    if x.len() != y.len() {
        return Err(StatsError::Unpaired(x.len(), y.len()));
    }
    if x.len() < 2 {
        return Err(StatsError::TooFew { need: 2, got: x.len() });
    }
    let d: Vec<f64> = x.iter().zip(y).map(|(a, b)| a - b).collect();
    if d.iter().any(|v| !v.is_finite()) {
        return Err(StatsError::NotFinite);
    }
    let s = summary(&d).expect("non-empty");
    let n = d.len() as f64;
    let sd = s.sd.expect("n >= 2");
    let df = n - 1.0;
    if sd == 0.0 {
        return Ok(TTest { t: f64::NAN, df, p_value: f64::NAN });
    }
    let t = s.mean / (sd / n.sqrt());
    let dist = StudentsT::new(0.0, 1.0, df).expect("df >= 1");
    let p_value = (2.0 * dist.cdf(-t.abs())).min(1.0);
    Ok(TTest { t, df, p_value })
}

/// A mean with its two-sided 95% confidence interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub n: usize,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The mean of `values` with the 95% Student t interval (n - 1 degrees of freedom, sample
/// SD), as `scipy.stats.t.interval(0.95, n - 1, mean, sem)`; `None` below two finite values.
pub fn mean_ci95(values: &[f64]) -> Option<Interval> {
    if values.len() < 2 || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let s = summary(values)?;
    let n = values.len() as f64;
    let sem = s.sd? / n.sqrt();
    let q = StudentsT::new(0.0, 1.0, n - 1.0).ok()?.inverse_cdf(0.975);
    Some(Interval { n: values.len(), mean: s.mean, lo: s.mean - q * sem, hi: s.mean + q * sem })
}

/// Holm's step-down adjustment of p-values for multiple comparisons (as statsmodels'
/// `multipletests(p, method="holm")`): the i-th smallest of m is multiplied by m - i + 1,
/// made monotone, capped at 1. Values that are not finite stay as they are and are not
/// counted in m.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..p.len()).filter(|&i| p[i].is_finite()).collect();
    idx.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = idx.len();
    let mut out = p.to_vec();
    let mut running = 0.0f64;
    for (rank, &i) in idx.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

#[cfg(test)]
mod interval_tests {
    use super::*;

    #[test]
    fn holm_multiplies_the_ordered_p_values_and_keeps_them_monotone() {
        // Sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, 2 * 0.03, max(0.06, 0.04).
        let adj = holm(&[0.01, 0.04, 0.03, 0.005]);
        let want = [0.03, 0.06, 0.06, 0.02];
        for (a, w) in adj.iter().zip(want) {
            assert!((a - w).abs() < 1e-12, "{adj:?}");
        }
        assert_eq!(holm(&[0.5, 0.9]), [1.0, 1.0]);
        let with_nan = holm(&[f64::NAN, 0.02, 0.04]);
        assert!(with_nan[0].is_nan());
        assert!((with_nan[1] - 0.04).abs() < 1e-12 && (with_nan[2] - 0.04).abs() < 1e-12);
    }

    #[test]
    fn the_interval_uses_students_t() {
        // scipy.stats.t.ppf(0.975, 2) = 4.302652729911275; values 1, 2, 3: sem = 1 / sqrt(3).
        let i = mean_ci95(&[1.0, 2.0, 3.0]).unwrap();
        let half = 4.302652729911275 / 3f64.sqrt();
        assert!((i.mean - 2.0).abs() < 1e-12);
        assert!((i.hi - (2.0 + half)).abs() < 1e-9, "{i:?}");
        assert!((i.lo - (2.0 - half)).abs() < 1e-9);
        assert_eq!(mean_ci95(&[1.0]), None);
    }
}
