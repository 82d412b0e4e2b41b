//! The command line: `validate`, `run`, `schema`. Each command returns its exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::engine::{self, Engine, RunInput, RunStatus, SystemClock};
use crate::report::{self, Output};
use crate::secrets::Secrets;
use crate::workflow::{self, Format};

/// Exit code: every file valid / the run succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: errors were found / the run failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the command itself could not run (bad path, unusable input).
pub const EXIT_USAGE: u8 = 2;

/// flowrun: a GitOps workflow runner.
#[derive(Debug, Parser)]
#[command(name = "flowrun", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log line format on stderr (`RUST_LOG` sets the level; default warn, serve info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up `tracing` on stderr.
pub fn init_logging(cli: &Cli) {
    let default = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check workflow files and report every error as file:line:col.
    Validate {
        /// Files or directories (searched recursively for .yaml/.yml).
        #[arg(default_value = "workflows")]
        paths: Vec<PathBuf>,
        /// How to print errors.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Run one workflow once, in the foreground.
    Run(RunArgs),
    /// Take events over HTTP and run matching workflows durably.
    Serve(ServeArgs),
    /// Read run history from the database.
    Runs {
        /// What to show.
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Print the workflow JSON Schema that the binary embeds.
    Schema,
}

/// Arguments of `flowrun serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The workflow directory.
    #[arg(long, default_value = "workflows")]
    pub dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Database URL.
    #[arg(long, default_value = DEFAULT_DB, env = "FLOWRUN_DB", hide_env_values = true)]
    pub db: String,
    /// Largest accepted event body, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body: usize,
    /// How long in-flight attempts may take to finish at shutdown.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub grace: std::time::Duration,
    /// Finished runs older than this are pruned.
    #[arg(long, default_value = "7d", value_parser = duration)]
    pub retain: std::time::Duration,
    /// Runs worked on at once.
    #[arg(long, default_value_t = crate::worker::Config::default().concurrency)]
    pub workers: usize,
    /// How long a claim lasts without renewal: work of an instance that died is
    /// taken over by another this long after its last renewal.
    #[arg(long, default_value = "30s", value_parser = lease)]
    pub lease: std::time::Duration,
    /// A `.env` or YAML file of secrets (overrides FLOWRUN_SECRET_* variables).
    #[arg(long)]
    pub secrets_file: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on `POST /events/*`.
    #[arg(long, env = "FLOWRUN_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
}

/// `flowrun runs …`.
#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only this status: pending, succeeded, failed.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB, env = "FLOWRUN_DB", hide_env_values = true)]
        db: String,
        /// How to print.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show one run with its actions and attempts (JSON).
    Show {
        /// The run id.
        id: String,
        /// Database URL.
        #[arg(long, default_value = DEFAULT_DB, env = "FLOWRUN_DB", hide_env_values = true)]
        db: String,
        /// The secrets file `serve` uses, so its values are redacted here too.
        #[arg(long)]
        secrets_file: Option<PathBuf>,
    },
}

/// The embedded default database.
pub const DEFAULT_DB: &str = "sqlite://flowrun.db";

/// A lease from 1 s to 1 day: shorter re-claims attempts still in flight, longer
/// delays the takeover of a dead instance's work past any use.
fn lease(s: &str) -> Result<std::time::Duration, String> {
    let d = duration(s)?;
    if (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(86_400)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("`{s}` is outside 1s..=1d"))
    }
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    workflow::model::human::parse(s)
}

/// Arguments of `flowrun run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A workflow file, or a workflow name looked up in `--dir`.
    pub workflow: String,
    /// The trigger payload: a JSON file, or `-` for standard input.
    #[arg(long)]
    pub payload: String,
    /// Render and print every request without sending anything.
    #[arg(long)]
    pub dry_run: bool,
    /// How to print the result.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// A `.env` or YAML file of secrets (overrides FLOWRUN_SECRET_* variables).
    #[arg(long)]
    pub secrets_file: Option<PathBuf>,
    /// Where to look a workflow name up.
    #[arg(long, default_value = "workflows")]
    pub dir: PathBuf,
    /// Show every attempt.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs the parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let code = match cli.command {
        Command::Validate { paths, format } => validate(&paths, format),
        Command::Run(args) => run_workflow(&args),
        Command::Serve(args) => with_runtime(serve(args)),
        Command::Runs { command } => with_runtime(runs(command)),
        Command::Schema => {
            print!("{}", workflow::schema::SCHEMA_JSON);
            EXIT_OK
        }
    };
    ExitCode::from(code)
}

fn validate(paths: &[PathBuf], format: Format) -> u8 {
    let set = match workflow::discover(paths).and_then(|files| workflow::load_set(&files)) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    print!(
        "{}",
        workflow::diagnostic::render_all(&set.diagnostics, format)
    );
    let files = plural(set.files, "file");
    let errors = plural(set.diagnostics.len(), "error");
    eprintln!("checked {files}: {errors}");
    if set.diagnostics.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// `1 file`, `2 files`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// A usage problem: printed to stderr, exit code 2.
fn usage(message: impl std::fmt::Display) -> u8 {
    eprintln!("error: {message}");
    EXIT_USAGE
}

/// Loads the workflow named by `arg`: a file path, else a name in `dir`.
fn find_workflow(arg: &str, dir: &std::path::Path) -> Result<workflow::Loaded, u8> {
    let path = std::path::Path::new(arg);
    let invalid = |errors: &[workflow::Diagnostic]| {
        eprint!("{}", workflow::diagnostic::render_all(errors, Format::Text));
        eprintln!("error: the workflow is invalid");
        EXIT_USAGE
    };
    if path.is_file() {
        return match workflow::load_file(path) {
            Ok(Ok(loaded)) => Ok(loaded),
            Ok(Err(errors)) => Err(invalid(&errors)),
            Err(e) => Err(usage(e)),
        };
    }
    let files = workflow::discover(&[dir.to_path_buf()])
        .map_err(|e| usage(format!("`{arg}` is not a file, and {e}")))?;
    let set = workflow::load_set(&files).map_err(usage)?;
    if let Some(loaded) = set.loaded.into_iter().find(|l| l.workflow.name == arg) {
        return Ok(loaded);
    }
    // The name may be in a file that failed to load: show why.
    let related: Vec<_> = set.diagnostics.into_iter().collect();
    if !related.is_empty() {
        eprint!(
            "{}",
            workflow::diagnostic::render_all(&related, Format::Text)
        );
    }
    Err(usage(format!(
        "no workflow file `{arg}` and no valid workflow named `{arg}` in `{}`",
        dir.display()
    )))
}

fn read_payload(arg: &str) -> Result<serde_json::Value, u8> {
    let (name, text) = if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| usage(format!("cannot read the payload from stdin: {e}")))?;
        ("stdin".to_owned(), s)
    } else {
        let text = std::fs::read_to_string(arg)
            .map_err(|e| usage(format!("cannot read payload `{arg}`: {e}")))?;
        (format!("`{arg}`"), text)
    };
    serde_json::from_str(&text).map_err(|e| usage(format!("payload {name} is not JSON: {e}")))
}

fn run_workflow(args: &RunArgs) -> u8 {
    match prepare(args) {
        Ok((loaded, input)) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return usage(format!("cannot start the async runtime: {e}")),
            };
            runtime.block_on(execute(args, &loaded, &input))
        }
        Err(code) => code,
    }
}

fn prepare(args: &RunArgs) -> Result<(workflow::Loaded, RunInput), u8> {
    let loaded = find_workflow(&args.workflow, &args.dir)?;
    let wf = &loaded.workflow;
    if !wf.enabled && !args.dry_run {
        return Err(usage(format!(
            "workflow `{}` is disabled (`enabled: false`); use --dry-run to render it",
            wf.name
        )));
    }
    let payload = read_payload(&args.payload)?;
    if let Some(schema) = &wf.trigger.payload_schema {
        let errors = workflow::payload::check(schema, &payload);
        if !errors.is_empty() {
            return Err(usage(format!(
                "the payload does not match `payload_schema`:\n  {}",
                errors.join("\n  ")
            )));
        }
    }
    let mut secrets = Secrets::from_env();
    if let Some(file) = &args.secrets_file {
        secrets.merge_file(file).map_err(usage)?;
    }
    let secrets = secrets
        .select(&crate::secrets::referenced(wf))
        .map_err(usage)?;
    let input = RunInput {
        run_id: engine::new_id(),
        trigger: RunInput::trigger_for(wf, std::time::SystemTime::now()),
        payload,
        secrets,
    };
    Ok((loaded, input))
}

/// Prints attempts as they happen at `-v` (text output only).
struct LiveSink<'a> {
    wf: &'a workflow::Workflow,
    verbose: bool,
}

impl engine::Sink for LiveSink<'_> {
    fn attempt(&mut self, action: usize, record: &engine::AttemptRecord) {
        if self.verbose {
            eprintln!(
                "{}",
                report::attempt_line(&self.wf.actions[action].label(action), record)
            );
        }
    }
    fn action(&mut self, _: usize, _: &engine::ActionReport) {}
}

async fn execute(args: &RunArgs, loaded: &workflow::Loaded, input: &RunInput) -> u8 {
    let engine = match Engine::new(std::sync::Arc::new(SystemClock)) {
        Ok(e) => e,
        Err(e) => return usage(e),
    };
    let mut sink = LiveSink {
        wf: &loaded.workflow,
        verbose: args.verbose && args.output == Output::Text,
    };
    let result = engine
        .run(&loaded.workflow, input, args.dry_run, &mut sink)
        .await;
    match args.output {
        // Attempts were already shown live on stderr.
        Output::Text => print!("{}", report::text(&result, false)),
        Output::Json => println!("{}", report::json(&result)),
    }
    match result.status {
        RunStatus::Succeeded => EXIT_OK,
        RunStatus::Failed => EXIT_FAILED,
    }
}

fn with_runtime(fut: impl std::future::Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => usage(format!("cannot start the async runtime: {e}")),
    }
}

/// Opens an existing database for reading history; never creates one.
/// The store a `--db` URL names.
enum Db {
    /// SQLite, with the lock that makes this process its only `serve`.
    Sqlite(crate::store::sqlite::SqliteStore, Option<std::fs::File>),
    /// PostgreSQL, shared by several instances.
    Postgres(Box<crate::store::postgres::PgStore>),
}

/// Opens the store `url` names. `serve` locks a SQLite file; history commands
/// never create a database.
async fn open_db(url: &str, serve: bool, pool: usize) -> Result<Db, u8> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return crate::store::postgres::PgStore::connect(url, pool)
            .await
            .map(|s| Db::Postgres(Box::new(s)))
            .map_err(|e| usage(format!("cannot open the PostgreSQL database: {e}")));
    }
    let path = crate::store::sqlite::path_from_url(url).map_err(usage)?;
    if !serve && !path.exists() {
        return Err(usage(format!(
            "no database at `{}`; start `flowrun serve` first or pass --db",
            path.display()
        )));
    }
    let lock = if serve {
        Some(crate::store::sqlite::lock(&path).map_err(usage)?)
    } else {
        None
    };
    crate::store::sqlite::SqliteStore::open(&path)
        .map(|s| Db::Sqlite(s, lock))
        .map_err(|e| usage(format!("cannot open `{url}`: {e}")))
}

async fn serve(args: ServeArgs) -> u8 {
    let registry = match crate::registry::Registry::load(&args.dir) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let db = match open_db(&args.db, true, args.workers.clamp(4, 32)).await {
        Ok(db) => db,
        Err(code) => return code,
    };
    let mut secrets = Secrets::from_env();
    if let Some(file) = &args.secrets_file
        && let Err(e) = secrets.merge_file(file)
    {
        return usage(e);
    }
    for e in &registry.entries {
        let wf = &e.loaded.workflow;
        if let Err(err) = secrets.select(&crate::secrets::referenced(wf)) {
            tracing::warn!(workflow = %wf.name, "{err}; its runs (or, for `verify`, its events) will fail");
        }
    }
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => return usage(format!("cannot listen on `{}`: {e}", args.listen)),
    };
    let engine = match Engine::new(std::sync::Arc::new(SystemClock)) {
        Ok(e) => e,
        Err(e) => return usage(e),
    };
    eprintln!(
        "flowrun serving {} workflows from `{}` on http://{} (database {})",
        registry.entries.len(),
        args.dir.display(),
        listener
            .local_addr()
            .map_or_else(|_| args.listen.clone(), |a| a.to_string()),
        crate::store::redact_url(&args.db)
    );
    let config = crate::server::Config {
        dir: args.dir.clone(),
        max_body: args.max_body,
        retain: args.retain,
        ingest_token: args.ingest_token.clone().filter(|t| !t.is_empty()),
        workers: crate::worker::Config {
            concurrency: args.workers.max(1),
            grace: args.grace,
            lease: args.lease,
            ..crate::worker::Config::default()
        },
    };
    let result = match db {
        Db::Sqlite(store, _lock) => {
            serve_on(store, listener, engine, secrets, registry, config).await
        }
        Db::Postgres(store) => serve_on(*store, listener, engine, secrets, registry, config).await,
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    }
}

async fn serve_on<S: crate::store::Store>(
    store: S,
    listener: tokio::net::TcpListener,
    engine: Engine,
    secrets: Secrets,
    registry: crate::registry::Registry,
    config: crate::server::Config,
) -> std::io::Result<()> {
    let shutdown = crate::shutdown::on_signal();
    crate::server::serve(
        listener,
        std::sync::Arc::new(store),
        engine,
        secrets,
        registry,
        config,
        shutdown,
    )
    .await
}

async fn runs(command: RunsCommand) -> u8 {
    let url = match &command {
        RunsCommand::List { db, .. } | RunsCommand::Show { db, .. } => db.clone(),
    };
    if let RunsCommand::List {
        status: Some(s), ..
    } = &command
        && !matches!(s.as_str(), "pending" | "succeeded" | "failed")
    {
        return usage(format!(
            "unknown status `{s}`; expected one of pending, succeeded, failed"
        ));
    }
    match open_db(&url, false, 2).await {
        Ok(Db::Sqlite(store, _)) => runs_in(&store, command).await,
        Ok(Db::Postgres(store)) => runs_in(&*store, command).await,
        Err(code) => code,
    }
}

async fn runs_in<S: crate::store::Store>(store: &S, command: RunsCommand) -> u8 {
    match command {
        RunsCommand::List {
            workflow,
            status,
            limit,
            output,
            ..
        } => {
            let filter = crate::store::RunFilter {
                workflow,
                status,
                limit: Some(limit),
                before: None,
            };
            match store.list_runs(&filter).await {
                Ok(runs) => {
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string_pretty(&runs).unwrap_or_default()
                        ),
                        Output::Text => {
                            for r in &runs {
                                println!(
                                    "{}  {:9}  {}  {}",
                                    r.id, r.status, r.created_at, r.workflow
                                );
                            }
                            eprintln!("{}", plural(runs.len(), "run"));
                        }
                    }
                    EXIT_OK
                }
                Err(e) => usage(e),
            }
        }
        RunsCommand::Show {
            id, secrets_file, ..
        } => match store.get_run(&id).await {
            Ok(Some(run)) => {
                let mut secrets = Secrets::from_env();
                if let Some(file) = &secrets_file
                    && let Err(e) = secrets.merge_file(file)
                {
                    return usage(e);
                }
                let value = serde_json::to_value(&run).unwrap_or_default();
                let value = secrets.redactor().redact_json(&value);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
                EXIT_OK
            }
            Ok(None) => {
                eprintln!("error: no run `{id}`");
                EXIT_FAILED
            }
            Err(e) => usage(e),
        },
    }
}
