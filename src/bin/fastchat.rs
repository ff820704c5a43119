//! `fastchat`: the client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fastchat::client::cli::{self, Format, GroupCmd, Options};
use fastchat::client::text::one_line;

/// The fastchat client: sign up, send and receive end-to-end encrypted messages.
///
/// Every command logs in through the balancer, which assigns a chat server. The password comes
/// from FASTCHAT_PASSWORD, or is asked for (without echo) on a terminal. Private keys live in
/// FASTCHAT_HOME/USER/, encrypted with the password.
///
/// Connections are TLS 1.3. The client checks the balancer's and the servers' certificates
/// against the cluster's certificate authority: the file given with --ca, or else the one the
/// balancer presented the first time, pinned in FASTCHAT_HOME/clusters/ (a later change is
/// refused loudly).
///
/// Exit codes: 0 done, 1 refused or invalid (wrong password, unknown user, bad name, empty text),
/// 2 bad arguments, 3 balancer or server unreachable or the connection broke, 4 local trouble
/// (key files, disk).
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:
  FASTCHAT_PASSWORD=secret fastchat signup alice
  FASTCHAT_PASSWORD=secret fastchat --user alice send bob 'hello bob'
  FASTCHAT_PASSWORD=secret fastchat --user bob recv --wait 5"
)]
struct Args {
    /// Balancer address.
    #[arg(
        long,
        env = "FASTCHAT_BALANCER",
        default_value = "127.0.0.1:7000",
        value_name = "ADDR"
    )]
    balancer: String,
    /// Folder for key files, one sub-folder per user [default: ~/.fastchat].
    #[arg(long, env = "FASTCHAT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// The user to act as.
    #[arg(long, env = "FASTCHAT_USER", value_name = "NAME")]
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account NAME: makes key pairs, uploads the public keys, saves the private ones.
    Signup {
        /// Letters, digits, '_', '.', '-'; 1 to 32 characters.
        name: String,
    },
    /// Send TEXT to user TO; prints the stored message id once the server has committed it.
    Send {
        /// Recipient.
        to: String,
        /// The message (quote it).
        text: String,
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
        #[arg(long, value_name = "SECS", default_value_t = 0.0)]
        wait: f64,
        /// Print one JSON object per message instead.
        #[arg(long)]
        json: bool,
    },
    /// Interactive chat: /msg USER TEXT, /group ..., /help, /quit.
    Chat,
    /// List the live chat servers with their load.
    Servers,
    /// Log in and print the user and the server assigned.
    Whoami,
    /// Accept USER's current public keys after they changed (replaces the pinned keys).
    Trust {
        /// Whose keys to trust.
        user: String,
    },
    /// Groups: create, add, remove, leave, send, list, members.
    #[command(subcommand)]
    Group(GroupArgs),
    /// Save the file offered by message ID (one larger than --auto-download, which `recv`
    /// offers instead of saving), and take it from the queue.
    Get {
        /// The message id the offer shows.
        id: i64,
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
    /// (Admin) add USER to GROUP.
    Add {
        /// The group.
        group: String,
        /// Who to add.
        user: String,
    },
    /// (Admin) remove USER from GROUP; a new group key is made that USER never gets.
    Remove {
        /// The group.
        group: String,
        /// Who to remove.
        user: String,
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
}

impl From<GroupArgs> for GroupCmd {
    fn from(args: GroupArgs) -> GroupCmd {
        match args {
            GroupArgs::Create { group } => GroupCmd::Create(group),
            GroupArgs::Add { group, user } => GroupCmd::Add(group, user),
            GroupArgs::Remove { group, user } => GroupCmd::Remove(group, user),
            GroupArgs::Leave { group } => GroupCmd::Leave(group),
            GroupArgs::Send { group, text } => GroupCmd::Send(group, text),
            GroupArgs::SendFile { group, path } => GroupCmd::SendFile(group, path),
            GroupArgs::List => GroupCmd::List,
            GroupArgs::Members { group } => GroupCmd::Members(group),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let home = args.home.unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".fastchat")
    });
    let transport = match fastchat::startup::client_transport(
        "fastchat",
        &home,
        &args.balancer,
        args.ca.as_ref(),
        args.insecure_plaintext,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fastchat: error: {}", one_line(&e.to_string()));
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let opts = Options {
        transport,
        balancer: args.balancer,
        home,
        user: args.user,
        password: std::env::var("FASTCHAT_PASSWORD").ok(),
        // Ctrl-C ends `chat` and `recv --wait` cleanly; other commands keep the default (the
        // process stops at once, and what was not confirmed was not done).
        interrupt: match &args.command {
            Command::Chat | Command::Recv { .. } => fastchat::startup::shutdown_channel(),
            _ => crossbeam_channel::never(),
        },
        auto_download: args.auto_download,
    };
    let result = match args.command {
        Command::Signup { name } => cli::signup(&opts, &name),
        Command::Send { to, text } => cli::send(&opts, &to, &text),
        Command::SendFile { to, path } => cli::send_file(&opts, &to, &path),
        Command::Recv { wait, json } => {
            if !(0.0..=86_400.0).contains(&wait) {
                eprintln!("fastchat: error: --wait must be between 0 and 86400 seconds");
                return ExitCode::from(2);
            }
            let format = if json { Format::Json } else { Format::Lines };
            cli::recv(&opts, Duration::from_secs_f64(wait), format)
        }
        Command::Chat => fastchat::client::chat::chat(&opts),
        Command::Servers => cli::servers(&opts),
        Command::Whoami => cli::whoami(&opts),
        Command::Trust { user } => cli::trust(&opts, &user),
        Command::Group(args) => cli::group(&opts, &args.into()),
        Command::Get { id } => cli::get(&opts, id),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fastchat: error: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
