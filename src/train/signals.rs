//! SIGHUP is ignored. SIGINT / SIGTERM: the first asks the trainer to checkpoint at the next step boundary and exit 0;
//! a second SIGINT exits at once with status 130.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static REQUESTS: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the handler once per process (later calls are no-ops).
pub fn install() {
    INSTALLED.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            use std::io::Write;
            // Not eprintln!: it panics when stderr is gone (a closed pipe, a dropped terminal), and
            // a panic here would swallow the second interrupt.
            if REQUESTS.fetch_add(1, Ordering::SeqCst) >= 1 {
                let _ = writeln!(std::io::stderr(), "\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            let _ = writeln!(
                std::io::stderr(),
                "\ninterrupt: checkpointing at the next step boundary (interrupt again to exit at once)"
            );
        });
        // A dropped SSH connection or a killed tmux pane must not end the run: the dashboard falls
        // back to headless and the run can be attached again (`kiln attach`). This comes after
        // ctrlc, whose `termination` feature also claims SIGHUP.
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
        }
    });
}

pub fn stop_requested() -> bool {
    REQUESTS.load(Ordering::SeqCst) > 0
}
