//! The socket's runtime side: accepting viewers, one task each, until the server stops.

use crate::train::events::{Command, Event};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// How long the viewers get, once the run ends, to take the events already sent to them: a viewer
/// that reads gets the run's last events (its final checkpoint); one that does not cannot hold
/// the process up.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves viewers until `stop` is sent or dropped, then lets them finish (see `CLOSE_GRACE`).
pub(super) async fn serve(
    listener: UnixListener,
    events: broadcast::Sender<Arc<str>>,
    commands: Sender<Command>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut viewers = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    viewers.spawn(viewer(stream, events.subscribe(), commands.clone()));
                }
                // Out of descriptors, say: try again in a moment rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            // Finished viewers are reaped as they go, so a long run's set does not grow.
            Some(_) = viewers.join_next(), if !viewers.is_empty() => {}
        }
    }
    drop(listener);
    // With the server's sender already gone, this was the last: each viewer now takes what is
    // left in its queue, then sees the channel closed and ends its stream.
    drop(events);
    let _ = tokio::time::timeout(CLOSE_GRACE, async { while viewers.join_next().await.is_some() {} }).await;
    // Dropping the set aborts the viewers still writing, which closes their streams.
}

/// One viewer: events out while commands come in, so a viewer whose events back up can still
/// steer (or stop) the run. It is done when its events end (it went away, or the run ended); one
/// that only closed its sending half still gets them, as `socat` leaves it after its input ends.
async fn viewer(stream: UnixStream, events: broadcast::Receiver<Arc<str>>, commands: Sender<Command>) {
    let (from, to) = stream.into_split();
    let obeying = async {
        obey(from, commands).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = forward(events, to) => {}
        () = obeying => {}
    }
}

/// Writes each event line to the viewer; where it fell behind, a line saying how many it missed.
async fn forward(mut events: broadcast::Receiver<Arc<str>>, mut to: OwnedWriteHalf) {
    loop {
        let line = match events.recv().await {
            Ok(line) => line,
            Err(RecvError::Lagged(missed)) => lagged_line(missed).into(),
            Err(RecvError::Closed) => return,
        };
        if to.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn lagged_line(missed: u64) -> String {
    serde_json::to_string(&Event::Lagged { missed }).unwrap_or_default() + "\n"
}

/// Passes the viewer's commands on to the engine, one per line; lines that are not a command are
/// ignored.
async fn obey(from: OwnedReadHalf, commands: Sender<Command>) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(c) = Command::from_wire(&line) {
            if commands.send(c).is_err() {
                return;
            }
        }
    }
}
