//! The run's control socket: `RUN_DIR/kiln.sock`, a Unix socket (mode 0600, no network port).
//! Every engine event goes to every connected viewer as one JSON line; a viewer sends one-word
//! commands (`pause`, `checkpoint`, `sample`, `eval`, `stop`), one per line.
//!
//! The engine never waits on a viewer: `broadcast` serializes an event once and puts it in a
//! bounded broadcast channel. The viewers are served by a small tokio runtime on one thread
//! (`serve`: one task each), because waiting on many peers at once is the work an async runtime
//! is for; the engine, the rank threads and the data loader stay plain threads. A viewer that
//! falls `VIEWER_BUFFER` events behind loses the oldest and is told how many (`Event::Lagged`).

use super::events::{Command, Event};
use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

mod serve;

pub const SOCKET: &str = "kiln.sock";
/// Events buffered per viewer before it starts losing them.
const VIEWER_BUFFER: usize = 1024;

pub struct Server {
    path: PathBuf,
    /// Until `close`.
    running: Mutex<Option<Running>>,
}

struct Running {
    events: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Dropped to stop serving.
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    /// Listens on `run_dir/kiln.sock`; commands from viewers go to `commands`.
    pub fn start(run_dir: &Path, commands: Sender<Command>) -> Result<Server> {
        let path = run_dir.join(SOCKET);
        remove_stale_socket(&path)?;
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("{}: cannot listen", path.display()))?;
        // A socket nobody serves would only make viewers wait: it goes with the failure.
        let running = serve_on(&path, listener, commands).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
        Ok(Server { path, running: Mutex::new(Some(running)) })
    }

    /// Sends `e` to every viewer without blocking; a viewer that is behind loses its oldest events.
    pub fn broadcast(&self, e: &Event) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = running.as_ref() else { return };
        if r.events.receiver_count() == 0 {
            return; // nobody to serialize it for
        }
        let Ok(mut line) = serde_json::to_string(e) else { return };
        line.push('\n');
        // Fails only when the last viewer left meanwhile.
        let _ = r.events.send(line.into());
    }

    /// How many viewers are connected.
    pub fn viewers(&self) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.as_ref().map_or(0, |r| r.events.receiver_count())
    }

    /// Ends serving: the socket file goes, no one else can connect, each viewer gets the events
    /// already sent to it (for at most `serve::CLOSE_GRACE`) and then the end of its stream.
    /// Also done on drop; later calls do nothing.
    pub fn close(&self) {
        let taken = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(Running { events, stop, thread }) = taken else { return };
        let _ = std::fs::remove_file(&self.path);
        drop(events);
        drop(stop);
        let _ = thread.join();
    }
}

/// Restricts the bound socket and starts its thread.
fn serve_on(path: &Path, listener: std::os::unix::net::UnixListener, commands: Sender<Command>) -> Result<Running> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{}: cannot restrict permissions", path.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the run socket's runtime")?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _in_runtime = runtime.enter();
        tokio::net::UnixListener::from_std(listener)?
    };
    let (events, _) = tokio::sync::broadcast::channel(VIEWER_BUFFER);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let feed = events.clone();
    let thread = std::thread::Builder::new()
        .name("kiln-socket".into())
        .spawn(move || runtime.block_on(serve::serve(listener, feed, commands, stopped)))?;
    Ok(Running { events, stop, thread })
}

/// Removes the socket a killed run left behind (the run lock means no live process serves it).
/// Anything else at that path is the user's, and is named rather than deleted.
fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        let what = if meta.is_dir() {
            "a directory"
        } else if meta.file_type().is_symlink() {
            "a symbolic link"
        } else {
            "a file"
        };
        anyhow::bail!(
            "{}: is {what}, not the run's socket; move it away (kiln deletes only a stale socket)",
            path.display()
        );
    }
    std::fs::remove_file(path).with_context(|| format!("{}: cannot remove the stale socket", path.display()))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close();
    }
}

/// Closes the socket when the run ends, however it ends, even while chat threads still hold the
/// server (a process that exits does not wait for them).
pub struct CloseOnDrop(pub std::sync::Arc<Server>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A viewer's connection: events in, commands out.
pub fn connect(run_dir: &Path) -> Result<(UnixStream, PathBuf)> {
    let path = run_dir.join(SOCKET);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            anyhow::bail!("{}: not a socket, so no kiln run is listening there", path.display());
        }
    }
    let s = UnixStream::connect(&path).with_context(|| {
        format!("{}: no running job to attach to (is `kiln train` running for this run?)", path.display())
    })?;
    Ok((s, path))
}
