//! `fastchat`: the client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use fastchat::client::cli::{self, GroupCmd, Options, RecvOptions};
use fastchat::client::text::one_line;

/// The fastchat client: sign up, send and receive end-to-end encrypted messages.
///
/// `fastchat login NAME` logs in once and keeps the session for later commands (no password,
/// no password hash: a command takes tens of milliseconds); `fastchat logout` ends it. Without
/// a kept session every command logs in on its own, with the password from FASTCHAT_PASSWORD
/// or asked for (without echo) on a terminal. Private keys live in FASTCHAT_HOME/USER/,
/// encrypted with the password.
///
/// Connections are TLS 1.3. The client checks the balancer's and the servers' certificates
/// against the cluster's certificate authority: the file given with --ca, or else the one the
/// balancer presented the first time, pinned in FASTCHAT_HOME/clusters/ (a later change is
/// refused loudly).
///
/// Flags may come before or after the command. With --json every command prints JSON, one
/// object per line (docs/CLI.md lists the fields).
///
/// Exit codes: 0 done (also when standard output is closed early, as by `| head`); 1 refused
/// or invalid (wrong password, unknown user, bad name, empty text, a quota); 2 bad arguments;
/// 3 balancer or server unreachable, no server available, the connection broke, or --timeout
/// passed; 4 local trouble (key files, disk).
#[derive(Parser)]
#[command(
    version,
    args_override_self = true,
    after_help = "Examples:
  FASTCHAT_PASSWORD=secret fastchat signup alice
  FASTCHAT_PASSWORD=secret fastchat login alice
  fastchat send bob 'hello bob'
  echo 'hello from a pipe' | fastchat send bob -
  fastchat -u bob recv --wait 5 --json
  fastchat logout"
)]
struct Args {
    /// Balancer address; ADDR,ADDR,... names several balancers of one cluster, tried in order
    /// until one answers.
    #[arg(
        short,
        long,
        env = "FASTCHAT_BALANCER",
        default_value = "127.0.0.1:7000",
        value_name = "ADDR[,ADDR...]",
        global = true,
        value_parser = fastchat::startup::remote_addresses
    )]
    balancer: String,
    /// Folder for key files, one sub-folder per user [default: ~/.fastchat].
    #[arg(long, env = "FASTCHAT_HOME", value_name = "DIR", global = true)]
    home: Option<PathBuf>,
    /// The user to act as [default: the one user logged in with `fastchat login`].
    #[arg(short, long, env = "FASTCHAT_USER", value_name = "NAME", global = true)]
    user: Option<String>,
    /// The cluster's CA certificate (ca.pem of `fastchat-admin init`) [default: the one pinned
    /// on first contact].
    #[arg(long, env = "FASTCHAT_CA", value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// No TLS: for a classroom cluster running with --insecure-plaintext on one trusted
    /// machine. A warning is printed every time.
    #[arg(
        long,
        env = "FASTCHAT_INSECURE_PLAINTEXT",
        global = true,
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    insecure_plaintext: bool,
    /// Files up to SIZE (bytes, or with K, M or G) are saved as they arrive; larger ones are
    /// offered, and saved with `fastchat get ID`.
    #[arg(
        long,
        env = "FASTCHAT_AUTO_DOWNLOAD",
        value_name = "SIZE",
        default_value = "16M",
        value_parser = fastchat::units::parse_size,
        global = true
    )]
    auto_download: u64,
    /// Print JSON, one object per line, instead of text (fields: docs/CLI.md).
    #[arg(short, long, global = true)]
    json: bool,
    /// Do not tell senders that their messages were delivered and read (receipts).
    #[arg(long, env = "FASTCHAT_NO_RECEIPTS", global = true,
          value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    no_receipts: bool,
    /// Give up after SECS seconds (exit 3), whatever the command is waiting for.
    #[arg(short, long, value_name = "SECS", global = true)]
    timeout: Option<f64>,
    /// Log level on standard error: off, error, warn, info, debug, trace [default: warn, or
    /// RUST_LOG].
    #[arg(long, value_name = "LEVEL", global = true)]
    log_level: Option<String>,
    /// A configuration file of defaults for these flags (docs/CLI.md) [default:
    /// FASTCHAT_CONFIG, else FASTCHAT_HOME/fastchat.toml if it exists].
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account NAME: makes key pairs, uploads the public keys, saves the private ones.
    ///
    /// The password (FASTCHAT_PASSWORD, or asked for twice) must have 8 characters at least:
    /// it also encrypts the private keys saved in FASTCHAT_HOME/NAME.
    Signup {
        /// Letters, digits, '_', '.', '-'; 1 to 32 characters (unique regardless of case).
        name: String,
        /// An account that exists already is fine (exit 0): for scripts that run again. Keys
        /// already in FASTCHAT_HOME/NAME are uploaded if the account is missing.
        #[arg(long)]
        exist_ok: bool,
    },
    /// Log in once and keep the session for later commands, which then need no password (the
    /// unlocked keys stay in a small agent process until `fastchat logout`, or --idle passes
    /// without a command).
    Login {
        /// Who to log in as [default: --user].
        name: Option<String>,
        /// End the kept session after this many seconds without a command.
        #[arg(long, value_name = "SECS", default_value_t = 8 * 3600)]
        idle: u64,
    },
    /// End the kept session (its token is refused from then on, everywhere).
    Logout,
    /// The last lines of a conversation from the local history (kept on this machine,
    /// encrypted with your keys): WITH is a user, or a group as OWNER/NAME.
    History {
        /// The other user, or the group.
        with: String,
        /// How many lines, at most.
        #[arg(short = 'n', long, value_name = "N", default_value_t = 50)]
        limit: usize,
    },
    /// After an operator reset your password (`fastchat-admin users reset-password`), make
    /// new keys and upload them with the new password. The old key file is kept as
    /// identity.key.old; contacts see your new fingerprint and must `fastchat trust` you.
    /// Each of your groups gets a key change (signed with the new keys, naming the old one),
    /// so members who join later can still check your earlier changes, and a new group key
    /// made with your new keys.
    Rekey,
    /// Send TEXT to user TO; prints the stored message id once the server has committed it.
    Send {
        /// Recipient.
        to: String,
        /// The message (quote it), or - to read it from standard input.
        text: String,
        /// With -: send each non-empty input line as a message of its own.
        #[arg(long)]
        lines: bool,
    },
    /// Send the file (or image) at PATH to user TO, end-to-end encrypted, in chunks.
    SendFile {
        /// Recipient.
        to: String,
        /// The file; its last path component is the name the recipient sees.
        path: PathBuf,
    },
    /// Print queued messages as "FROM: TEXT" lines, oldest first, and acknowledge them. Files
    /// are saved in FASTCHAT_HOME/USER/downloads/ and shown as "FROM sent NAME (SIZE) -> PATH".
    Recv {
        /// After the queue is empty, keep printing live messages for this many seconds.
        #[arg(short, long, value_name = "SECS", default_value_t = 0.0)]
        wait: f64,
        /// Show without acknowledging: the messages stay queued.
        #[arg(short, long)]
        peek: bool,
        /// Stop after N messages.
        #[arg(short = 'n', long, value_name = "N")]
        limit: Option<u64>,
    },
    /// Interactive chat: /query USER or /join GROUP, then type; /msg, /file, /history, /list,
    /// /group ..., /help; /quit or Ctrl-D (Ctrl-C clears the line).
    Chat {
        /// The conversation to start in: a user, or a group (OWNER/NAME, or NAME).
        with: Option<String>,
        /// No time before each line.
        #[arg(long)]
        no_time: bool,
    },
    /// List the live chat servers with their load.
    Servers,
    /// Print the user, the server assigned, and whether the session is kept.
    Whoami,
    /// Accept USER's current public keys after they changed (replaces the pinned keys).
    Trust {
        /// Whose keys to trust.
        #[arg(value_name = "USER")]
        peer: String,
    },
    /// Groups: create, add, remove, leave, send, list, members, key-change.
    #[command(subcommand)]
    Group(GroupArgs),
    /// Save the file offered by message ID (one larger than --auto-download, which `recv`
    /// offers instead of saving), and take it from the queue.
    Get {
        /// The message id the offer shows.
        id: i64,
    },
    /// The session agent that `login` starts (not for direct use).
    #[command(name = "__agent", hide = true)]
    Agent {
        /// The user's folder.
        dir: PathBuf,
        /// Seconds without a request before it ends.
        idle: u64,
    },
}

/// Group commands. The creator of a group is its admin: only the admin adds and removes
/// members; anyone may leave (if the admin leaves, the longest-standing member takes over).
/// Group messages are end-to-end encrypted with a group key that changes whenever someone
/// leaves or is removed.
#[derive(Subcommand)]
enum GroupArgs {
    /// Create GROUP with you as its admin and only member.
    Create {
        /// Group name: letters, digits, '_', '.', '-'; 1 to 32 characters.
        group: String,
    },
    /// (Admin) add USER (or several: USER USER...) to GROUP, one change each, in the order
    /// given. Names already in GROUP or unknown are refused before anyone is added.
    Add {
        /// The group.
        group: String,
        /// Who to add.
        #[arg(value_name = "USER", required = true)]
        members: Vec<String>,
    },
    /// (Admin) remove USER from GROUP; a new group key is made that USER never gets.
    Remove {
        /// The group.
        group: String,
        /// Who to remove.
        #[arg(value_name = "USER")]
        member: String,
    },
    /// Leave GROUP.
    Leave {
        /// The group.
        group: String,
    },
    /// Send TEXT to every other member of GROUP; prints the stored message id.
    Send {
        /// The group.
        group: String,
        /// The message (quote it).
        text: String,
    },
    /// Send the file (or image) at PATH to every other member of GROUP.
    SendFile {
        /// The group.
        group: String,
        /// The file.
        path: PathBuf,
    },
    /// List your groups with their size and admin.
    List,
    /// List the members of GROUP, longest-standing first.
    Members {
        /// The group.
        group: String,
    },
    /// Add your key change to GROUP, where `fastchat rekey` could not (it says which): members
    /// who join later can then check your earlier changes, and GROUP gets a key made with
    /// your new keys.
    KeyChange {
        /// The group.
        group: String,
    },
}

impl From<GroupArgs> for GroupCmd {
    fn from(args: GroupArgs) -> GroupCmd {
        match args {
            GroupArgs::Create { group } => GroupCmd::Create(group),
            GroupArgs::Add { group, members } => GroupCmd::Add(group, members),
            GroupArgs::Remove { group, member } => GroupCmd::Remove(group, member),
            GroupArgs::Leave { group } => GroupCmd::Leave(group),
            GroupArgs::Send { group, text } => GroupCmd::Send(group, text),
            GroupArgs::SendFile { group, path } => GroupCmd::SendFile(group, path),
            GroupArgs::List => GroupCmd::List,
            GroupArgs::Members { group } => GroupCmd::Members(group),
            GroupArgs::KeyChange { group } => GroupCmd::KeyChange(group),
        }
    }
}

fn main() -> ExitCode {
    let argv = match fastchat::config::with_file_defaults(
        &Args::command(),
        "fastchat",
        std::env::args_os(),
    ) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("fastchat: error: {e}");
            return ExitCode::from(2);
        }
    };
    let args = Args::parse_from(argv);
    if let Command::Agent { dir, idle } = &args.command {
        return match fastchat::client::agent::serve(dir, Duration::from_secs(*idle)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    fastchat::startup::init_with("fastchat", args.log_level.as_deref(), "warn");
    if let Some(secs) = args.timeout {
        match Duration::try_from_secs_f64(secs) {
            Ok(limit) if !limit.is_zero() => fastchat::startup::exit_after(limit, "fastchat", 3),
            _ => {
                eprintln!("fastchat: error: --timeout must be a positive number of seconds");
                return ExitCode::from(2);
            }
        }
    }
    let home = args.home.unwrap_or_else(fastchat::startup::default_home);
    let transport = match fastchat::startup::client_transport(
        "fastchat",
        &home,
        &args.balancer,
        args.ca.as_ref(),
        args.insecure_plaintext,
    ) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let user = match &args.command {
        Command::Login {
            name: Some(name), ..
        } => Some(name.clone()),
        _ => args.user,
    };
    let opts = Options {
        transport,
        balancer: args.balancer,
        home,
        user,
        password: std::env::var("FASTCHAT_PASSWORD").ok(),
        // SIGINT and SIGTERM end `chat` and `recv` cleanly (in `chat` on a terminal, the
        // Ctrl-C key only clears the line); other commands keep the default (the process stops
        // at once, and what was not confirmed was not done).
        interrupt: match &args.command {
            Command::Chat { .. } | Command::Recv { .. } => fastchat::startup::shutdown_channel(),
            _ => crossbeam_channel::never(),
        },
        auto_download: args.auto_download,
        kept_user: Default::default(),
        receipts: !args.no_receipts,
        json: args.json,
    };
    let result = match args.command {
        Command::Signup { name, exist_ok } => cli::signup(&opts, &name, exist_ok),
        Command::Login { idle, .. } => {
            if idle == 0 {
                eprintln!("fastchat: error: --idle must be at least 1 second");
                return ExitCode::from(2);
            }
            cli::keep_login(&opts, Duration::from_secs(idle))
        }
        Command::Logout => cli::logout(&opts),
        Command::Rekey => cli::rekey(&opts),
        Command::History { with, limit } => cli::history(&opts, &with, limit),
        Command::Send { to, text, lines } => cli::send(&opts, &to, &text, lines),
        Command::SendFile { to, path } => cli::send_file(&opts, &to, &path),
        Command::Recv { wait, peek, limit } => {
            if !(0.0..=86_400.0).contains(&wait) {
                eprintln!("fastchat: error: --wait must be between 0 and 86400 seconds");
                return ExitCode::from(2);
            }
            let how = RecvOptions {
                wait: Duration::from_secs_f64(wait),
                peek,
                limit,
            };
            cli::recv(&opts, how)
        }
        Command::Chat { with, no_time } => fastchat::client::chat::chat(
            &opts,
            &fastchat::client::chat::ChatOptions {
                time: !no_time,
                with,
            },
        ),
        Command::Servers => cli::servers(&opts),
        Command::Whoami => cli::whoami(&opts),
        Command::Trust { peer } => cli::trust(&opts, &peer),
        Command::Group(args) => cli::group(&opts, &args.into()),
        Command::Get { id } => cli::get(&opts, id),
        Command::Agent { .. } => unreachable!("served above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Says what went wrong, on one line (nothing when standard output was closed: the reader
/// had enough), and exits with its code.
fn fail(e: &fastchat::Error) -> ExitCode {
    if !matches!(e, fastchat::Error::OutputClosed) {
        eprintln!("fastchat: error: {}", one_line(&e.to_string()));
    }
    ExitCode::from(e.exit_code() as u8)
}
