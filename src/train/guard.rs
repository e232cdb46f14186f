//! The step guard: every update is checked before it is applied, so a loss spike or a non-finite
//! gradient never reaches the weights or the AdamW moments. A non-finite loss or gradient norm
//! always trips it; a spike does when the loss or the norm is more than `z` standard deviations
//! above its running mean over the last `window` applied steps, once `min_steps` were seen
//! (OLMo-core's rule). The thresholds are set before the step (`UpdateCheck`), so the engines
//! decide with the same numbers the trainer reports, on every rank of every node alike: the loss
//! and norm they compare are the world's all-reduced ones.

use crate::config::GuardSection;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What an update must stay within to be applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpdateCheck {
    /// Every update is applied (the guard is off).
    Off,
    /// Finite, and at most these (`f64::INFINITY` before `min_steps`).
    Within { loss: f64, norm: f64 },
}

impl UpdateCheck {
    /// Whether a step whose tokens' summed loss is `loss_sum` (mean: `loss_sum · scale`) and whose
    /// gradient norm is `norm` may update the weights. The engines and the trainer call this one
    /// function on the same values, so they cannot disagree.
    pub fn accepts(self, loss_sum: f64, scale: f32, norm: f64) -> bool {
        self.trip(loss_sum * scale as f64, norm).is_none()
    }

    /// Why a step of mean loss `loss` and gradient norm `norm` may not update the weights.
    pub fn trip(self, loss: f64, norm: f64) -> Option<Trip> {
        let UpdateCheck::Within { loss: max_loss, norm: max_norm } = self else { return None };
        if !loss.is_finite() || !norm.is_finite() {
            return Some(Trip::NonFinite);
        }
        if loss > max_loss {
            return Some(Trip::LossSpike);
        }
        (norm > max_norm).then_some(Trip::NormSpike)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trip {
    NonFinite,
    LossSpike,
    NormSpike,
}

impl Trip {
    pub fn reason(self) -> &'static str {
        match self {
            Trip::NonFinite => "non-finite loss or gradient norm",
            Trip::LossSpike => "loss spike",
            Trip::NormSpike => "gradient-norm spike",
        }
    }
}

/// What the guard remembers; part of the checkpoint's trainer state, so a resumed run decides
/// exactly as the uninterrupted one would have.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardState {
    /// Mean loss and gradient norm of the last `window` applied steps, oldest first.
    pub recent: VecDeque<(f64, f64)>,
    /// Steps skipped in a row, up to the last one.
    pub consecutive: u32,
    /// Steps skipped over the whole run (AdamW counts only the updates applied).
    pub skipped: u64,
}

impl GuardState {
    /// The check for the next step under `cfg`.
    pub fn check(&self, cfg: &GuardSection) -> UpdateCheck {
        if !cfg.enabled {
            return UpdateCheck::Off;
        }
        if self.recent.len() < cfg.min_steps {
            return UpdateCheck::Within { loss: f64::INFINITY, norm: f64::INFINITY };
        }
        let limit = |pick: fn(&(f64, f64)) -> f64| {
            let (mean, sd) = self.mean_sd(pick);
            mean + cfg.z * sd
        };
        UpdateCheck::Within { loss: limit(|x| x.0), norm: limit(|x| x.1) }
    }

    /// How far above the running mean `value` is, in standard deviations (for the record).
    pub fn z_of(&self, value: f64, pick: fn(&(f64, f64)) -> f64) -> Option<f64> {
        if self.recent.len() < 2 || !value.is_finite() {
            return None;
        }
        let (mean, sd) = self.mean_sd(pick);
        (sd > 0.0).then(|| (value - mean) / sd)
    }

    /// Mean and sample standard deviation of one of the window's series (at least two entries).
    fn mean_sd(&self, pick: fn(&(f64, f64)) -> f64) -> (f64, f64) {
        let n = self.recent.len() as f64;
        let mean = self.recent.iter().map(pick).sum::<f64>() / n;
        let var = self.recent.iter().map(|x| (pick(x) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt())
    }

    pub fn applied(&mut self, cfg: &GuardSection, loss: f64, norm: f64) {
        self.consecutive = 0;
        self.recent.push_back((loss, norm));
        while self.recent.len() > cfg.window {
            self.recent.pop_front();
        }
    }

    pub fn skipped(&mut self) {
        self.consecutive += 1;
        self.skipped += 1;
    }
}

/// `KILN_TEST_NAN_GRAD=UPDATE[:RANK]`: the gradients of that update (1-based, counting only the
/// updates applied) on that rank (default 0) get a NaN, once per process, so tests can trip the
/// guard on a real non-finite gradient. (Once: a skipped update is attempted again at the next
/// step with the same number.)
pub fn poisoned(update: u64, rank: usize) -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    static AT: std::sync::OnceLock<Option<(u64, usize)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("KILN_TEST_NAN_GRAD").ok()?;
        let (u, r) = v.split_once(':').unwrap_or((&v, "0"));
        Some((u.parse().ok()?, r.parse().ok()?))
    });
    *at == Some((update, rank)) && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GuardSection {
        GuardSection { window: 4, min_steps: 3, z: 2.0, ..GuardSection::default() }
    }

    #[test]
    fn non_finite_values_always_trip_and_spikes_only_after_min_steps() {
        let c = cfg();
        let mut g = GuardState::default();
        assert_eq!(g.check(&c).trip(f64::NAN, 1.0), Some(Trip::NonFinite));
        assert_eq!(g.check(&c).trip(1.0, f64::INFINITY), Some(Trip::NonFinite));
        assert_eq!(g.check(&c).trip(1e9, 1e9), None, "no judgement of spikes before min_steps");
        for (l, n) in [(2.0, 1.0), (2.2, 1.1), (1.8, 0.9)] {
            g.applied(&c, l, n);
        }
        // mean 2.0, sd 0.2: the limit is 2.4 for the loss, 1.2 for the norm.
        assert_eq!(g.check(&c).trip(2.39, 1.19), None);
        assert_eq!(g.check(&c).trip(2.41, 1.0), Some(Trip::LossSpike));
        assert_eq!(g.check(&c).trip(2.0, 1.21), Some(Trip::NormSpike));
        assert!((g.z_of(2.4, |x| x.0).unwrap() - 2.0).abs() < 1e-9);
        let off = GuardSection { enabled: false, ..c };
        assert_eq!(g.check(&off).trip(f64::NAN, f64::NAN), None);
    }

    #[test]
    fn the_window_keeps_the_last_applied_steps_and_skips_are_counted() {
        let c = cfg();
        let mut g = GuardState::default();
        for i in 0..6 {
            g.applied(&c, i as f64, 1.0);
        }
        assert_eq!(g.recent.iter().map(|x| x.0).collect::<Vec<_>>(), [2.0, 3.0, 4.0, 5.0]);
        g.skipped();
        g.skipped();
        assert_eq!((g.consecutive, g.skipped), (2, 2));
        g.applied(&c, 1.0, 1.0);
        assert_eq!((g.consecutive, g.skipped), (0, 2));
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<GuardState>(&json).unwrap(), g, "exact through trainer.json");
    }
}
