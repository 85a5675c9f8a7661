//! `lbctl agent`: the settings from the file and the flags, then the agent until a signal.
use crate::{agent, config::Settings};
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

/// The flags of `lbctl agent`: the settings, and where else to find them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AgentArgs {
    /// A TOML file with any of the settings below (see examples/agent.toml); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets hidden) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Every setting.
    #[command(flatten)]
    pub settings: Settings,
}

impl AgentArgs {
    /// The effective settings: the flags over the file over the defaults.
    pub fn settings(&self) -> crate::Result<Settings> {
        let file = match &self.config {
            Some(p) => Settings::from_file(p)?,
            None => Settings::default(),
        };
        Ok(file.overridden_by(self.settings.clone()))
    }
}

pub(super) fn run(args: &AgentArgs) -> anyhow::Result<ExitCode> {
    let settings = args.settings()?;
    if args.print_config {
        print!("{}", settings.to_toml_redacted()?);
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = settings.agent_config()?;
    // The agent's runtime turns SIGINT and SIGTERM into `shutdown`.
    let shutdown = Arc::new(AtomicBool::new(false));
    agent::run(&cfg, shutdown)?;
    Ok(ExitCode::SUCCESS)
}
