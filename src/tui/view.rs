//! Rendering: a pure function of `App` onto a ratatui frame. A compact layout below 120 columns
//! keeps everything essential readable at 80x24.

use super::app::{App, Overlay};
use super::keymap::KEYMAP;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Clear, Dataset, GraphType, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn title_line(app: &App, wide: bool) -> Line<'_> {
    let t = app.theme();
    let mut spans = vec![Span::styled(" kiln ", Style::default().fg(t.accent).add_modifier(Modifier::BOLD))];
    if wide {
        // The compact layout keeps the numbers and drops the run description.
        spans.push(Span::styled(app.title.clone(), Style::default().fg(t.fg)));
    }
    if let Some(m) = &app.last {
        let pct = 100.0 * m.step as f64 / app.max_steps.max(1) as f64;
        let left = app.max_steps.saturating_sub(m.step) as f64 * m.step_ms / 1e3;
        spans.push(Span::styled(
            format!(
                "  step {}/{} ({pct:.1}%)  {} tokens  eta {}",
                m.step,
                app.max_steps,
                human(m.tokens),
                crate::cli::eta(left)
            ),
            Style::default().fg(t.fg),
        ));
    } else {
        spans.push(Span::styled("  starting…", Style::default().fg(t.dim)));
    }
    if app.paused {
        spans.push(Span::raw("  "));
        spans.push(Span::styled(
            if app.chat.open { " PAUSED " } else { " PAUSED — p to resume " },
            Style::default().bg(t.paused_bg).fg(ratatui::style::Color::Black).add_modifier(Modifier::BOLD),
        ));
    }
    Line::from(spans)
}

fn loss_chart(f: &mut Frame, app: &App, area: Rect) {
    let t = app.theme();
    let pts = app.visible();
    let x = |p: &super::app::Point| if app.x_tokens { p.tokens as f64 } else { p.step as f64 };
    let y = |v: f64| if app.log_y { v.max(1e-9).ln() } else { v };
    let raw: Vec<(f64, f64)> = pts.iter().map(|p| (x(p), y(p.loss))).collect();
    let ema: Vec<(f64, f64)> = pts.iter().map(|p| (x(p), y(p.ema))).collect();
    let x0 = raw.first().map_or(0.0, |p| p.0);
    let x1 = raw.last().map_or(1.0, |p| p.0).max(x0 + 1.0);
    let evals: Vec<(f64, f64)> = app
        .evals
        .iter()
        .map(|&(s, tok, l)| (if app.x_tokens { tok as f64 } else { s as f64 }, y(l)))
        .filter(|p| p.0 >= x0 && p.0 <= x1)
        .collect();
    let ys = raw.iter().chain(&evals).map(|p| p.1);
    let (mut lo, mut hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-6 {
        hi = lo + 1.0;
    }
    // Refused updates hang from the top edge: their loss may be non-finite, and there they
    // never hide the curve.
    let guards: Vec<(f64, f64)> = app
        .guards
        .iter()
        .map(|&(s, tok)| if app.x_tokens { tok as f64 } else { s as f64 })
        .filter(|&gx| gx >= x0 && gx <= x1)
        .map(|gx| (gx, hi))
        .collect();
    let marker = if app.unicode { Marker::Braille } else { Marker::Dot };
    let mut datasets = vec![
        Dataset::default()
            .name("raw")
            .marker(Marker::Dot)
            .graph_type(GraphType::Scatter)
            .style(Style::default().fg(t.raw))
            .data(&raw),
        Dataset::default()
            .name("ema")
            .marker(marker)
            .graph_type(GraphType::Line)
            .style(Style::default().fg(t.ema))
            .data(&ema),
        Dataset::default()
            .name("eval")
            .marker(Marker::Block)
            .graph_type(GraphType::Scatter)
            .style(Style::default().fg(t.eval))
            .data(&evals),
    ];
    if !guards.is_empty() {
        let g = Dataset::default().name("guard").marker(Marker::Block).graph_type(GraphType::Scatter);
        datasets.push(g.style(Style::default().fg(t.warn)).data(&guards));
    }
    let label = |v: f64| format!("{:.2}", if app.log_y { v.exp() } else { v });
    let xl = |v: f64| if app.x_tokens { human(v as u64) } else { format!("{}", v as u64) };
    let title = format!(
        " loss{} · {} · x: {} ",
        if app.log_y { " (log)" } else { "" },
        app.window_label(),
        if app.x_tokens { "tokens" } else { "steps" }
    );
    let chart = Chart::new(datasets)
        .block(Block::default().borders(Borders::ALL).title(title).border_style(Style::default().fg(t.dim)))
        .x_axis(
            Axis::default()
                .bounds([x0, x1])
                .labels(vec![Span::raw(xl(x0)), Span::raw(xl(x1))])
                .style(Style::default().fg(t.dim)),
        )
        .y_axis(
            Axis::default()
                .bounds([lo, hi])
                .labels(vec![Span::raw(label(lo)), Span::raw(label((lo + hi) / 2.0)), Span::raw(label(hi))])
                .style(Style::default().fg(t.dim)),
        );
    f.render_widget(chart, area);
}

fn stats(app: &App) -> Vec<Line<'_>> {
    let t = app.theme();
    let kv = |k: &str, v: String| {
        Line::from(vec![
            Span::styled(format!("{k:<11}"), Style::default().fg(t.dim)),
            Span::styled(v, Style::default().fg(t.fg)),
        ])
    };
    let Some(m) = &app.last else { return vec![kv("waiting", "for the first step".into())] };
    let last_eval = app.evals.last().map_or("—".to_string(), |e| format!("{:.4} @ {}", e.2, e.0));
    vec![
        kv("loss", format!("{:.4}  (ema {:.4})", m.loss, app.points.last().map_or(m.loss, |p| p.ema))),
        kv("eval loss", last_eval),
        kv("lr", format!("{:.3e}", m.lr)),
        kv("grad norm", format!("{:.3}", m.grad_norm)),
        kv("tokens/s", format!("{:.0}", m.tokens_per_s)),
        kv("MFU", format!("{:.1}%", 100.0 * m.mfu)),
        kv("step", format!("{:.0} ms", m.step_ms)),
        kv("data wait", format!("{:.1}%", 100.0 * m.data_wait_ms / m.step_ms.max(1e-9))),
    ]
}

fn ranks_table(app: &App) -> Table<'_> {
    let t = app.theme();
    let rows = app.ranks.iter().map(|r| {
        Row::new(vec![
            format!("{}", r.rank),
            format!("{:.0}", r.tokens_per_s),
            format!("{:.1}", r.state_mb),
            format!("{:.1}", r.peak_mb),
            format!("{:.1}", r.comm_ms),
        ])
        .style(Style::default().fg(t.fg))
    });
    Table::new(
        rows,
        [
            Constraint::Length(4),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(vec!["rank", "tok/s", "state MB", "peak MB", "comm ms"]).style(Style::default().fg(t.dim)))
    .block(Block::default().borders(Borders::ALL).title(" ranks ").border_style(Style::default().fg(t.dim)))
}

fn samples(app: &App) -> Paragraph<'_> {
    let t = app.theme();
    let mut lines = Vec::new();
    for (step, prompt, text) in app.samples.iter().take(3) {
        lines.push(Line::from(vec![
            Span::styled(format!("[{step}] "), Style::default().fg(t.dim)),
            Span::styled(prompt.clone(), Style::default().fg(t.accent)),
            Span::styled(text.replace('\n', " ⏎ "), Style::default().fg(t.fg)),
        ]));
    }
    if lines.is_empty() {
        lines.push(Line::styled("no samples yet (s to sample now)", Style::default().fg(t.dim)));
    }
    Paragraph::new(lines)
        .wrap(Wrap { trim: true })
        .block(Block::default().borders(Borders::ALL).title(" samples ").border_style(Style::default().fg(t.dim)))
}

fn events(app: &App, height: u16) -> Paragraph<'_> {
    let t = app.theme();
    let n = height.saturating_sub(2) as usize;
    let lines: Vec<Line> = app
        .log
        .iter()
        .rev()
        .take(n)
        .rev()
        .map(|l| {
            let style = if l.contains("error") || l.contains("warning") { t.warn } else { t.fg };
            Line::styled(l.clone(), Style::default().fg(style))
        })
        .collect();
    Paragraph::new(lines)
        .block(Block::default().borders(Borders::ALL).title(" events ").border_style(Style::default().fg(t.dim)))
}

fn footer(app: &App) -> Line<'_> {
    let t = app.theme();
    let keys = if app.chat.open {
        super::chat::CHAT_HELP
    } else {
        "p pause · c ckpt · g chat · s sample · e eval · l log-y · +/- window · a axis · x export · t theme · ? help · q quit"
    };
    Line::styled(keys, Style::default().fg(t.dim))
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h }
}

fn overlay(f: &mut Frame, app: &App) {
    let t = app.theme();
    let area = f.area();
    match app.overlay {
        Overlay::None => {}
        Overlay::Help => {
            let lines: Vec<Line> = KEYMAP
                .iter()
                .map(|b| {
                    Line::from(vec![
                        Span::styled(
                            format!("  {}  ", b.key),
                            Style::default().fg(t.accent).add_modifier(Modifier::BOLD),
                        ),
                        Span::styled(b.help, Style::default().fg(t.fg)),
                    ])
                })
                .collect();
            let r = centered(area, 80, KEYMAP.len() as u16 + 2);
            f.render_widget(Clear, r);
            f.render_widget(Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" keys ")), r);
        }
        Overlay::QuitPrompt => {
            let text = vec![
                Line::styled("Quit the dashboard?", Style::default().fg(t.fg).add_modifier(Modifier::BOLD)),
                Line::styled("  s   checkpoint and stop training", Style::default().fg(t.fg)),
                Line::styled("  d   detach (training goes on)", Style::default().fg(t.fg)),
                Line::styled("  Esc cancel", Style::default().fg(t.fg)),
            ];
            let r = centered(area, 40, 6);
            f.render_widget(Clear, r);
            f.render_widget(Paragraph::new(text).block(Block::default().borders(Borders::ALL).title(" quit ")), r);
        }
    }
}

/// The chat pane in place of the charts; wide terminals keep the run figures and the events beside it.
fn chat_layout(f: &mut Frame, app: &App, area: Rect, wide: bool) {
    if !wide {
        super::chat_view::chat_pane(f, app, area);
        return;
    }
    let cols = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(62), Constraint::Percentage(38)])
        .split(area);
    super::chat_view::chat_pane(f, app, cols[0]);
    side_column(f, app, cols[1], |f, r| f.render_widget(events(app, r.height), r));
}

/// The right-hand column: the run's figures above `lower`.
fn side_column(f: &mut Frame, app: &App, area: Rect, lower: impl FnOnce(&mut Frame, Rect)) {
    let right = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(10), Constraint::Min(3)])
        .split(area);
    let t = app.theme();
    f.render_widget(
        Paragraph::new(stats(app))
            .block(Block::default().borders(Borders::ALL).title(" run ").border_style(Style::default().fg(t.dim))),
        right[0],
    );
    lower(f, right[1]);
}

pub fn render(f: &mut Frame, app: &App) {
    let area = f.area();
    let wide = area.width >= 120;
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Length(1),
            Constraint::Min(8),
            Constraint::Length(if wide { 9 } else { 6 }),
            Constraint::Length(1),
        ])
        .split(area);
    f.render_widget(Paragraph::new(title_line(app, wide)), rows[0]);
    if app.chat.open {
        chat_layout(f, app, Rect { height: rows[1].height + rows[2].height, ..rows[1] }, wide);
        f.render_widget(Paragraph::new(footer(app)), rows[3]);
        overlay(f, app);
        return;
    }
    let mid = Layout::default()
        .direction(Direction::Horizontal)
        .constraints(if wide {
            [Constraint::Percentage(62), Constraint::Percentage(38)]
        } else {
            [Constraint::Percentage(58), Constraint::Percentage(42)]
        })
        .split(rows[1]);
    loss_chart(f, app, mid[0]);
    side_column(f, app, mid[1], |f, r| f.render_widget(ranks_table(app), r));
    let bottom = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(55), Constraint::Percentage(45)])
        .split(rows[2]);
    f.render_widget(samples(app), bottom[0]);
    f.render_widget(events(app, bottom[1].height), bottom[1]);
    f.render_widget(Paragraph::new(footer(app)), rows[3]);
    overlay(f, app);
}
