//! What the `fastchat` command does: one function per subcommand.
//!
//! Output contract (scripts rely on it): `recv` prints one line per message, `FROM: TEXT`, in
//! the order sent (control characters in TEXT are escaped, so a message is always one line), or
//! with `--json` one JSON object per line. Errors go to standard error as one line.
//!
//! By concern: `account` (signup, new keys, trust), `login` (a command's login, kept
//! sessions, whoami, servers), `send` (messages, files, the local history), `recv`
//! (receiving, showing, `get`) and `group`; [`Options`], which every one takes, is here.

mod account;
mod group;
mod login;
mod recv;
mod send;

pub use account::{rekey, signup, trust};
pub use group::{group, GroupCmd};
pub use login::{keep_login, logout, servers, whoami, DEFAULT_IDLE};
pub use recv::{get, message_line, recv, Format, RecvOptions};
pub use send::{announce, history, send, send_file, Announced};

pub(in crate::client) use group::resolve_group;
pub(in crate::client) use login::{login, Downloads, LoggedIn};
pub(in crate::client) use recv::{show, take_offer, Shown, Waiting};
pub(in crate::client) use send::history_line;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;

use crossbeam_channel::Receiver;

use crate::error::{Error, Result};
use crate::names;
use crate::transport::Transport;

/// Settings every subcommand shares.
#[derive(Debug, Clone)]
pub struct Options {
    /// Balancer address.
    pub balancer: String,
    /// How to reach the cluster: TLS with its CA (given, or pinned on first use), or
    /// plaintext.
    pub transport: Transport,
    /// Folder holding one sub-folder of keys per user.
    pub home: PathBuf,
    /// The acting user, for commands that need one.
    pub user: Option<String>,
    /// The password, if given in the environment (else prompted).
    pub password: Option<String>,
    /// Signalled on Ctrl-C: the long-running commands (`chat`, `recv --wait`) then end
    /// cleanly, with what was shown acknowledged, and exit 0.
    pub interrupt: Receiver<()>,
    /// Files up to this size are saved when they arrive; larger ones are offered, and saved
    /// by `fastchat get ID` (or `/get ID`).
    pub auto_download: u64,
    /// The user found by its kept session when no `--user` was given.
    pub kept_user: std::sync::OnceLock<String>,
    /// Print one JSON object per result (per message, for `recv`) instead of text.
    pub json: bool,
    /// Send receipts (delivered, read) to the senders of the messages shown.
    pub receipts: bool,
}

impl Options {
    /// The acting user: `--user`, else the one user with a kept session.
    fn user(&self) -> Result<&str> {
        let user = match self.user.as_deref() {
            Some(u) => u,
            None => {
                let kept = super::keystore::kept_users(&self.home);
                match &kept[..] {
                    [one] => return self.user_kept(one.clone()),
                    [] => {
                        return Err(Error::Invalid(
                            "no user given: pass --user NAME, set FASTCHAT_USER, or run \
                             `fastchat login NAME` first"
                                .into(),
                        ))
                    }
                    several => {
                        return Err(Error::Invalid(format!(
                            "several users are logged in here ({}); say which with --user",
                            several.join(", ")
                        )))
                    }
                }
            }
        };
        names::validate("user", user)?;
        Ok(user)
    }

    /// Prints a command's result: `text` for people, or `json` as one line.
    pub fn print(&self, text: &str, json: serde_json::Value) -> Result<()> {
        let mut out = io::stdout().lock();
        let written = if self.json {
            writeln!(out, "{json}")
        } else {
            writeln!(out, "{text}")
        };
        written.and_then(|()| out.flush()).map_err(output_error)
    }

    /// The one logged-in user, kept for the rest of the command.
    fn user_kept(&self, user: String) -> Result<&str> {
        names::validate("user", &user)?;
        Ok(self.kept_user.get_or_init(|| user).as_str())
    }

    fn password(&self, prompt: &str) -> Result<String> {
        if let Some(p) = &self.password {
            return Ok(p.clone());
        }
        if !io::stdin().is_terminal() {
            return Err(Error::Invalid(
                "no password: set FASTCHAT_PASSWORD or run in a terminal to be asked".into(),
            ));
        }
        rpassword::prompt_password(prompt).map_err(Error::Io)
    }
}

/// A failed write to standard output: closed by the reader ([`Error::OutputClosed`]: the
/// command ends quietly), or another error.
pub fn output_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Error::OutputClosed
    } else {
        Error::Io(e)
    }
}
