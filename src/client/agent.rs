//! The session agent: a small process, one per logged-in user, that holds the unlocked keys
//! of a kept session in memory so that each command need not pay the password hash again
//! (as ssh-agent does for ssh keys).
//!
//! ```text
//! fastchat login ──spawns──▶ fastchat __agent DIR SECS (own session, no terminal)
//!                  stdin: identity (64 bytes) || session key (32 bytes), then closed
//!                  stdout: "ready PID\n" once DIR/agent.sock listens (0600, DIR is 0700)
//! a command ──connects──▶ agent.sock: "S" → the 96 bytes; "Q" → "K", and the agent ends
//! ```
//!
//! The agent answers only processes of its own user (the peer's credentials are checked on
//! every connection, beside the socket's mode), and ends after `SECS` without a request, on
//! `Q` (logout), or when its socket file is removed. Nothing it holds is ever written to disk:
//! after a reboot or an idle end the session's token (in `DIR/session`) is useless without the
//! session key, and the next command asks for the password again. docs/SECURITY.md weighs this
//! against a key file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::error::{Error, Result};

/// Bytes of the secrets: the identity's two private keys, then the session key.
const SECRETS: usize = 96;

/// How long a command waits for the agent's answer.
const ANSWER: Duration = Duration::from_secs(2);

/// The unlocked keys of a kept session; wiped when dropped.
pub struct Secrets(Vec<u8>);

impl Secrets {
    /// The identity's raw keys (64 bytes) and the session key (32 bytes).
    pub fn new(identity: &[u8], session_key: &[u8]) -> Result<Secrets> {
        if identity.len() != 64 || session_key.len() != 32 {
            return Err(Error::Invalid("session secrets of the wrong size".into()));
        }
        let mut all = identity.to_vec();
        all.extend_from_slice(session_key);
        Ok(Secrets(all))
    }

    /// The identity's raw keys.
    pub fn identity(&self) -> &[u8] {
        &self.0[..64]
    }

    /// The session key, raw.
    pub fn session_key(&self) -> &[u8] {
        &self.0[64..]
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        self.0.fill(0);
    }
}

/// The agent's socket in a user's folder.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// Starts an agent for the user folder `dir` holding `secrets`, ending after `idle` without a
/// request; returns its process id once it listens. `exe` is the `fastchat` binary.
pub fn start(exe: &Path, dir: &Path, idle: Duration, secrets: &Secrets) -> Result<u32> {
    let mut child = Command::new(exe)
        .arg("__agent")
        .arg(dir)
        .arg(idle.as_secs().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Local(format!("cannot start the session agent: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(&secrets.0)?;
    drop(stdin);
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    match line.trim().strip_prefix("ready ") {
        Some(pid) => pid
            .parse()
            .map_err(|_| Error::Invalid(format!("the session agent said {line:?}"))),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(Error::Invalid(
                "the session agent did not start (is the folder writable?)".into(),
            ))
        }
    }
}

/// The secrets of the agent for `dir`; `None` if no agent answers there.
pub fn fetch(dir: &Path) -> Result<Option<Secrets>> {
    let Some(mut s) = connect(dir) else {
        return Ok(None);
    };
    s.write_all(b"S")?;
    let mut all = vec![0u8; SECRETS];
    match s.read_exact(&mut all) {
        Ok(()) => Ok(Some(Secrets(all))),
        Err(_) => Ok(None),
    }
}

/// Ends the agent for `dir`; whether one was running.
pub fn stop(dir: &Path) -> bool {
    let Some(mut s) = connect(dir) else {
        return false;
    };
    let mut ok = [0u8; 1];
    s.write_all(b"Q").is_ok() && s.read_exact(&mut ok).is_ok()
}

fn connect(dir: &Path) -> Option<UnixStream> {
    let s = UnixStream::connect(socket_path(dir)).ok()?;
    s.set_read_timeout(Some(ANSWER)).ok()?;
    s.set_write_timeout(Some(ANSWER)).ok()?;
    Some(s)
}

/// The agent itself (`fastchat __agent DIR SECS`): reads the secrets from standard input,
/// listens on `DIR/agent.sock`, says `ready PID`, and answers until it is told to stop, its
/// socket is removed, or `idle` passes without a request.
pub fn serve(dir: &Path, idle: Duration) -> Result<()> {
    // Its own session: a Ctrl-C in the terminal that ran `fastchat login` does not end it.
    let _ = rustix::process::setsid();
    let mut all = vec![0u8; SECRETS];
    std::io::stdin().read_exact(&mut all)?;
    let secrets = Secrets(all);
    let path = socket_path(dir);
    // A socket left by an agent that died: nobody answers on it.
    if path.exists() && connect(dir).is_none() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| Error::Local(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    let me = rustix::process::getuid();
    let mut last = Instant::now();
    loop {
        let left = idle.saturating_sub(last.elapsed());
        // Wake at least once a second to notice a removed socket file.
        let wait = left.min(Duration::from_secs(1));
        let timeout = Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&listener, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&timeout));
        if left.is_zero() || !path.exists() {
            break;
        }
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        let ours = rustix::net::sockopt::socket_peercred(&s).is_ok_and(|c| c.uid == me);
        if !ours {
            continue;
        }
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(ANSWER));
        let mut request = [0u8; 1];
        if s.read_exact(&mut request).is_err() {
            continue;
        }
        last = Instant::now();
        match &request {
            b"S" => {
                let _ = s.write_all(&secrets.0);
            }
            b"Q" => {
                let _ = s.write_all(b"K");
                break;
            }
            _ => {}
        }
    }
    // Our socket only: once ours is closed, nobody answers on it (unless a newer agent took
    // the path after ours was removed).
    drop(listener);
    if path.exists() && connect(dir).is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}
