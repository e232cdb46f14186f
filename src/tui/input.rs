//! Terminal input on its own thread: it sleeps in the kernel until the terminal has something (a
//! key, or a hang-up), then hands crossterm's events to the dashboard's inbox. It reads until
//! `Input` is dropped, so no key typed after the dashboard closes is taken from the shell.

use super::inbox::UiMsg;
use anyhow::{Context, Result};
use ratatui::crossterm::event;
use std::io::IsTerminal;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Sender;
use std::time::Duration;

pub struct Input {
    /// The write end of a pipe the thread also waits on: closing it wakes the thread to return.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Input {
    /// Starts reading the terminal into `inbox`.
    pub fn start(inbox: Sender<UiMsg>) -> Result<Input> {
        // Where crossterm reads keys: standard input when it is a terminal, else the controlling
        // terminal. Waiting on standard input in the second case would wake at once, forever.
        let tty = if std::io::stdin().is_terminal() {
            None
        } else {
            Some(std::fs::File::open("/dev/tty").context("/dev/tty: cannot read keys")?)
        };
        let mut fds = [0; 2];
        // SAFETY: an array of two ints for the pipe's ends.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot make the input thread's stop pipe");
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors we now own.
        let (woken, stop) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let thread = std::thread::Builder::new().name("kiln-input".into()).spawn(move || {
            let keys = tty.as_ref().map_or(libc::STDIN_FILENO, |t| t.as_raw_fd());
            read_terminal(&inbox, keys, &woken)
        })?;
        Ok(Input { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_terminal(inbox: &Sender<UiMsg>, keys: RawFd, stop: &OwnedFd) {
    loop {
        match wait(keys, stop) {
            Wake::Stop => return,
            Wake::Gone => {
                let _ = inbox.send(UiMsg::TerminalGone);
                return;
            }
            Wake::Again => {}
            // crossterm reads every pending byte at once and queues the events: take them all
            // now, or the queued ones would wait for the next key press. A resize is picked up
            // here with the next key, and by the next frame in any case (ratatui resizes there).
            Wake::Ready => {
                while event::poll(Duration::ZERO).unwrap_or(false) {
                    let Ok(e) = event::read() else { break };
                    if inbox.send(UiMsg::Input(e)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

enum Wake {
    Ready,
    /// The terminal hung up.
    Gone,
    Stop,
    /// A signal interrupted the wait.
    Again,
}

/// Waits, with no timeout, for the terminal or the stop pipe. Asked of the kernel directly:
/// crossterm's own poll spins on a terminal that hung up instead of reporting it.
fn wait(keys: RawFd, stop: &OwnedFd) -> Wake {
    let mut fds = [
        libc::pollfd { fd: keys, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: two valid pollfds, and their count.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if n < 0 {
        let interrupted = std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        // Any other failure would fail again at once: stop reading rather than spin.
        return if interrupted { Wake::Again } else { Wake::Gone };
    }
    if fds[1].revents != 0 {
        return Wake::Stop;
    }
    if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return Wake::Gone;
    }
    if fds[0].revents & libc::POLLIN != 0 {
        Wake::Ready
    } else {
        Wake::Again
    }
}
