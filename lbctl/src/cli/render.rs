//! `lbctl render`: the services a Marathon document yields, without a kernel.
use crate::{api, config::DeriveSettings, error::Error, marathon};
use anyhow::Context as _;
use std::{io::Read as _, path::PathBuf, process::ExitCode};

/// The flags of `lbctl render`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The document; `-` or nothing reads standard input.
    file: Option<PathBuf>,
    /// Print [`api::RenderOutput`] as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    derive: DeriveSettings,
}

pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let (text, what) = match args.file.as_deref() {
        Some(p) if p.as_os_str() != "-" => (
            std::fs::read_to_string(p).map_err(|e| Error::Read {
                path: p.to_path_buf(),
                source: e,
            })?,
            p.display().to_string(),
        ),
        _ => (read_stdin()?, "standard input".to_string()),
    };
    let derived = marathon::desired_state(
        &text,
        &what,
        &args.derive.options()?,
        &marathon::SystemResolver,
    )?;
    if args.json {
        super::print_pretty(&api::RenderOutput::from(&derived))?;
    } else {
        print!("{}", render_table(&derived));
    }
    Ok(ExitCode::SUCCESS)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}

/// The services of a document for people: a line per service, then its backends, then the
/// problems.
pub fn render_table(d: &marathon::Derived) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for s in d.services.values() {
        let name = s
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let apps: Vec<&str> = s.apps.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "{} {}{} apps: {}",
            s.vip.proto.name().to_uppercase(),
            s.vip.addr,
            name,
            apps.join(", ")
        );
        for b in s.backends.values() {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<9} {} {}",
                b.addr,
                b.state.name(),
                b.app,
                b.task
            );
        }
    }
    if !d.problems.is_empty() {
        let _ = writeln!(out, "problems:");
        for p in &d.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}
