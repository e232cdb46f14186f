//! Colour themes from themes/*.toml (compiled in). `NO_COLOR` turns colour off entirely; terminals
//! without truecolor get the nearest of the 16 base colours.

use ratatui::style::Color;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThemeFile {
    name: String,
    fg: String,
    dim: String,
    accent: String,
    raw: String,
    ema: String,
    eval: String,
    warn: String,
    paused_bg: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Theme {
    pub name: String,
    pub fg: Color,
    pub dim: Color,
    pub accent: Color,
    pub raw: Color,
    pub ema: Color,
    pub eval: Color,
    pub warn: Color,
    pub paused_bg: Color,
}

const FILES: [&str; 3] = [
    include_str!("../../themes/dark.toml"),
    include_str!("../../themes/light.toml"),
    include_str!("../../themes/high-contrast.toml"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorMode {
    None,
    Ansi16,
    Ansi256,
    TrueColor,
}

impl ColorMode {
    /// From the environment: `NO_COLOR` (any value but empty, as no-color.org says) disables
    /// colour; `COLORTERM=truecolor|24bit` enables 24-bit colour; a `TERM` ending in `256color`
    /// gets the xterm 256-colour palette; anything else the 16 base colours.
    pub fn detect() -> ColorMode {
        Self::from_env(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// `detect` over any variable lookup (tests pass their own instead of changing the process's
    /// environment under other threads).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> ColorMode {
        if var("NO_COLOR").is_some_and(|v| !v.is_empty()) {
            ColorMode::None
        } else if matches!(var("COLORTERM").as_deref(), Some("truecolor") | Some("24bit")) {
            ColorMode::TrueColor
        } else if var("TERM").is_some_and(|t| t.contains("256color")) {
            ColorMode::Ansi256
        } else {
            ColorMode::Ansi16
        }
    }
}

fn hex(s: &str) -> (u8, u8, u8) {
    let v = u32::from_str_radix(s.trim_start_matches('#'), 16).unwrap_or(0xffffff);
    ((v >> 16) as u8, (v >> 8) as u8, v as u8)
}

/// The nearest of the 16 ANSI colours.
fn ansi16((r, g, b): (u8, u8, u8)) -> Color {
    const BASE: [(Color, (u8, u8, u8)); 16] = [
        (Color::Black, (0, 0, 0)),
        (Color::Red, (205, 0, 0)),
        (Color::Green, (0, 205, 0)),
        (Color::Yellow, (205, 205, 0)),
        (Color::Blue, (0, 0, 238)),
        (Color::Magenta, (205, 0, 205)),
        (Color::Cyan, (0, 205, 205)),
        (Color::Gray, (229, 229, 229)),
        (Color::DarkGray, (127, 127, 127)),
        (Color::LightRed, (255, 0, 0)),
        (Color::LightGreen, (0, 255, 0)),
        (Color::LightYellow, (255, 255, 0)),
        (Color::LightBlue, (92, 92, 255)),
        (Color::LightMagenta, (255, 0, 255)),
        (Color::LightCyan, (0, 255, 255)),
        (Color::White, (255, 255, 255)),
    ];
    let d = |c: (u8, u8, u8)| {
        let f = |a: u8, b: u8| (a as i32 - b as i32).pow(2);
        f(c.0, r) + f(c.1, g) + f(c.2, b)
    };
    BASE.iter().min_by_key(|(_, c)| d(*c)).map(|(col, _)| *col).unwrap_or(Color::Reset)
}

/// The nearest colour of the xterm 256-colour palette's 6×6×6 cube or grey ramp.
fn ansi256((r, g, b): (u8, u8, u8)) -> Color {
    const LEVELS: [u8; 6] = [0, 95, 135, 175, 215, 255];
    let level =
        |v: u8| LEVELS.iter().enumerate().min_by_key(|(_, &l)| (l as i32 - v as i32).abs()).map_or(0, |(i, _)| i);
    let (ri, gi, bi) = (level(r), level(g), level(b));
    let cube = (LEVELS[ri], LEVELS[gi], LEVELS[bi]);
    let grey_i = (((r as u32 + g as u32 + b as u32) / 3).saturating_sub(3) / 10).min(23) as u8;
    let grey = 8 + 10 * grey_i;
    let d = |c: (u8, u8, u8)| {
        let f = |a: u8, b: u8| (a as i32 - b as i32).pow(2);
        f(c.0, r) + f(c.1, g) + f(c.2, b)
    };
    if d((grey, grey, grey)) < d(cube) {
        Color::Indexed(232 + grey_i)
    } else {
        Color::Indexed(16 + 36 * ri as u8 + 6 * gi as u8 + bi as u8)
    }
}

fn color(s: &str, mode: ColorMode) -> Color {
    match mode {
        ColorMode::None => Color::Reset,
        ColorMode::Ansi16 => ansi16(hex(s)),
        ColorMode::Ansi256 => ansi256(hex(s)),
        ColorMode::TrueColor => {
            let (r, g, b) = hex(s);
            Color::Rgb(r, g, b)
        }
    }
}

pub fn themes(mode: ColorMode) -> Vec<Theme> {
    FILES
        .iter()
        .map(|t| {
            let f: ThemeFile = toml::from_str(t).expect("bundled themes parse (tested)");
            Theme {
                name: f.name,
                fg: color(&f.fg, mode),
                dim: color(&f.dim, mode),
                accent: color(&f.accent, mode),
                raw: color(&f.raw, mode),
                ema: color(&f.ema, mode),
                eval: color(&f.eval, mode),
                warn: color(&f.warn, mode),
                paused_bg: color(&f.paused_bg, mode),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_themes_parse_in_every_mode() {
        for mode in [ColorMode::None, ColorMode::Ansi16, ColorMode::Ansi256, ColorMode::TrueColor] {
            let t = themes(mode);
            assert_eq!(t.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["dark", "light", "high-contrast"]);
        }
        assert_eq!(themes(ColorMode::None)[0].fg, Color::Reset);
        assert_eq!(themes(ColorMode::Ansi16)[2].warn, Color::LightRed);
        assert_eq!(themes(ColorMode::Ansi256)[2].warn, Color::Indexed(196)); // pure red in the cube
        assert_eq!(ansi256((0x6c, 0x6c, 0x6c)), Color::Indexed(242)); // a grey takes the grey ramp
        assert_eq!(ansi256((0x5f, 0xaf, 0xff)), Color::Indexed(75));
    }

    #[test]
    fn colour_mode_follows_no_color_colorterm_and_term() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            ColorMode::from_env(move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
        };
        assert_eq!(env(&[]), ColorMode::Ansi16);
        assert_eq!(env(&[("TERM", "xterm-256color")]), ColorMode::Ansi256);
        assert_eq!(env(&[("TERM", "xterm-256color"), ("COLORTERM", "truecolor")]), ColorMode::TrueColor);
        assert_eq!(env(&[("COLORTERM", "24bit")]), ColorMode::TrueColor);
        assert_eq!(env(&[("COLORTERM", "yes")]), ColorMode::Ansi16);
        // NO_COLOR wins over everything, whatever its value, but an empty one means unset.
        assert_eq!(env(&[("NO_COLOR", "1"), ("COLORTERM", "truecolor")]), ColorMode::None);
        assert_eq!(env(&[("NO_COLOR", "0"), ("TERM", "xterm-256color")]), ColorMode::None);
        assert_eq!(env(&[("NO_COLOR", ""), ("TERM", "xterm-256color")]), ColorMode::Ansi256);
    }
}
