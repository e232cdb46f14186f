//! Learning rate: linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at
//! `max_steps` (TinyLlama's schedule). Steps are 1-based optimizer steps.

pub fn lr_at(step: u64, lr: f64, min_lr: f64, warmup: u64, max_steps: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return lr * step as f64 / warmup as f64;
    }
    if step >= max_steps {
        return min_lr;
    }
    let progress = (step - warmup) as f64 / (max_steps - warmup).max(1) as f64;
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warmup_then_cosine() {
        let f = |s| lr_at(s, 1e-3, 1e-4, 10, 110);
        assert!((f(1) - 1e-4).abs() < 1e-12);
        assert!((f(10) - 1e-3).abs() < 1e-12);
        assert!((f(60) - 5.5e-4).abs() < 1e-12); // halfway down the cosine
        assert!((f(110) - 1e-4).abs() < 1e-12);
        assert!((f(500) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|s| f(s + 1) <= f(s) || s < 10));
    }
}
