//! The `coordinator` command line's arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::demo::DemoArgs;
use crate::pki::LEAF_DAYS;
use crate::report::Format;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "The fedtune coordinator and the study lead's command line"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: shared::cli::LogArgs,
}

// Parsed once per run: boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator server.
    Serve {
        /// coordinator.toml (deploy/coordinator.toml documents every field).
        #[arg(long, env = "FEDTUNE_CONFIG")]
        config: PathBuf,
    },
    /// Check a coordinator's setup before serving: the configuration, the certificates and
    /// CRL, the data dir (free space, schema), the ports. One line per check; exit 1 if any
    /// fails.
    Doctor {
        /// coordinator.toml.
        #[arg(long, env = "FEDTUNE_CONFIG")]
        config: PathBuf,
    },
    /// Take a consistent backup of a running coordinator: its database and model blobs in
    /// one archive, with a manifest of sha256 hashes.
    #[command(after_help = "Example:\n  coordinator backup --out fedtune-2026-12-03.tar")]
    Backup {
        /// The archive to write (refused if it exists).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Rebuild a data dir from a backup: refuses a folder that holds anything, checks every
    /// file's hash and the schema version before writing.
    #[command(
        after_help = "Example:\n  coordinator restore fedtune-2026-12-03.tar --data-dir /var/lib/fedtune-coordinator"
    )]
    Restore {
        /// The archive `coordinator backup` wrote.
        archive: PathBuf,
        /// The data dir to create (data_dir of coordinator.toml).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Example:\n  coordinator completions bash > /etc/bash_completion.d/coordinator"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The consortium's certificate authority.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Weights models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Sites.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Studies: a base model and the sites enrolled.
    #[command(subcommand)]
    Study(StudyCommand),
    /// Rounds: one task per site of a study.
    #[command(subcommand)]
    Round(RoundCommand),
    /// A study's report: per organ and arm, Dice mean ± SD, median, n, paired p-values of
    /// Model_ST vs Model_S and vs Model_T, per site and pooled; training times; the sweeps.
    Report {
        /// The study's name.
        study: String,
        /// table (terminal), md, csv, json or html (with box plots and sweep plots).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The transfer study end to end on phantom data: a CA, a coordinator and site agents as
    /// processes on loopback with mutual TLS, the rounds, the report.
    Demo(DemoArgs),
    /// Per-site, per-organ scores of a round.
    Results {
        /// The round id `round start` printed (with --json: per-case scores by case index).
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a new CA and the coordinator's server bundle in DIR.
    Init {
        /// The PKI folder to create (the CA key stays here: keep it offline).
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IP addresses agents dial the coordinator by (repeatable).
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
    /// Issue a whole site bundle, key included (DIR/sites/NAME), for demos and tests; in
    /// production the site makes its key (`site-agent init`) and you `pki sign` its request.
    #[command(
        after_help = "Example:\n  coordinator pki issue-site hospital-a --dir pki   # -> pki/sites/hospital-a/"
    )]
    IssueSite {
        /// The site's name (lowercase letters, digits and '-'), as it will appear everywhere.
        name: String,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = LEAF_DAYS)]
        days: i64,
        /// Replace an existing bundle: its certificate is revoked first, so the old copy stops
        /// working.
        #[arg(long)]
        force: bool,
    },
    /// Issue a whole admin bundle, key included (DIR/admins/NAME); in production use
    /// `pki request` where the admin works and `pki sign --admin`.
    IssueAdmin {
        /// The study lead's name.
        name: String,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = LEAF_DAYS)]
        days: i64,
        /// Replace an existing bundle: its certificate is revoked first, so the old copy stops
        /// working.
        #[arg(long)]
        force: bool,
    },
    /// Sign a key's certificate signing request (from `site-agent init` or `pki request`):
    /// writes DIR/sites/NAME (or admins/NAME) with cert.pem and ca.pem, no key, to send back.
    #[command(
        after_help = "Examples:\n  coordinator pki sign hospital-a.csr --site hospital-a --dir pki\n  coordinator pki sign lead.csr --admin lead --dir pki"
    )]
    Sign {
        /// The request file (PEM).
        request: PathBuf,
        /// Sign it as this site's certificate; the request must name the same site.
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        site: Option<String>,
        /// Sign it as this admin's certificate; the request must name the same admin.
        #[arg(long)]
        admin: Option<String>,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = LEAF_DAYS)]
        days: i64,
        /// Replace a certificate already out under that name: it is revoked first.
        #[arg(long)]
        force: bool,
    },
    /// Make an admin's private key and signing request here (the key never leaves this
    /// folder); send the request to the CA operator for `pki sign --admin NAME`.
    Request {
        /// The admin's name.
        #[arg(long)]
        admin: String,
        /// Folder for key.pem and request.csr (created; refused if it holds a key already).
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a new server certificate and key into DIR/server: a running coordinator serves
    /// them to new connections without a restart.
    IssueServer {
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IP addresses agents dial the coordinator by (repeatable).
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
    /// Revoke a certificate: its serial number goes on DIR/crl.pem (an X.509 CRL signed by
    /// the CA), which the server re-reads.
    Revoke {
        /// The site's (or with --admin, the admin's) name.
        name: String,
        /// The PKI folder made by `pki init`.
        #[arg(long)]
        dir: PathBuf,
        /// Revoke an admin bundle instead of a site bundle.
        #[arg(long)]
        admin: bool,
    },
}

// How the study lead's commands reach the coordinator. (A plain comment: clap would give a
// doc comment here as the description of every subcommand that flattens this and has none.)
#[derive(Debug, Args)]
pub struct Conn {
    /// The coordinator's address.
    #[arg(long, env = "FEDTUNE_COORDINATOR", default_value = "https://127.0.0.1:7443")]
    pub coordinator: String,
    /// An admin bundle folder (cert.pem, key.pem, ca.pem) from `pki issue-admin`; or set
    /// FEDTUNE_ADMIN_BUNDLE once for every command.
    #[arg(long, env = "FEDTUNE_ADMIN_BUNDLE")]
    pub bundle: PathBuf,
    /// The name in the coordinator's certificate to expect.
    #[arg(long, env = "FEDTUNE_SERVER_NAME", default_value = "localhost")]
    pub server_name: String,
    /// Print the coordinator's answer as JSON (the protocol's JSON mapping) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload a weights file.
    Push {
        /// The weights (.safetensors written by `site-agent train` or `finetune`).
        file: PathBuf,
        /// The name studies refer to it by.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The models the coordinator holds: name, sha256, size, config and layers.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// The sites that said hello: state (approved, revoked, certificate revoked), when each
    /// last called, device, data and certificate.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Let a site receive tasks.
    Approve {
        /// The site's name (as in its certificate).
        name: String,
        /// Let a site revoked with `site revoke` in again (refused without it).
        #[arg(long)]
        reinstate: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Refuse a site's every call from now on.
    Revoke {
        /// The site's name (as in its certificate).
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Create a study: a base model and the sites enrolled.
    #[command(
        after_help = "Example:\n  coordinator study create npc --base model-s --sites hospital-a,hospital-b"
    )]
    Create {
        /// The study's name.
        name: String,
        /// The base model's name or sha256 (Model_S); leave it out when a transfer round's
        /// source site trains Model_S.
        #[arg(long, default_value = "")]
        base: String,
        /// Comma-separated site names.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The studies: base model and sites.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// Score the study's base model at every site.
    Evaluate,
    /// Fine-tune the last --trainable-layers K of the base model at every site, then score.
    Finetune,
    /// Train a --config model from scratch at every site, then score.
    Train,
    /// The published experiment at every target: Model_S, Model_T, Model_ST.
    Transfer,
    /// Model_S and Model_ST for each of --trainable-layers K1,K2,...
    Sweep,
    /// Model_S, then Model_T and Model_ST for each of --train-cases N1,N2,...
    CasesSweep,
    /// Federated fine-tuning of the last --trainable-layers K of the base model over --rounds
    /// steps of --local-epochs; only the tails travel; the result is Model_FT.
    Fedavg,
    /// Every model of the study (Model_S, each site's shared Model_ST, Model_FT) scored on
    /// every site's test split.
    CrossEval,
}

// Parsed once per run: boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RoundCommand {
    /// Start a round: one task per site of the study.
    #[command(
        after_help = "Examples:\n  coordinator round start npc --task finetune --trainable-layers 2 --epochs 5 --watch\n  \
        coordinator round start npc-oar --task transfer --source source-hospital --replicates 3 --watch\n  \
        coordinator round start npc-oar --task fedavg --trainable-layers 3 --rounds 5 --local-epochs 2 --sites target-a,target-b --watch\n  \
        coordinator round start npc-oar --task cross-eval --watch\n\
        Exit codes with --watch: 0 completed, 2 failed, 3 cancelled."
    )]
    Start {
        /// The study's name.
        study: String,
        /// What every site does.
        #[arg(long, value_enum)]
        task: TaskArg,
        /// Layers to fine-tune: required for finetune (one K); for Model_ST of transfer and
        /// cases-sweep, default the paper's share (10 of 103, rounded up); a list for sweep.
        #[arg(long, value_delimiter = ',')]
        trainable_layers: Vec<u32>,
        /// cases-sweep: training-set sizes (the first N cases of each target's training split).
        #[arg(long, value_delimiter = ',')]
        train_cases: Vec<u32>,
        /// Transfer templates: the study site that trains Model_S and uploads it (its policy
        /// must share weights); without it, the study's base model is Model_S.
        #[arg(long)]
        source: Option<String>,
        /// Epochs of Model_S at the source site.
        #[arg(long)]
        source_epochs: Option<u32>,
        /// Epochs (Model_T for the transfer templates); default: the agent's, 10.
        #[arg(long)]
        epochs: Option<u32>,
        /// Epochs of Model_ST (default: --epochs).
        #[arg(long)]
        finetune_epochs: Option<u32>,
        /// Peak learning rate of Model_ST (default: --lr).
        #[arg(long)]
        finetune_lr: Option<f64>,
        /// Slices per optimizer step; default: the agent's, 8.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Peak learning rate (cosine decay to 5 %); default: the agent's, 0.01.
        #[arg(long)]
        lr: Option<f64>,
        /// Seed of initialisation and shuffling; default: the agent's, 17.
        #[arg(long)]
        seed: Option<u64>,
        /// Model config for `train` and for a source's Model_S (default: small).
        #[arg(long)]
        config: Option<String>,
        /// Sites that must succeed (default: all).
        #[arg(long)]
        quorum: Option<u32>,
        /// The round fails its unfinished tasks after this long; default: the coordinator's
        /// limits.round_deadline_seconds (86400).
        #[arg(long)]
        deadline_seconds: Option<u32>,
        /// Leases of one task before it fails; default: the coordinator's limits.max_attempts (3).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// The study sites that take part (default: all; a transfer source is added).
        #[arg(long, value_delimiter = ',')]
        sites: Vec<String>,
        /// fedavg: federated steps (local training at every site, then an average).
        #[arg(long)]
        rounds: Option<u32>,
        /// fedavg: epochs of local training per step (default: --epochs, else the agent's).
        #[arg(long)]
        local_epochs: Option<u32>,
        /// fedavg: FedBN, each site keeps its own batch-norm statistics.
        #[arg(long)]
        fedbn: bool,
        /// fedavg: FedProx's mu (the proximal term mu/2 ||w - w_global||^2; default 0, off).
        #[arg(long)]
        prox_mu: Option<f64>,
        /// Transfer templates: run the study N times, replicate i with seed + i (each its own
        /// Model_S where --source trains it); the report gives intervals over replicates.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        replicates: u32,
        /// Follow the round until it ends (exit 0 completed, 2 failed, 3 cancelled).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every round, newest first: id, study, task, state, start time (UTC), sites done.
    #[command(after_help = "Example:\n  coordinator round list --study npc")]
    List {
        /// Only this study's rounds.
        #[arg(long)]
        study: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// A round's state and each site's task; exits 2 if the round failed, 3 if it was
    /// cancelled (0 while it runs and once it completed).
    Status {
        /// The round id `round start` printed.
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Per-site progress bars until the round ends; exits 0 when it completed, 2 when it
    /// failed, 3 when it was cancelled.
    Watch {
        /// The round id `round start` printed.
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a round: its unfinished tasks end, and agents still working on them stop.
    Cancel {
        /// The round id `round start` printed.
        round: String,
        #[command(flatten)]
        conn: Conn,
    },
}
