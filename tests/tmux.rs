//! End to end through a real terminal: the `kiln` binary driven in tmux (send-keys, capture-pane)
//! at 160x48 and 80x24 through pause, checkpoint, chat, quit with a checkpoint, a killed terminal,
//! attach and detach. Needs tmux; without it the test says so and passes, unless
//! `KILN_REQUIRE_TMUX=1` (set by `.ci/run`).

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A private tmux server, killed when the test ends together with every process started under
/// `dir` (a `kiln train` outlives its terminal by design, so a failed test would leave it running).
struct Tmux {
    socket: String,
    dir: PathBuf,
}

impl Tmux {
    fn new(name: &str, dir: &Path) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(std::env::var("KILN_REQUIRE_TMUX").as_deref() != Ok("1"), "tmux is not installed");
            common::skipped(name, "tmux is not installed (KILN_REQUIRE_TMUX=1 fails instead)");
            return None;
        }
        Some(Tmux { socket: format!("kiln-test-{name}-{}", std::process::id()), dir: dir.to_path_buf() })
    }

    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn start(&self, session: &str, w: u16, h: u16, cmd: &str) {
        let (w, h) = (w.to_string(), h.to_string());
        let o = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(["new-session", "-d", "-s", session, "-x", &w, "-y", &h, "-e", "LANG=C.UTF-8", cmd])
            .output()
            .unwrap();
        assert!(o.status.success(), "tmux: {}", String::from_utf8_lossy(&o.stderr));
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", session];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Literal text, typed.
    fn type_text(&self, session: &str, text: &str) {
        self.run(&["send-keys", "-t", session, "-l", text]);
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    fn wait_screen(&self, session: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.screen(session);
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "waited for {what}; the screen shows:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
        let _ = Command::new("pkill").arg("-f").arg(self.dir.as_os_str()).status();
    }
}

fn setup(dir: &Path) -> PathBuf {
    let data = common::prepared_corpus(dir);
    // Small enough to step every few milliseconds, so the step count visibly moves.
    let cfg = format!(
        "[model]\nn_layer = 2\nd_model = 64\nn_head = 4\nn_kv_head = 2\nd_ff = 128\nvocab_size = 32000\nmax_seq_len = 128\n\
         tie_embeddings = true\n[tokenizer]\npath = \"{}\"\n[data]\nseq_len = 64\n[[data.sources]]\nname = \"t\"\npath = \"{}\"\n\
         weight = 1.0\n[train]\nmicro_batch = 2\nmax_steps = 10000000\nlog_every = 1\n[checkpoint]\nevery_steps = 100000000\nkeep_last = 3\n\
         [sample]\nevery_steps = 0\n[eval]\nevery_steps = 0\n",
        root().join("assets/tokenizer/llama2/tokenizer.json").display(),
        data.display()
    );
    let p = dir.join("t.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count())
}

fn wait_until(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pred() {
        assert!(Instant::now() < deadline, "waited for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// metrics.jsonl grows (training runs).
fn assert_training(run: &Path) {
    let n = metrics_lines(run);
    wait_until("metrics.jsonl to grow", || metrics_lines(run) > n + 3);
}

/// metrics.jsonl stays put for a while (training is paused).
fn assert_paused(run: &Path) {
    wait_until("the pause event", || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("")
            .contains("\"paused\":true")
    });
    let n = metrics_lines(run);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(metrics_lines(run), n, "metrics.jsonl grew while paused");
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn chat(t: &Tmux, s: &str) {
    t.keys(s, &["g"]);
    t.wait_screen(s, "the chat pane", |x| x.contains("chat · temp"));
    t.type_text(s, "/max 12");
    t.keys(s, &["Enter"]);
    t.type_text(s, "Once upon a time");
    t.keys(s, &["Enter"]);
    let screen = t.wait_screen(s, "a finished reply", |x| x.contains("tok/s · weights of step"));
    assert!(screen.contains("you › Once upon a time") && screen.contains("model › "), "{screen}");
    t.keys(s, &["Tab"]);
    t.wait_screen(s, "the dashboard again", |x| !x.contains("chat · temp") && !x.contains("PAUSED"));
}

#[test]
fn dashboard_in_tmux_pauses_checkpoints_chats_and_quits_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let Some(t) = Tmux::new("dash", dir.path()) else { return };
    let cfg = setup(dir.path());
    let run = dir.path().join("run");
    let exit = dir.path().join("exit");
    let cmd = format!(
        "{} train {} --run-dir {}; echo $? > {}",
        env!("CARGO_BIN_EXE_kiln"),
        cfg.display(),
        run.display(),
        exit.display()
    );
    t.start("dash", 160, 48, &cmd);
    t.wait_screen("dash", "the dashboard", |x| x.contains("kiln") && x.contains("step ") && x.contains("loss"));
    assert_training(&run);

    t.keys("dash", &["p"]);
    assert_paused(&run);
    t.wait_screen("dash", "the paused banner", |x| x.contains("PAUSED"));
    let before = checkpoints(&run);
    t.keys("dash", &["c"]);
    wait_until("a new checkpoint", || checkpoints(&run).len() > before.len());
    let latest = kiln::train::checkpoint::latest(&run).unwrap().unwrap();
    kiln::io::load_model_dir(&latest, kiln::backend::cpu::Cpu::new()).expect("a whole checkpoint");
    t.keys("dash", &["p"]);
    t.wait_screen("dash", "the banner to go", |x| !x.contains("PAUSED"));
    assert_training(&run);

    chat(&t, "dash");
    assert_training(&run); // leaving the pane resumed training

    t.keys("dash", &["q"]);
    t.wait_screen("dash", "the quit prompt", |x| x.contains("checkpoint and stop"));
    t.keys("dash", &["s"]);
    wait_until("kiln to exit", || exit.exists());
    assert_eq!(std::fs::read_to_string(&exit).unwrap().trim(), "0");
    let last = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last_step = last.lines().filter(|l| l.contains("\"kind\":\"step\"")).count();
    let latest = kiln::train::checkpoint::latest(&run).unwrap().unwrap();
    assert!(latest.ends_with(format!("step-{last_step:08}")), "{} vs step {last_step}", latest.display());
}

#[test]
fn a_killed_terminal_leaves_training_running_and_attach_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let Some(t) = Tmux::new("attach", dir.path()) else { return };
    let cfg = setup(dir.path());
    let run = dir.path().join("run");
    let cmd = format!("{} train {} --run-dir {}", env!("CARGO_BIN_EXE_kiln"), cfg.display(), run.display());
    t.start("train", 80, 24, &cmd);
    t.wait_screen("train", "the dashboard at 80x24", |x| x.contains("step ") && x.contains("loss"));
    t.run(&["kill-session", "-t", "train"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_training(&run);
    assert!(run.join("kiln.sock").exists());

    let attach = format!("{} attach {}", env!("CARGO_BIN_EXE_kiln"), run.display());
    t.start("viewer", 80, 24, &attach);
    t.wait_screen("viewer", "the attached dashboard", |x| x.contains("attached") || x.contains("step "));
    t.keys("viewer", &["p"]);
    assert_paused(&run);
    t.keys("viewer", &["p"]);
    assert_training(&run);
    chat(&t, "viewer");
    t.keys("viewer", &["q"]);
    t.wait_screen("viewer", "the quit prompt", |x| x.contains("detach"));
    t.keys("viewer", &["d"]);
    wait_until("the viewer to exit", || !t.run(&["list-sessions"]).contains("viewer"));
    assert_training(&run);

    // Stop it over the socket, as any viewer can: it checkpoints and removes the socket.
    use std::io::Write;
    let mut s = UnixStream::connect(run.join("kiln.sock")).unwrap();
    writeln!(s, "stop").unwrap();
    wait_until("the run to stop", || !run.join("kiln.sock").exists());
    assert!(kiln::train::checkpoint::latest(&run).unwrap().is_some());
}
