//! Numbers for people, in `kiln plot`'s axes and `kiln runs`' table: steps as integers, counts
//! (tokens, tokens/s) as 1.2M.

const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")];

/// A step: an integer. plotters labels an f64 axis `10.0`; a step is never fractional, and the
/// step axis asks for few enough ticks that each falls on an integer.
pub fn step(v: f64) -> String {
    format!("{}", v.round() as i64)
}

/// A count in a table: one decimal with its unit (`1.2M`, `81.9k`), an integer below 1,000.
pub fn count(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    match UNITS.iter().find(|(u, _)| v.abs() >= *u) {
        Some((u, name)) => format!("{:.1}{name}", v / u),
        None => format!("{}", v.round() as i64),
    }
}

/// A count on an axis: tick values are round numbers, so each is written exactly with as few
/// decimals as it needs (`1M`, `1.2M`, `1.25M`, `250k`); ticks 1k apart at 20M still read apart
/// (`20.49M`, `20.5M`) where a fixed one decimal would print the same label twice.
pub fn tick(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let Some((u, name)) = UNITS.iter().find(|(u, _)| v.abs() >= *u) else {
        return trimmed(v, 3);
    };
    trimmed(v / u, 3) + name
}

/// A learning rate on an axis: `3e-3`, `2.5e-4` below 0.1 (written out, `0.00105` crowds the
/// label area and hides the magnitude), plain above.
pub fn rate(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    if v == 0.0 || v.abs() >= 0.1 {
        return trimmed(v, 3);
    }
    let mut exp = v.abs().log10().floor() as i32;
    // Three decimals at most; 9.9996e-4 rounds to 10: written 1e-3 instead.
    let mut m = (v / 10f64.powi(exp) * 1000.0).round() / 1000.0;
    if m.abs() >= 10.0 {
        m /= 10.0;
        exp += 1;
    }
    format!("{}e{exp}", trimmed(m, 3))
}

/// `x` with the fewest decimals (at most `max`) that write it exactly, trailing zeros dropped.
fn trimmed(x: f64, max: usize) -> String {
    for d in 0..=max {
        let scale = 10f64.powi(d as i32);
        let y = x * scale;
        if (y.round() - y).abs() < 1e-6 * y.abs().max(1.0) {
            return format!("{x:.d$}");
        }
    }
    format!("{x:.max$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_integers() {
        assert_eq!(step(10.0), "10");
        assert_eq!(step(20.0), "20");
        assert_eq!(step(0.0), "0");
        assert_eq!(step(1e6), "1000000");
        // A tick that lands a hair off an integer (f64 arithmetic) still reads as the integer.
        assert_eq!(step(29.999999999), "30");
    }

    #[test]
    fn counts_in_tables_have_one_decimal_and_a_unit() {
        assert_eq!(count(1_234_567.0), "1.2M");
        assert_eq!(count(81_920.0), "81.9k");
        assert_eq!(count(999.0), "999");
        assert_eq!(count(1_000.0), "1.0k");
        assert_eq!(count(2.5e9), "2.5B");
        assert_eq!(count(3.0e12), "3.0T");
        assert_eq!(count(0.0), "0");
        assert_eq!(count(f64::NAN), "-");
    }

    #[test]
    fn learning_rates_are_short() {
        assert_eq!(rate(0.003), "3e-3");
        assert_eq!(rate(0.0025), "2.5e-3");
        assert_eq!(rate(0.00105), "1.05e-3");
        assert_eq!(rate(4e-5), "4e-5");
        assert_eq!(rate(0.01), "1e-2");
        assert_eq!(rate(9.9996e-4), "1e-3");
        assert_eq!(rate(0.0), "0");
        assert_eq!(rate(0.5), "0.5");
    }

    #[test]
    fn ticks_are_exact_and_short() {
        assert_eq!(tick(1_200_000.0), "1.2M");
        assert_eq!(tick(1_000_000.0), "1M");
        assert_eq!(tick(1_250_000.0), "1.25M");
        assert_eq!(tick(250_000.0), "250k");
        assert_eq!(tick(20_490_000.0), "20.49M");
        assert_eq!(tick(500.0), "500");
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(4_500.0), "4.5k");
        assert_eq!(tick(3e9), "3B");
        // f64 tick arithmetic leaves crumbs (0.1 + 0.2): they are not decimals to print.
        assert_eq!(tick(1_400_000.000_000_2), "1.4M");
        assert_eq!(tick(0.1 + 0.2), "0.3");
    }
}
