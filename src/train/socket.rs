//! The run's control socket: `RUN_DIR/kiln.sock`, a Unix socket (mode 0600, no network port).
//! Every engine event goes to every connected viewer as one JSON line; a viewer sends one-word
//! commands (`pause`, `checkpoint`, `sample`, `eval`, `stop`), one per line. A slow or stuck viewer
//! loses events instead of slowing the engine.

use super::events::{Command, Event};
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Sender, SyncSender};
use std::sync::{Arc, Mutex};

pub const SOCKET: &str = "kiln.sock";
/// Events buffered per viewer before it starts losing them.
const VIEWER_BUFFER: usize = 1024;

pub struct Server {
    path: PathBuf,
    viewers: Arc<Mutex<Vec<SyncSender<String>>>>,
}

impl Server {
    /// Listens on `run_dir/kiln.sock`; commands from viewers go to `commands`.
    pub fn start(run_dir: &Path, commands: Sender<Command>) -> Result<Server> {
        let path = run_dir.join(SOCKET);
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).with_context(|| format!("{}: cannot listen", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("{}: cannot restrict permissions", path.display()))?;
        let viewers: Arc<Mutex<Vec<SyncSender<String>>>> = Arc::default();
        let list = viewers.clone();
        std::thread::Builder::new().name("kiln-socket".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let (tx, rx) = sync_channel::<String>(VIEWER_BUFFER);
                if let Ok(mut w) = stream.try_clone() {
                    std::thread::spawn(move || {
                        for line in rx {
                            if w.write_all(line.as_bytes()).is_err() {
                                return;
                            }
                        }
                    });
                }
                let cmds = commands.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if let Some(c) = Command::from_wire(&line) {
                            if cmds.send(c).is_err() {
                                return;
                            }
                        }
                    }
                });
                list.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
            }
        })?;
        Ok(Server { path, viewers })
    }

    /// Sends `e` to every viewer without blocking; viewers that went away are dropped.
    pub fn broadcast(&self, e: &Event) {
        let Ok(mut line) = serde_json::to_string(e) else { return };
        line.push('\n');
        let mut v = self.viewers.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|tx| !matches!(tx.try_send(line.clone()), Err(std::sync::mpsc::TrySendError::Disconnected(_))));
    }
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

impl Server {
    /// Removes the socket file: the run is over for viewers. Also done on drop.
    pub fn close(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
