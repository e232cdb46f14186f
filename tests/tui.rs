//! The dashboard rendered with ratatui's TestBackend at 80x24 and 160x48 (insta snapshots), and
//! the state transitions keys and events cause.

use kiln::train::events::{Command, Event, RankMetrics, StepMetrics};
use kiln::tui::actions::Effect;
use kiln::tui::app::{App, Overlay};
use kiln::tui::chat::ChatKey;
use kiln::tui::keymap::{action_for, Action, KEYMAP};
use kiln::tui::theme::{themes, ColorMode};
use kiln::tui::view::render;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::Terminal;

fn step(step: u64) -> Event {
    let loss = 10.0 * (-(step as f64) / 40.0).exp() + 3.0 + 0.2 * ((step * 7919 % 13) as f64 / 13.0 - 0.5);
    Event::Step(StepMetrics {
        step,
        tokens: step * 2048,
        loss,
        lr: 3e-3,
        grad_norm: 0.75,
        tokens_per_s: 1800.0,
        step_ms: 1137.0,
        data_wait_ms: 0.4,
        mfu: 0.061,
        time: 0.0,
        ranks: (0..2)
            .map(|rank| RankMetrics { rank, tokens_per_s: 900.0, state_mb: 35.7, peak_mb: 68.5, comm_ms: 12.5 })
            .collect(),
        unit_grad_norms: None,
    })
}

fn app_with_history() -> App {
    let mut app = App::new("runs/demo · 4.5M params · cpu (2 threads)".into(), 400, themes(ColorMode::None), true);
    for s in 1..=120 {
        app.on_event(&step(s));
        if s % 50 == 0 {
            app.on_event(&Event::Eval { step: s, tokens: s * 2048, loss: 3.4 + 2.0 / s as f64, per_source: vec![] });
        }
    }
    app.on_event(&Event::Sample {
        step: 100,
        prompt: "Once upon a time".into(),
        text: ", there was a little dog.".into(),
    });
    app.on_event(&Event::Checkpoint { step: 100, path: "runs/demo/checkpoints/step-00000100".into() });
    app
}

fn draw(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(f, app)).unwrap();
    format!("{}", t.backend())
}

#[test]
fn dashboard_80x24() {
    insta::assert_snapshot!(draw(&app_with_history(), 80, 24));
}

#[test]
fn dashboard_160x48() {
    insta::assert_snapshot!(draw(&app_with_history(), 160, 48));
}

#[test]
fn paused_help_and_quit_prompt_160x48() {
    let mut app = app_with_history();
    app.on_event(&Event::Paused { step: 120, paused: true });
    let paused = draw(&app, 160, 48);
    assert!(paused.contains("PAUSED"));
    app.on_action(Action::Help);
    insta::assert_snapshot!("help_overlay", draw(&app, 160, 48));
    app.on_action(Action::Help);
    app.on_action(Action::Quit);
    insta::assert_snapshot!("quit_prompt", draw(&app, 80, 24));
}

#[test]
fn ascii_fallback_has_no_braille() {
    let mut app = app_with_history();
    app.unicode = false;
    let s = draw(&app, 80, 24);
    assert!(!s.chars().any(|c| ('\u{2800}'..='\u{28FF}').contains(&c)));
}

#[test]
fn keys_map_to_engine_commands_and_view_changes() {
    let mut app = app_with_history();
    assert_eq!(app.on_action(action_for('p').unwrap()), vec![Effect::Send(Command::TogglePause)]);
    assert_eq!(app.on_action(action_for('c').unwrap()), vec![Effect::Send(Command::CheckpointNow)]);
    assert_eq!(app.on_action(action_for('s').unwrap()), vec![Effect::Send(Command::SampleNow)]);
    assert_eq!(app.on_action(action_for('e').unwrap()), vec![Effect::Send(Command::EvalNow)]);
    let n = app.visible().len();
    app.on_action(action_for('+').unwrap());
    app.on_action(action_for('+').unwrap());
    assert_eq!(app.visible().len(), 50, "the window narrows to the last 50 steps");
    assert!(app.visible().len() < n);
    for _ in 0..4 {
        app.on_action(action_for('-').unwrap());
    }
    assert_eq!(app.visible().len(), 120, "all steps");
    app.on_action(action_for('l').unwrap());
    assert!(app.log_y);
    app.on_action(action_for('t').unwrap());
    assert_eq!(app.theme, 1);
    app.on_action(action_for('a').unwrap());
    assert!(app.x_tokens);
    assert_eq!(app.on_action(action_for('x').unwrap()), vec![Effect::Export]);
    app.export(|_| panic!("no export starts")); // no run directory here: noted, not fatal
    assert!(app.log.back().unwrap().contains("no run directory"));
    // q asks; Esc cancels; q then s stops with a checkpoint.
    app.on_action(action_for('q').unwrap());
    assert_eq!(app.overlay, Overlay::QuitPrompt);
    assert!(app.on_quit_key(None).is_empty());
    assert_eq!(app.overlay, Overlay::None);
    app.on_action(action_for('q').unwrap());
    assert_eq!(app.on_quit_key(Some('s')), vec![Effect::Send(Command::Stop)]);
    // Every key in the table is in the help screen.
    app.overlay = Overlay::None;
    app.on_action(Action::Help);
    let help = draw(&app, 160, 48);
    for b in KEYMAP {
        assert!(help.contains(b.help), "{}", b.help);
    }
}

#[test]
fn ema_smooths_and_raw_is_kept() {
    let app = app_with_history();
    let p = app.points.last().unwrap();
    assert_ne!(p.loss, p.ema);
    assert_eq!(app.points.len(), 120);
    assert_eq!(app.evals.len(), 2);
}

fn type_line(app: &mut App, text: &str) -> Vec<Command> {
    for c in text.chars() {
        assert!(app.on_chat_key(ChatKey::Char(c)).is_empty());
    }
    app.on_chat_key(ChatKey::Enter)
}

#[test]
fn chat_pane_pauses_streams_stops_and_restores() {
    let mut app = app_with_history();
    // Opening pauses training (it was running); letters are text now.
    assert_eq!(app.on_action(action_for('g').unwrap()), vec![Effect::Send(Command::SetPaused(true))]);
    app.on_event(&Event::Paused { step: 120, paused: true });
    assert!(type_line(&mut app, "/temp 0.3").is_empty());
    assert!(type_line(&mut app, "/max 64").is_empty());
    assert_eq!((app.chat.temperature, app.chat.max_tokens), (0.3, 64));
    assert!(type_line(&mut app, "/temp hot").is_empty());
    assert!(app.chat.status.contains("/temp"), "{}", app.chat.status);
    let sent = type_line(&mut app, "Tell me a story");
    let [Command::Chat(req)] = sent.as_slice() else { panic!("{sent:?}") };
    assert_eq!(req.messages, vec![kiln::chat::Message::new("user", "Tell me a story")]);
    assert_eq!((req.temperature, req.max_tokens), (0.3, 64));
    let id = req.id;
    // Another viewer's reply is not ours.
    app.on_event(&Event::ChatToken { id: id + 1, text: "noise".into() });
    app.on_event(&Event::ChatToken { id, text: "Once there".into() });
    app.on_event(&Event::ChatToken { id, text: " was a kiln.".into() });
    assert_eq!(app.chat.messages.last().unwrap().content, "Once there was a kiln.");
    insta::assert_snapshot!("chat_streaming_80x24", draw(&app, 80, 24));
    // Esc while streaming stops the reply, and does not leave.
    assert_eq!(app.on_chat_key(ChatKey::Esc), vec![Command::ChatStop(id)]);
    assert!(app.chat.open);
    let done = Event::ChatDone { id, step: 120, tokens: 6, tokens_per_s: 41.5, ended: "stopped".into(), dropped: 0 };
    app.on_event(&done);
    assert_eq!(app.chat.pending, None);
    assert!(app.chat.status.contains("41.5 tok/s"), "{}", app.chat.status);
    insta::assert_snapshot!("chat_done_160x48", draw(&app, 160, 48));
    // The second turn carries the whole conversation.
    let sent = type_line(&mut app, "And then?");
    let [Command::Chat(req)] = sent.as_slice() else { panic!("{sent:?}") };
    assert_eq!(req.messages.len(), 3);
    assert_eq!(req.messages[1].content, "Once there was a kiln.");
    let err =
        Event::ChatDone { id: req.id, step: 120, tokens: 0, tokens_per_s: 0.0, ended: "error: x".into(), dropped: 0 };
    app.on_event(&err);
    assert_eq!(app.chat.messages.len(), 2, "a failed turn leaves the conversation as it was");
    assert_eq!(app.chat.input, "And then?", "and gives the words back");
    app.chat.input.clear();
    // Leaving restores the state before: training resumes.
    assert_eq!(app.on_chat_key(ChatKey::Esc), vec![Command::SetPaused(false)]);
    assert!(!app.chat.open);
}

#[test]
fn chat_keeps_a_pause_it_did_not_take_and_can_train_meanwhile() {
    let mut app = app_with_history();
    app.on_event(&Event::Paused { step: 120, paused: true });
    assert!(app.open_chat().is_empty(), "already paused by the user");
    assert!(draw(&app, 80, 24).contains("stays paused"));
    assert!(app.on_chat_key(ChatKey::Tab).is_empty(), "and it stays paused on leaving");
    app.on_event(&Event::Paused { step: 120, paused: false });
    assert_eq!(app.open_chat(), vec![Command::SetPaused(true)]);
    assert_eq!(type_line(&mut app, "/train"), vec![Command::SetPaused(false)]);
    app.on_event(&Event::Paused { step: 120, paused: false });
    assert!(draw(&app, 80, 24).contains("training goes on"));
    assert!(app.on_chat_key(ChatKey::Tab).is_empty());
    assert!(app.open_chat().is_empty(), "/train is remembered");
}

/// Starts an export as the dashboard's loop does, and hands its line back once it has ended
/// (`App::export_done`), as the loop does when the line reaches its inbox.
fn export_and_wait(app: &mut App) {
    let (tx, rx) = std::sync::mpsc::channel();
    app.export(move |line| tx.send(line).unwrap());
    let line = rx.recv_timeout(std::time::Duration::from_secs(120)).expect("the export never finished");
    app.export_done(line);
}

#[test]
fn x_exports_the_current_window_as_a_png_in_the_run_directory() {
    let t = tempfile::tempdir().unwrap();
    let mut app = app_with_history();
    // Without a run directory there is nothing to plot from: said in the event log.
    assert_eq!(app.on_action(action_for('x').unwrap()), vec![Effect::Export], "x asks the terminal loop to export");
    app.export(|_| panic!("no export starts"));
    assert_eq!(app.log.back().unwrap(), "export: no run directory known");
    // With one: the history the dashboard shows is the run's metrics.jsonl.
    let history: String = (1..=120).map(|s| serde_json::to_string(&step(s)).unwrap() + "\n").collect();
    std::fs::write(t.path().join("metrics.jsonl"), history).unwrap();
    app.run_dir = Some(t.path().to_path_buf());
    app.on_action(action_for('+').unwrap()); // the last 200 steps, then the last 50
    app.on_action(action_for('+').unwrap());
    // The plot renders on its own thread: the dashboard's loop goes on meanwhile, and a second
    // `x` before it ends is refused rather than queued.
    let (tx, rx) = std::sync::mpsc::channel();
    app.export(move |line| tx.send(line).unwrap());
    app.export(|_| panic!("a second export while one runs"));
    assert_eq!(app.log.back().unwrap(), "export: the previous one is still running");
    app.export_done(rx.recv_timeout(std::time::Duration::from_secs(120)).expect("the export never finished"));
    let png = t.path().join("plot-step-00000120.png");
    assert_eq!(app.log.back().unwrap(), &format!("exported {}", png.display()));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{} bytes", bytes.len());
    // A metrics file it cannot plot is a line in the log, not a crash of the dashboard.
    std::fs::write(t.path().join("metrics.jsonl"), "not json\n").unwrap();
    export_and_wait(&mut app);
    assert!(app.log.back().unwrap().starts_with("export failed: "), "{:?}", app.log.back());
}

#[test]
fn an_attached_viewer_replays_the_history_then_goes_live_without_repeats() {
    let t = tempfile::tempdir().unwrap();
    let mut history = String::new();
    for s in 1..=60 {
        history += &(serde_json::to_string(&step(s)).unwrap() + "\n");
        if s == 50 {
            let eval = Event::Eval { step: 50, tokens: 50 * 2048, loss: 3.5, per_source: vec![] };
            history += &(serde_json::to_string(&eval).unwrap() + "\n");
            history += "{\"kind\": \"step\", \"step\": \n"; // a line cut short by a crash
        }
    }
    std::fs::write(t.path().join("metrics.jsonl"), history).unwrap();
    let mut app = App::new("attached".into(), 400, themes(ColorMode::None), true);
    assert_eq!(app.replay_history(t.path()), 61, "60 steps and one eval; the damaged line skipped");
    assert_eq!((app.points.len(), app.evals.len()), (60, 1));
    assert_eq!(app.last.as_ref().unwrap().step, 60);
    // The socket's live events overlap what was replayed (written to metrics.jsonl just before the
    // viewer connected): each step is drawn once.
    for s in 58..=63 {
        app.on_event(&step(s));
    }
    let steps: Vec<u64> = app.points.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=63).collect::<Vec<_>>());
    // A run with no history yet replays nothing.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(App::new("new".into(), 400, themes(ColorMode::None), true).replay_history(empty.path()), 0);
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

#[test]
fn keys_are_read_by_the_pane_that_has_the_keyboard_and_return_effects() {
    let mut app = app_with_history();
    assert_eq!(app.on_key(key(KeyCode::Char('p'))), vec![Effect::Send(Command::TogglePause)]);
    // A release (reported by some terminals) and Ctrl+C are not the key table's `c`.
    let release = KeyEvent::new_with_kind(KeyCode::Char('c'), KeyModifiers::NONE, KeyEventKind::Release);
    assert!(app.on_key(release).is_empty());
    assert!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)).is_empty());
    // In the chat pane letters are text; Esc leaves it and gives back the pause it took.
    assert_eq!(app.on_key(key(KeyCode::Tab)), vec![Effect::Send(Command::SetPaused(true))]);
    assert!(app.on_key(key(KeyCode::Char('q'))).is_empty());
    assert_eq!(app.chat.input, "q");
    assert!(app.on_key(key(KeyCode::Backspace)).is_empty());
    assert_eq!(app.on_key(key(KeyCode::Esc)), vec![Effect::Send(Command::SetPaused(false))]);
    // The quit prompt: any other key cancels; `d` detaches.
    assert!(app.on_key(key(KeyCode::Char('q'))).is_empty());
    assert_eq!(app.overlay, Overlay::QuitPrompt);
    assert!(app.on_key(key(KeyCode::Char('p'))).is_empty(), "cancels, does not pause");
    assert_eq!(app.overlay, Overlay::None);
    app.on_key(key(KeyCode::Char('q')));
    assert_eq!(app.on_key(key(KeyCode::Char('d'))), vec![Effect::Detach]);
    // Detaching with the chat pane open gives its pause back first: training goes on.
    let mut app = app_with_history();
    assert_eq!(app.open_chat(), vec![Command::SetPaused(true)]);
    assert_eq!(app.on_quit_key(Some('d')), vec![Effect::Send(Command::SetPaused(false)), Effect::Detach]);
}

#[test]
fn a_viewer_that_fell_behind_says_how_many_events_it_missed() {
    let line = r#"{"kind":"lagged","missed":37}"#;
    let e: Event = serde_json::from_str(line).unwrap();
    assert_eq!(serde_json::to_string(&e).unwrap(), line);
    let mut app = app_with_history();
    app.on_event(&e);
    assert_eq!(app.log.back().unwrap(), "this viewer fell behind: 37 events went past it (the run goes on)");
    assert_eq!(app.points.len(), 120, "the curve keeps what it has");
}

#[test]
fn a_refused_step_is_marked_on_the_loss_chart_once() {
    let marks = |app: &App| {
        let mut t = Terminal::new(TestBackend::new(160, 48)).unwrap();
        t.draw(|f| render(f, app)).unwrap();
        let warn = app.theme().warn;
        t.backend().buffer().content().iter().filter(|c| c.symbol() == "█" && c.fg == warn).count()
    };
    let mut app = App::new("guarded".into(), 400, themes(ColorMode::TrueColor), true);
    for s in 1..=120 {
        app.on_event(&step(s));
    }
    assert_eq!(marks(&app), 0, "no refused step, no mark");
    let guard = Event::Guard {
        step: 110,
        tokens: 110 * 2048,
        reason: "non-finite loss or gradient norm".into(),
        loss: None,
        grad_norm: None,
        z: None,
        action: "skip".into(),
        in_a_row: 1,
    };
    app.on_event(&guard);
    app.on_event(&guard); // an attached viewer replays history, then goes live
    assert_eq!(app.guards, [(110, 110 * 2048)]);
    assert!(marks(&app) >= 1, "the refused step hangs from the chart's top edge");
    assert!(app.log.back().unwrap().contains("guard: non-finite"));
}
