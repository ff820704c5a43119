//! Logging set-up shared by the binaries.

use std::io::Write;

/// Logs to standard error at `info` (or as `RUST_LOG` says), one line per record:
/// `2026-11-24T10:00:00Z INFO server: text`.
pub fn init(program: &'static str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {:<5} {program}: {}",
                buf.timestamp_seconds(),
                record.level(),
                record.args()
            )
        })
        .init();
}

/// Installs a Ctrl-C (SIGINT/SIGTERM) handler and returns the channel it signals.
pub fn shutdown_channel() -> crossbeam_channel::Receiver<()> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    }) {
        log::warn!("cannot install the Ctrl-C handler: {e}");
    }
    rx
}
