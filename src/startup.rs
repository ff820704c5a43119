//! What every binary does when it starts: logging, the Ctrl-C handler, private files, and the
//! transport its flags ask for (with the warning that plaintext deserves).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::transport::{pin_path, Transport};

/// Logs to standard error at `info` (or as `RUST_LOG` says), one line per record:
/// `2026-11-24T10:00:00Z INFO server: text`.
pub fn init(program: &'static str) {
    init_with(program, None, "info");
}

/// Like [`init`], at `level` (a `--log-level` flag: `off`, `error`, `warn`, `info`, `debug`,
/// `trace`, or a `RUST_LOG`-style filter) if given, else as `RUST_LOG` says, else `default`.
/// Lines are never coloured.
pub fn init_with(program: &'static str, level: Option<&str>, default: &str) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if let Some(level) = level {
        builder.parse_filters(level);
    }
    builder
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

/// Ends the process with `code` after `limit`, saying so (a `--timeout` flag): whatever it is
/// waiting for, a script gets its answer in time.
pub fn exit_after(limit: std::time::Duration, program: &'static str, code: i32) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!(
            "{program}: error: timed out after {} (--timeout)",
            crate::units::human_duration_precise(limit)
        );
        std::process::exit(code);
    });
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

/// The client's folder when FASTCHAT_HOME is not set: `~/.fastchat`.
pub fn default_home() -> std::path::PathBuf {
    std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("."))
        .join(".fastchat")
}

/// Every file and folder this process creates from now on is its owner's alone (0600, 0700):
/// the database with its -wal and -shm files, logs, keys.
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// The warning every binary prints, at every start, when it runs without TLS.
pub fn warn_plaintext(program: &str) {
    eprintln!(
        "{program}: WARNING: --insecure-plaintext: no TLS. Passwords, session tokens and \
         everything else on the wire can be read and changed by anyone on the network path. \
         For teaching on a trusted machine only."
    );
}

/// A balancer's or server's transport: `--insecure-plaintext`, or its certificate `name` (or
/// `default_name`) from the cluster folder `tls_dir`.
pub fn member_transport(
    program: &str,
    tls_dir: Option<&Path>,
    name: Option<&str>,
    default_name: &str,
    plaintext: bool,
) -> Result<Transport> {
    match (tls_dir, plaintext) {
        (Some(_), true) => Err(Error::Invalid(
            "--tls-dir and --insecure-plaintext exclude each other".into(),
        )),
        (None, true) => {
            warn_plaintext(program);
            Ok(Transport::plaintext())
        }
        (Some(dir), false) => Transport::member(dir, name.unwrap_or(default_name)),
        (None, false) => Err(Error::Invalid(
            "no certificates: give --tls-dir DIR (make one with `fastchat-admin init DIR`), or \
             --insecure-plaintext for a classroom on one trusted machine"
                .into(),
        )),
    }
}

/// A client's transport: `--insecure-plaintext`; the CA file `ca`; or the CA of the cluster
/// whose balancer is `balancer`, pinned under `home` on first use.
pub fn client_transport(
    program: &str,
    home: &Path,
    balancer: &str,
    ca: Option<&PathBuf>,
    plaintext: bool,
) -> Result<Transport> {
    match (ca, plaintext) {
        (Some(_), true) => Err(Error::Invalid(
            "--ca and --insecure-plaintext exclude each other".into(),
        )),
        (None, true) => {
            warn_plaintext(program);
            Ok(Transport::plaintext())
        }
        (Some(ca), false) => Transport::client_with_ca(ca),
        (None, false) => Transport::client_pinned(pin_path(home, balancer)),
    }
}
