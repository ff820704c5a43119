//! The configuration file, `fastchat.toml`: defaults for the flags of every binary, one table
//! per binary, keys named as the long flags (`max-clients` or `max_clients`):
//!
//! ```toml
//! [fastchat]                 # the client
//! balancer = "10.0.0.5:7000"
//! user = "alice"
//!
//! [server]                   # fastchat-server
//! db = "/var/lib/fastchat/chat.db"
//! max-clients = 5000
//!
//! [balancer]                 # fastchat-balancer; also [bench] and [admin]
//! token-ttl = 3600
//! ```
//!
//! Found with `--config FILE`, else `FASTCHAT_CONFIG`, else `FASTCHAT_HOME/fastchat.toml` (or
//! `~/.fastchat/fastchat.toml`) if it exists. Precedence: a flag given on the command line,
//! then its environment variable, then the file, then the built-in default. A file value is
//! handed to the binary's own argument parser as if it were a flag, so it is checked exactly
//! as one; a key that is no flag of that binary is an error naming the flags there are.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A binary's arguments: its command line over its table of the configuration file. A
/// configuration that cannot be used ends the process with exit code 2, saying why.
pub fn parse<A: clap::Parser>(program: &str, section: &str) -> A {
    match with_file_defaults(&A::command(), section, std::env::args_os()) {
        Ok(argv) => A::parse_from(argv),
        Err(e) => {
            eprintln!("{program}: error: {e}");
            std::process::exit(2)
        }
    }
}

/// The arguments to parse: `args` with the flags of `cmd`'s table in the configuration file
/// put before the command line's own (which therefore win). `section` names the table.
pub fn with_file_defaults(
    cmd: &clap::Command,
    section: &str,
    args: impl IntoIterator<Item = OsString>,
) -> Result<Vec<OsString>> {
    let args: Vec<OsString> = args.into_iter().collect();
    let Some(path) = find(&args) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let defaults = flags_from(cmd, section, &text, &path)?;
    let mut all = Vec::with_capacity(args.len() + defaults.len());
    let mut rest = args.into_iter();
    all.extend(rest.next());
    all.extend(defaults);
    all.extend(rest);
    Ok(all)
}

/// The file to read: `--config FILE` (or `--config=FILE`) among `args`, `FASTCHAT_CONFIG`,
/// or `fastchat.toml` in the fastchat home if it exists.
fn find(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    if let Some(p) = std::env::var_os("FASTCHAT_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("FASTCHAT_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".fastchat")))?;
    let path = home.join("fastchat.toml");
    path.is_file().then_some(path)
}

/// The flags that `section` of the file `text` sets for `cmd`, skipping those whose
/// environment variable is set (the environment wins over the file).
fn flags_from(
    cmd: &clap::Command,
    section: &str,
    text: &str,
    path: &Path,
) -> Result<Vec<OsString>> {
    let shown = path.display();
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::Invalid(format!("{shown}: {}", e.message())))?;
    let tables = || SECTIONS.map(|s| format!("[{s}]")).join(", ");
    for (key, value) in &doc {
        if !value.is_table() {
            // A setting above every table (`balancer = ...` read as the table of that name).
            return Err(Error::Invalid(format!(
                "{shown}: {key} is set outside a table: put each setting under the table of \
                 the program it is for, e.g. [fastchat] for the client (the tables are {})",
                tables()
            )));
        }
        if !SECTIONS.contains(&key.as_str()) {
            return Err(Error::Invalid(format!(
                "{shown}: unknown table [{key}]; the tables are {}",
                tables()
            )));
        }
    }
    let Some(table) = doc.get(section).and_then(toml::Value::as_table) else {
        return Ok(Vec::new());
    };
    let mut flags = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| {
                let known: Vec<&str> = cmd
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| !matches!(*l, "config" | "help" | "version"))
                    .collect();
                Error::Invalid(format!(
                    "{shown}: [{section}] has no setting {key}; the settings are {}",
                    known.join(", ")
                ))
            })?;
        if arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some())
        {
            continue;
        }
        let flag = format!("--{long}");
        match value {
            toml::Value::Boolean(true) => flags.push(OsString::from(flag)),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => flags.push(OsString::from(format!("{flag}={s}"))),
            toml::Value::Integer(n) => flags.push(OsString::from(format!("{flag}={n}"))),
            toml::Value::Float(x) => flags.push(OsString::from(format!("{flag}={x}"))),
            other => {
                return Err(Error::Invalid(format!(
                    "{shown}: [{section}] {key} must be a string, a number or true/false, not {}",
                    other.type_str()
                )))
            }
        }
    }
    Ok(flags)
}

/// The tables a configuration file may have, one per binary.
const SECTIONS: [&str; 5] = ["fastchat", "server", "balancer", "bench", "admin"];

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("t")
            .args_override_self(true)
            .arg(Arg::new("db").long("db"))
            .arg(Arg::new("max_clients").long("max-clients"))
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
    }

    fn flags(text: &str) -> Result<Vec<String>> {
        Ok(flags_from(&cmd(), "server", text, Path::new("f.toml"))?
            .into_iter()
            .map(|f| f.into_string().unwrap())
            .collect())
    }

    #[test]
    fn a_table_becomes_flags_and_the_command_line_wins() -> Result<()> {
        let text = "[server]\ndb = \"/x/chat.db\"\nmax_clients = 5\nquiet = true\n[fastchat]\nuser = \"a\"\n";
        assert_eq!(
            flags(text)?,
            ["--db=/x/chat.db", "--max-clients=5", "--quiet"]
        );
        let mut args = vec!["t".to_string()];
        args.extend(flags(text)?);
        args.extend(["--max-clients".to_string(), "9".to_string()]);
        let m = cmd().try_get_matches_from(args).unwrap();
        assert_eq!(m.get_one::<String>("max_clients").unwrap(), "9");
        assert_eq!(m.get_one::<String>("db").unwrap(), "/x/chat.db");
        Ok(())
    }

    #[test]
    fn unknown_keys_tables_and_values_are_clear_errors() {
        let e = flags("[server]\nmax-clientz = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has no setting max-clientz; the settings are db, max-clients, quiet"),
            "{e}"
        );
        let e = flags("[sever]\n").unwrap_err().to_string();
        assert!(e.contains("unknown table [sever]"), "{e}");
        // A setting above the tables, even one named like a table, is not taken for one.
        for text in [
            "balancer = \"10.0.0.5:7000\"\n",
            "balancer = 5\n[server]\n",
            "db = \"x\"\n",
        ] {
            let e = flags(text).unwrap_err().to_string();
            assert!(e.contains("is set outside a table"), "{text}: {e}");
            assert!(e.contains("[fastchat]"), "{e}");
        }
        let e = flags("[server]\ndb = [1]\n").unwrap_err().to_string();
        assert!(
            e.contains("db must be a string, a number or true/false"),
            "{e}"
        );
        let e = flags("[server\n").unwrap_err().to_string();
        assert!(e.starts_with("f.toml: "), "{e}");
    }
}
