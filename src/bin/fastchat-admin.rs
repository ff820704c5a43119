//! `fastchat-admin`: the operator's tool.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fastchat::admin::{self, Admin};
use fastchat::client::cli::{self, Options};
use fastchat::crypto::{ScryptCost, DEFAULT_SCRYPT_LOG_N};
use fastchat::transport::pki::{self, Member, Role};
use serde_json::json;

/// Operator's tool for a fastchat cluster: its certificates, and its accounts, queues and
/// sessions.
///
/// `init` creates the cluster's certificate authority and a certificate for the balancer and
/// each chat server; every link of the cluster is TLS with these, so only processes holding a
/// certificate of this CA can register as servers, link to each other, or be handed clients.
/// Keep ca.key off the servers once every certificate is made.
///
/// The other commands work on the cluster's database (--db, the file the balancer uses),
/// while the cluster runs or not. Accounts an operator makes have no keys until their owner
/// claims them with `fastchat signup NAME` and the password handed out; after a password
/// reset the owner runs `fastchat rekey`. No command can read a message: the database holds
/// ciphertext only.
///
/// Exit codes: 0 done; 1 refused or invalid (no such user, a name taken, a bad roster line);
/// 2 bad arguments; 3 the cluster is unreachable (announce); 4 local trouble (the database,
/// a folder).
#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    after_help = "Examples:
  fastchat-admin init /tmp/fc/tls                  # CA, balancer, server-1..server-3
  fastchat-admin cert /tmp/fc/tls --server server-6
  fastchat-admin fingerprint /tmp/fc/tls/ca.pem    # what clients pin on first contact
  fastchat-admin --db /tmp/fc/chat.db users bulk class.txt   # lines: NAME [PASSWORD]
  fastchat-admin --db /tmp/fc/chat.db users list --json
  fastchat-admin --db /tmp/fc/chat.db users reset-password alice
  fastchat-admin --db /tmp/fc/chat.db online
  fastchat-admin --db /tmp/fc/chat.db queues
  fastchat-admin --db /tmp/fc/chat.db kick mallory
  FASTCHAT_PASSWORD=... fastchat-admin --db /tmp/fc/chat.db announce --as teacher 'Exam at 10'
  fastchat-admin --db /tmp/fc/chat.db export alice > alice.jsonl
  fastchat-admin --db /tmp/fc/chat.db wipe class.txt --yes"
)]
struct Args {
    /// The cluster's database (the balancer's --db).
    #[arg(long, env = "FASTCHAT_DB", value_name = "PATH|URL", global = true)]
    db: Option<fastchat::db::Location>,
    /// Print JSON, one object per line, instead of text (fields: docs/CLI.md).
    #[arg(short, long, global = true)]
    json: bool,
    /// scrypt cost of the passwords set here, as log2 N; like the balancer's flag.
    #[arg(long, value_name = "LOG_N", default_value_t = DEFAULT_SCRYPT_LOG_N, global = true)]
    scrypt_log_n: u8,
    /// Log level on standard error: off, error, warn, info, debug, trace [default: warn].
    #[arg(long, value_name = "LEVEL", global = true)]
    log_level: Option<String>,
    /// A configuration file of defaults for these flags, table [admin] [default:
    /// FASTCHAT_CONFIG, else FASTCHAT_HOME/fastchat.toml if it exists].
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a cluster CA in DIR (0700, files 0600) with certificates for the balancer and
    /// N chat servers (server-1 ... server-N).
    Init {
        /// The folder to create.
        dir: PathBuf,
        /// How many chat server certificates to make.
        #[arg(long, value_name = "N", default_value_t = 3)]
        servers: usize,
    },
    /// Issue one more certificate with the CA in DIR.
    Cert {
        /// The cluster folder (with ca.pem and ca.key).
        dir: PathBuf,
        /// A chat server's certificate, with this name.
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "balancer",
            required_unless_present = "balancer"
        )]
        server: Option<String>,
        /// A balancer's certificate, with this name.
        #[arg(long, value_name = "NAME")]
        balancer: Option<String>,
    },
    /// Print the SHA-256 fingerprint of a certificate (what a client pins).
    Fingerprint {
        /// A PEM certificate, such as DIR/ca.pem.
        file: PathBuf,
    },
    /// Accounts: list, add, bulk, reset-password, delete.
    #[command(subcommand)]
    Users(Users),
    /// Who is connected, to which server.
    Online,
    /// How many direct messages wait for each user, deepest first.
    Queues,
    /// Delete every message waiting for NAME (direct ones; group ones are skipped).
    Purge {
        /// The user.
        name: String,
    },
    /// End every session of NAME: their connections close within seconds and they must log
    /// in again (with a password reset first, to keep them out).
    Kick {
        /// The user.
        name: String,
    },
    /// Send TEXT to every user with keys, end-to-end encrypted, as the user given with --as
    /// (a teacher's account: its password from FASTCHAT_PASSWORD or asked, its keys in
    /// --home, or its kept session).
    Announce {
        /// The sending user.
        #[arg(long = "as", value_name = "USER")]
        sender: String,
        /// The text.
        text: String,
        /// Balancer address.
        #[arg(
            short,
            long,
            env = "FASTCHAT_BALANCER",
            default_value = "127.0.0.1:7000",
            value_name = "ADDR",
            value_parser = fastchat::startup::remote_addresses
        )]
        balancer: String,
        /// The sender's key folder, as for `fastchat` [default: ~/.fastchat].
        #[arg(long, env = "FASTCHAT_HOME", value_name = "DIR")]
        home: Option<PathBuf>,
        /// The cluster's CA certificate [default: the one pinned on first contact].
        #[arg(long, env = "FASTCHAT_CA", value_name = "FILE")]
        ca: Option<PathBuf>,
        /// No TLS (a cluster run with --insecure-plaintext).
        #[arg(long, env = "FASTCHAT_INSECURE_PLAINTEXT",
              value_parser = clap::builder::BoolishValueParser::new(),
              action = clap::ArgAction::SetTrue)]
        insecure_plaintext: bool,
    },
    /// Print what the servers hold about NAME (or everyone) as JSON lines: metadata and the
    /// encrypted bodies in hex, oldest first. Nothing is decrypted; the servers cannot.
    Export {
        /// Messages to or from this user, and of their groups [default: all].
        name: Option<String>,
    },
    /// Delete the accounts listed in ROSTER (as for `users bulk`), or with --all every
    /// account, with their messages, files and groups.
    Wipe {
        /// The class's roster file.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        roster: Option<PathBuf>,
        /// Every account.
        #[arg(long)]
        all: bool,
        /// Really: without it nothing is deleted.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum Users {
    /// Every account: since when, keys (yes, unclaimed, reset), queue, connections, groups.
    List,
    /// Make one account; its owner claims it with `fastchat signup NAME` and the password.
    Add {
        /// The name.
        name: String,
        /// Its password, 8 characters at least [default: generated and printed once].
        #[arg(long, env = "FASTCHAT_NEW_PASSWORD", value_name = "PASSWORD")]
        password: Option<String>,
    },
    /// Make the accounts of a roster: one per line, NAME or NAME PASSWORD ('#' comments;
    /// passwords of 8 characters at least); passwords not given are generated and printed
    /// once. Names that exist are left alone,
    /// so the roster may be run again.
    Bulk {
        /// The roster file, or - for standard input.
        file: PathBuf,
    },
    /// Set a new password (generated and printed once, unless given); ends the user's
    /// sessions and lets them upload new keys once (`fastchat rekey`).
    ResetPassword {
        /// The user.
        name: String,
        /// The new password, 8 characters at least [default: generated and printed once].
        #[arg(long, env = "FASTCHAT_NEW_PASSWORD", value_name = "PASSWORD")]
        password: Option<String>,
    },
    /// Delete accounts, with their sessions, queues, files and the groups they own.
    Delete {
        /// The users.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args: Args = fastchat::config::parse("fastchat-admin", "admin");
    fastchat::startup::init_with("fastchat-admin", args.log_level.as_deref(), "warn");
    fastchat::startup::private_files();
    let result = match args.command {
        Command::Init { dir, servers } => init(&dir, servers),
        Command::Cert {
            dir,
            server,
            balancer,
        } => {
            let member = match (server, balancer) {
                (Some(name), _) => Member {
                    role: Role::Server,
                    name,
                },
                (None, Some(name)) => Member {
                    role: Role::Balancer,
                    name,
                },
                (None, None) => unreachable!("clap requires one"),
            };
            pki::issue(&dir, &member).map(|pem| {
                println!("made {} certificate {}", member.role, pem.display());
            })
        }
        Command::Fingerprint { file } => pki::load_cert(&file)
            .and_then(|c| pki::fingerprint(&c))
            .map(|f| println!("{f}")),
        Command::Wipe { yes: false, .. } => {
            eprintln!("fastchat-admin: error: wipe deletes accounts for good: add --yes");
            return ExitCode::from(2);
        }
        command => {
            let Some(db) = args.db else {
                eprintln!(
                    "fastchat-admin: error: this command works on the cluster's database: give \
                     --db PATH|URL (or FASTCHAT_DB), the balancer's --db"
                );
                return ExitCode::from(2);
            };
            let cost = match ScryptCost::with_log_n(args.scrypt_log_n) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fastchat-admin: error: --scrypt-log-n: {e}");
                    return ExitCode::from(2);
                }
            };
            Admin::open(&db, args.json, cost).and_then(|admin| on_db(&admin, command, args.json))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fastchat::Error::OutputClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fastchat-admin: error: {e}");
            ExitCode::from(match e {
                fastchat::Error::Invalid(_) | fastchat::Error::InvalidName(_) => 1,
                e => e.exit_code() as u8,
            })
        }
    }
}

/// The commands that work on the database.
fn on_db(admin: &Admin, command: Command, json: bool) -> fastchat::Result<()> {
    match command {
        Command::Users(Users::List) => admin.list(),
        Command::Users(Users::Add { name, password }) => admin.add(&[(name, password)]),
        Command::Users(Users::Bulk { file }) => admin.add(&admin::parse_roster(&read(&file)?)?),
        Command::Users(Users::ResetPassword { name, password }) => {
            admin.reset_password(&name, password)
        }
        Command::Users(Users::Delete { names }) => admin.delete(&names),
        Command::Online => admin.online(),
        Command::Queues => admin.queues(),
        Command::Purge { name } => admin.purge(&name),
        Command::Kick { name } => admin.kick(&name),
        Command::Export { name } => admin.export(name.as_deref()),
        Command::Wipe { roster, .. } => match roster {
            Some(file) => admin.wipe(Some(&admin::parse_roster(&read(&file)?)?)),
            None => admin.wipe(None),
        },
        Command::Announce {
            sender,
            text,
            balancer,
            home,
            ca,
            insecure_plaintext,
        } => {
            let recipients = admin.recipients(&sender)?;
            let home = home.unwrap_or_else(fastchat::startup::default_home);
            let transport = fastchat::startup::client_transport(
                "fastchat-admin",
                &home,
                &balancer,
                ca.as_ref(),
                insecure_plaintext,
            )?;
            let opts = Options {
                transport,
                balancer,
                home,
                user: Some(sender.clone()),
                password: std::env::var("FASTCHAT_PASSWORD").ok(),
                interrupt: crossbeam_channel::never(),
                auto_download: 0,
                kept_user: Default::default(),
                json,
                receipts: false,
            };
            let done = cli::announce(&opts, &recipients, &text)?;
            let mut failed = 0;
            for (to, sent) in &done {
                let (line, value) = match sent {
                    Ok(id) => (format!("sent {id} to {to}"), json!({ "to": to, "id": id })),
                    Err(e) => {
                        failed += 1;
                        (
                            format!("not sent to {to}: {e}"),
                            json!({ "to": to, "error": e.to_string() }),
                        )
                    }
                };
                opts.print(&line, value)?;
            }
            let missed = recipients.len() - done.len();
            match (failed, missed) {
                (0, 0) => Ok(()),
                _ => Err(fastchat::Error::Invalid(format!(
                    "the announcement reached {} of {} users",
                    done.len() - failed,
                    recipients.len()
                ))),
            }
        }
        Command::Init { .. } | Command::Cert { .. } | Command::Fingerprint { .. } => {
            unreachable!("served without the database")
        }
    }
}

/// A file's text, or standard input's for `-`.
fn read(path: &Path) -> fastchat::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| fastchat::Error::Invalid(format!("cannot read {}: {e}", path.display())))
}

fn init(dir: &std::path::Path, servers: usize) -> fastchat::Result<()> {
    if servers > 1000 {
        return Err(fastchat::Error::Invalid(
            "--servers: at most 1000 at once".into(),
        ));
    }
    let mut members = vec![Member {
        role: Role::Balancer,
        name: "balancer".into(),
    }];
    members.extend((1..=servers).map(|i| Member {
        role: Role::Server,
        name: format!("server-{i}"),
    }));
    pki::init(dir, &members)?;
    let ca = pki::load_cert(&pki::ca_path(dir))?;
    println!("cluster CA {} in {}", pki::fingerprint(&ca)?, dir.display());
    println!("  balancer: --tls-dir {}", dir.display());
    for i in 1..=servers {
        println!(
            "  server-{i}: --tls-dir {} --name server-{i}",
            dir.display()
        );
    }
    println!(
        "  clients: --ca {} (or trust on first contact)",
        pki::ca_path(dir).display()
    );
    Ok(())
}
