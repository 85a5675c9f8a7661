//! `lbctl stats`: the data plane's counters (`lb_common::COUNTERS`), or with --watch their rates.
use crate::{api, dataplane::Maps};
use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

/// Shortest and longest `--interval`, in seconds.
const INTERVAL: (f64, f64) = (0.1, 3600.0);

/// The flags of `lbctl stats`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// --json prints [`api::Counters`] (with --watch: a line of [`api::Rates`] each time).
    #[command(flatten)]
    read: super::ReadArgs,
    /// Print rates per second, every --interval, --count times (0: until interrupted).
    #[arg(long)]
    watch: bool,
    /// Seconds between two lines of --watch, from 0.1 to 3600.
    #[arg(long, default_value = "1", value_parser = interval)]
    pub(super) interval: Duration,
    /// Lines --watch prints (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

/// clap's check of --interval: a number of seconds within [`INTERVAL`] (never NaN or infinite).
fn interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    let (min, max) = INTERVAL;
    // NaN fails both comparisons, so it lands here too.
    if !(min..=max).contains(&secs) {
        return Err(format!("must be from {min} to {max} seconds (not {s})"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(super) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let maps = Maps::open(&args.read.pin.pin_dir)?;
    if args.watch {
        watch(&maps, args)?;
        return Ok(ExitCode::SUCCESS);
    }
    let values = maps.counters()?;
    if args.read.json {
        super::print_pretty(&api::counters(&values))?;
    } else {
        for (c, v) in values {
            if c.map == lb_common::MAP_SOCK_STATS && c.index == 0 {
                println!("local path (socket calls of the cgroup, not packets):");
            }
            println!("{:<20} {v:<7} {}", c.name, c.description);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `lbctl stats --watch`: per-second rates of every counter, every `--interval`.
fn watch(maps: &Maps, args: &Args) -> anyhow::Result<()> {
    let mut last = maps.counters()?;
    let mut t = Instant::now();
    let mut n = 0;
    while args.count == 0 || n < args.count {
        std::thread::sleep(args.interval);
        let now = maps.counters()?;
        let secs = t.elapsed().as_secs_f64();
        t = Instant::now();
        let rates: api::Rates = now
            .iter()
            .zip(&last)
            .map(|((c, v), (_, old))| (c.name.to_string(), v.saturating_sub(*old) as f64 / secs))
            .collect();
        if args.read.json {
            super::print_line(&rates)?;
        } else {
            // In the table's order, not the map's.
            let busy: Vec<String> = now
                .iter()
                .filter_map(|(c, _)| {
                    let r = rates.get(c.name).copied().unwrap_or(0.0);
                    (r > 0.0).then(|| format!("{} {r:.0}/s", c.name))
                })
                .collect();
            println!(
                "{}",
                if busy.is_empty() {
                    "idle".to_string()
                } else {
                    busy.join("  ")
                }
            );
        }
        last = now;
        n += 1;
    }
    Ok(())
}
