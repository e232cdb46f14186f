//! Rendering of the chat pane: whether training is paused, the conversation (newest at the
//! bottom), the last reply's figures, and the input line.

use super::app::App;
use super::chat::CHAT_HELP;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

/// Greedy word wrap of `text` to `width` columns, the first line `first` columns shorter (it
/// carries the speaker's label). Counts characters, which is exact for the text models emit most.
fn wrap(text: &str, width: usize, first: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut room = width.saturating_sub(first).max(1);
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split_inclusive(' ') {
            let mut word = word;
            // Trailing spaces may hang past the edge; only the visible part must fit.
            while line.chars().count() + word.trim_end().chars().count() > room && !word.trim().is_empty() {
                if line.is_empty() {
                    // A word longer than the line: break it.
                    let cut = word.char_indices().nth(room).map_or(word.len(), |(i, _)| i);
                    out.push(word[..cut].to_string());
                    word = &word[cut..];
                } else {
                    out.push(std::mem::take(&mut line).trim_end().to_string());
                }
                room = width.max(1);
            }
            line.push_str(word);
        }
        out.push(line.trim_end().to_string());
        room = width.max(1);
    }
    out
}

fn training_line(app: &App) -> Line<'_> {
    let t = app.theme();
    let c = &app.chat;
    if app.paused {
        let text = if c.paused_by_chat {
            " training paused while you chat: Tab resumes it, /train keeps it going "
        } else {
            " training is paused (it stays paused when you leave the chat) "
        };
        Line::styled(text, Style::default().bg(t.paused_bg).fg(Color::Black).add_modifier(Modifier::BOLD))
    } else {
        Line::styled(
            "training goes on while you chat; each reply uses the weights of the step it starts at",
            Style::default().fg(t.warn),
        )
    }
}

pub fn chat_pane(f: &mut Frame, app: &App, area: Rect) {
    let t = app.theme();
    let c = &app.chat;
    let title = format!(" chat · temp {:.2} · top-p {:.2} · max {} tokens ", c.temperature, c.top_p, c.max_tokens);
    let block = Block::default().borders(Borders::ALL).title(title).border_style(Style::default().fg(t.accent));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(1), Constraint::Min(1), Constraint::Length(1), Constraint::Length(1)])
        .split(inner);
    f.render_widget(Paragraph::new(training_line(app)), rows[0]);

    let width = rows[1].width as usize;
    let mut lines: Vec<Line> = Vec::new();
    if c.messages.is_empty() {
        lines.push(Line::styled("Type a message and press Enter.", Style::default().fg(t.dim)));
        lines.push(Line::styled(CHAT_HELP, Style::default().fg(t.dim)));
    }
    for (i, m) in c.messages.iter().enumerate() {
        let (label, style) = if m.role == "user" { ("you › ", t.accent) } else { ("model › ", t.ema) };
        let streaming = c.pending.is_some() && i + 1 == c.messages.len();
        let body = if streaming { format!("{}▌", m.content) } else { m.content.clone() };
        for (j, piece) in wrap(&body, width, label.chars().count()).into_iter().enumerate() {
            let mut spans = Vec::new();
            if j == 0 {
                spans.push(Span::styled(label, Style::default().fg(style).add_modifier(Modifier::BOLD)));
            }
            spans.push(Span::styled(piece, Style::default().fg(t.fg)));
            lines.push(Line::from(spans));
        }
    }
    // Newest at the bottom: show the tail that fits.
    let h = rows[1].height as usize;
    let tail = lines.split_off(lines.len().saturating_sub(h));
    f.render_widget(Paragraph::new(tail), rows[1]);

    f.render_widget(Paragraph::new(Line::styled(c.status.clone(), Style::default().fg(t.dim))), rows[2]);
    let prompt = "› ";
    let room = width.saturating_sub(prompt.len() + 1);
    let shown: String = {
        let n = c.input.chars().count();
        c.input.chars().skip(n.saturating_sub(room)).collect()
    };
    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(prompt, Style::default().fg(t.accent).add_modifier(Modifier::BOLD)),
            Span::styled(shown, Style::default().fg(t.fg)),
            Span::styled("█", Style::default().fg(t.dim)),
        ])),
        rows[3],
    );
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wraps_words_and_breaks_long_ones() {
        assert_eq!(wrap("aaa bbb ccc", 7, 0), ["aaa bbb", "ccc"]);
        assert_eq!(wrap("aaa bbb", 7, 4), ["aaa", "bbb"]);
        assert_eq!(wrap("abcdefghij", 4, 0), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("one\ntwo", 10, 0), ["one", "two"]);
        assert_eq!(wrap("", 10, 0), [""]);
    }
}
