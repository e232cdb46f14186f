//! The run's control socket: viewers receive every event as a JSON line and steer the run with
//! one-word commands; `--detach` runs in the background and can be attached to.

mod common;

use kiln::chat::service::ChatRequest;
use kiln::chat::Message;
use kiln::train::events::Event;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn setup(dir: &Path) -> PathBuf {
    let data = common::prepared_corpus(dir);
    let cfg = format!(
        "[model]\nn_layer = 1\nd_model = 32\nn_head = 2\nn_kv_head = 1\nd_ff = 64\nvocab_size = 32000\nmax_seq_len = 64\n\
         tie_embeddings = true\n[tokenizer]\npath = \"{}\"\n[data]\nseq_len = 32\n[[data.sources]]\nname = \"t\"\npath = \"{}\"\n\
         weight = 1.0\n[train]\nmicro_batch = 2\nmax_steps = 100000\n[checkpoint]\nevery_steps = 100000\nkeep_last = 1\n",
        root().join("assets/tokenizer/llama2/tokenizer.json").display(),
        data.display()
    );
    let p = dir.join("a.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// `kiln train CFG --run-dir RUN --headless`, started.
fn train_headless(cfg: &Path, run: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to the run's socket once it exists. The file appears when the engine binds it, a
/// moment before it listens, so a refused connection in that moment is tried again.
fn connect(sock: &Path) -> UnixStream {
    wait_for(sock);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{}: {e}", sock.display()),
        }
    }
}

/// Reads events until `pred` holds for one.
fn read_until(r: &mut impl BufRead, mut pred: impl FnMut(&Event) -> bool) -> Event {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "socket closed");
        let e: Event = serde_json::from_str(&line).unwrap();
        if pred(&e) {
            return e;
        }
    }
}

fn drive(run: &Path) {
    let sock = run.join("kiln.sock");
    let s = connect(&sock);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    read_until(&mut r, |e| matches!(e, Event::Step(_)));
    // Restricted just after it is bound: by the first event, certainly.
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    writeln!(w, "pause").unwrap();
    read_until(&mut r, |e| matches!(e, Event::Paused { paused: true, .. }));
    writeln!(w, "checkpoint").unwrap();
    read_until(&mut r, |e| matches!(e, Event::Checkpoint { .. }));
    // Chat with the paused weights: the reply streams back as events.
    let req = ChatRequest {
        id: 99,
        messages: vec![Message::new("user", "Once upon a time")],
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: 8,
    };
    writeln!(w, "{}", kiln::train::events::Command::Chat(req).wire()).unwrap();
    let mut pieces = 0;
    let done = read_until(&mut r, |e| {
        pieces += matches!(e, Event::ChatToken { id: 99, .. }) as usize;
        matches!(e, Event::ChatDone { id: 99, .. })
    });
    let Event::ChatDone { tokens, ended, .. } = done else { unreachable!() };
    assert!(!ended.starts_with("error"), "{ended}");
    assert!(tokens == 8 || ended == "end of turn", "{tokens} {ended}");
    assert!(pieces > 0 || tokens == 0);
    writeln!(w, "pause off").unwrap();
    read_until(&mut r, |e| matches!(e, Event::Paused { paused: false, .. }));
    writeln!(w, "stop").unwrap();
}

#[test]
fn viewers_get_events_and_steer_the_run_over_the_socket() {
    let t = tempfile::tempdir().unwrap();
    let cfg = setup(t.path());
    let run = t.path().join("run");
    let mut child = train_headless(&cfg, &run);
    drive(&run);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(kiln::train::checkpoint::latest(&run).unwrap().is_some());
    assert!(!run.join("kiln.sock").exists(), "the socket goes away with the run");
}

#[test]
fn several_viewers_see_every_event_and_any_of_them_steers() {
    let t = tempfile::tempdir().unwrap();
    let cfg = setup(t.path());
    let run = t.path().join("run");
    let mut child = train_headless(&cfg, &run);
    let sock = run.join("kiln.sock");
    let viewers: Vec<(BufReader<UnixStream>, UnixStream)> = (0..3)
        .map(|_| {
            let s = connect(&sock);
            (BufReader::new(s.try_clone().unwrap()), s)
        })
        .collect();
    let mut viewers = viewers;
    for (r, _) in &mut viewers {
        read_until(r, |e| matches!(e, Event::Step(_)));
    }
    // Each viewer in turn steers; every viewer sees the result.
    writeln!(viewers[0].1, "pause").unwrap();
    for (r, _) in &mut viewers {
        read_until(r, |e| matches!(e, Event::Paused { paused: true, .. }));
    }
    writeln!(viewers[1].1, "checkpoint").unwrap();
    let mut saved = Vec::new();
    for (r, _) in &mut viewers {
        let Event::Checkpoint { step, .. } = read_until(r, |e| matches!(e, Event::Checkpoint { .. })) else {
            unreachable!()
        };
        saved.push(step);
    }
    assert!(saved.iter().all(|s| *s == saved[0]), "viewers saw different checkpoints: {saved:?}");
    // One viewer leaving does not disturb the others.
    drop(viewers.remove(0));
    writeln!(viewers[1].1, "pause off").unwrap();
    for (r, _) in &mut viewers {
        read_until(r, |e| matches!(e, Event::Paused { paused: false, .. }));
    }
    writeln!(viewers[0].1, "stop").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // The run's end closes every viewer's stream.
    for (r, _) in &mut viewers {
        let mut rest = String::new();
        assert!(std::io::Read::read_to_string(r, &mut rest).is_ok(), "a viewer's stream stayed open");
    }
}

#[test]
fn detach_runs_in_the_background_and_can_be_attached() {
    let t = tempfile::tempdir().unwrap();
    let cfg = setup(t.path());
    let run = t.path().join("bg");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--detach"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("kiln attach"), "{out}");
    drive(&run);
    let deadline = Instant::now() + Duration::from_secs(60);
    while run.join("kiln.sock").exists() {
        assert!(Instant::now() < deadline, "background run did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::read_to_string(run.join("train.log")).unwrap().contains("ckpt"));
}

#[test]
fn sigterm_ends_a_paused_run_with_a_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let cfg = setup(t.path());
    let run = t.path().join("paused");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", cfg.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--headless"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = run.join("kiln.sock");
    let s = connect(&sock);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    read_until(&mut r, |e| matches!(e, Event::Step(_)));
    writeln!(w, "pause on").unwrap();
    let Event::Paused { step, .. } = read_until(&mut r, |e| matches!(e, Event::Paused { paused: true, .. })) else {
        unreachable!()
    };
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "a paused run ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let latest = kiln::train::checkpoint::latest(&run).unwrap().unwrap();
    assert!(latest.ends_with(format!("step-{step:08}")), "{}", latest.display());
}

/// A log line of about a kilobyte, numbered.
fn numbered(step: u64) -> Event {
    Event::Log { step, message: "x".repeat(1000) }
}

#[test]
fn a_viewer_that_does_not_read_never_blocks_the_engine_and_is_told_what_it_missed() {
    let t = tempfile::tempdir().unwrap();
    let (tx, _commands) = std::sync::mpsc::channel();
    let server = std::sync::Arc::new(kiln::train::socket::Server::start(t.path(), tx).unwrap());
    let sock = t.path().join("kiln.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let slow = connect(&sock);
    let stuck = connect(&sock); // never reads at all
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.viewers() < 2 {
        assert!(Instant::now() < deadline, "the server never took the viewers");
        std::thread::sleep(Duration::from_millis(10));
    }
    // 20 MB of events, far more than the socket buffers and the queue hold: the engine's side
    // returns at once (a blocking server would hang here).
    let n = 20_000;
    let engine = server.clone();
    common::within(Duration::from_secs(30), "broadcasting to viewers that do not read", move || {
        for s in 1..=n {
            engine.broadcast(&numbered(s));
        }
    });
    // The slow viewer now reads: what it got and what it was told it missed add up to every event,
    // in order, ending with the newest.
    let mut r = BufReader::new(slow);
    let (mut got, mut missed, mut last, mut told) = (0, 0, 0, 0);
    while got + missed < n {
        match read_until(&mut r, |_| true) {
            Event::Log { step, .. } => {
                assert!(step > last, "step {step} after {last}");
                (got, last) = (got + 1, step);
            }
            Event::Lagged { missed: m } => (missed, told) = (missed + m, told + 1),
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((got + missed, last), (n, n));
    assert!(told > 0 && missed > 0, "got {got}, told {told} times");
    // Closing ends every stream, the stuck viewer's too, within the grace it is given.
    let closing = server.clone();
    common::within(Duration::from_secs(30), "closing with a stuck viewer", move || closing.close());
    assert!(!sock.exists(), "the socket goes away");
    for mut viewer in [Box::new(r) as Box<dyn std::io::Read>, Box::new(stuck)] {
        let mut rest = Vec::new();
        assert!(viewer.read_to_end(&mut rest).is_ok(), "a viewer's stream stayed open");
    }
}
