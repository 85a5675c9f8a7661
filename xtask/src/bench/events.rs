//! A one-task change through the whole Marathon path: the real `lbctl agent --marathon` follows a
//! fake Marathon (`lbtest::fake_marathon`, a real HTTP server in this process, in the agent's
//! network namespace) serving a document of many apps; each change moves one task of one app,
//! and is timed from sending the event that names the app (`status_update_event` with its
//! `appId`) to the agent's log line saying that the app's service changed, which it writes once
//! the kernel maps are. Each change is then looked for in the kernel maps.
use super::{
    control::{AgentLab, apps},
    doc,
    stats::Summary,
};
use anyhow::{Context as _, Result, bail, ensure};
use lbtest::fake_marathon::FakeMarathon;
use serde::Serialize;
use std::{
    io::{Read as _, Seek as _, SeekFrom},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

#[derive(Clone, Debug, Serialize)]
pub struct EventResult {
    pub apps: usize,
    pub changes: usize,
    /// From the event sent to the agent's log saying the service changed.
    pub event_ms: Summary,
    /// Apps the agent fetched alone while the changes were made, and full snapshots.
    pub app_fetches: u64,
    pub snapshots: u64,
    /// Changes then found in the kernel maps.
    pub verified: usize,
}

/// A log file read as it grows.
struct Tail {
    file: std::fs::File,
    at: u64,
    text: String,
}

impl Tail {
    fn open(path: &Path) -> Result<Tail> {
        Ok(Tail {
            file: std::fs::File::open(path).context("the agent's log")?,
            at: 0,
            text: String::new(),
        })
    }

    /// Reads what was written since the last call; true when a line of it holds every needle.
    fn saw(&mut self, needles: &[&str]) -> Result<bool> {
        self.file.seek(SeekFrom::Start(self.at))?;
        let mut new = String::new();
        self.at += self.file.read_to_string(&mut new)? as u64;
        self.text.push_str(&new);
        // Only whole lines are looked at; the rest waits for its end.
        let end = self.text.rfind('\n').map_or(0, |i| i + 1);
        let found = self.text[..end]
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)));
        self.text.drain(..end);
        Ok(found)
    }
}

pub fn run(n: usize, tasks: usize, changes: usize, lbctl: &Path) -> Result<EventResult> {
    let lab = AgentLab::new(&format!("ev{n}"))?;
    let log_path = lab.log();
    let mut apps = apps(n, tasks);
    let listener = lbtest::in_netns(&lab.ns.name, || TcpListener::bind(("127.0.0.1", 0)))
        .context("a port for the fake Marathon")?;
    let port = listener.local_addr()?.port();
    let m = FakeMarathon::start(listener, &doc::document(&apps), None);
    // Room for a backend more per change (each moves a task to an address no app has).
    let table = super::lb_table(n, super::control::BACKENDS + changes, n * tasks)?;
    let source = [
        "--marathon".to_string(),
        format!("http://127.0.0.1:{port}"),
        "--resync-secs".into(),
        "3600".into(),
    ];
    let mut agent = lab.agent(lbctl, &source, &table, "info")?;
    let mut tail = Tail::open(&log_path)?;
    // Served, following the event stream, and the snapshot its opening asks for fetched: quiet.
    let start = Instant::now();
    let mut ready = false;
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(status) = agent.0.try_wait()? {
            bail!(
                "the agent exited ({status}): {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        let snapshots = m.snapshots();
        if m.streams() > 0 && snapshots >= 2 {
            std::thread::sleep(Duration::from_secs(2));
            if m.snapshots() == snapshots {
                ready = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(ready, "the agent never settled on the fake Marathon");
    tail.saw(&[])?;
    let (fetches, snapshots) = (m.app_fetches(), m.snapshots());
    let mut lat = Vec::new();
    let mut moved = Vec::new();
    for k in 0..changes {
        let a = (k * 7919 + 29) % apps.len();
        let to = SocketAddrV4::new(
            Ipv4Addr::new(198, 19, 40 + (k / 250) as u8, (k % 250 + 2) as u8),
            8080,
        );
        apps[a].tasks[k % tasks] = SocketAddr::V4(to);
        // Not timed: the fake Marathon indexes the document's apps.
        m.set_doc(&doc::document(&apps));
        let vip = format!("service=tcp {}", apps[a].vip);
        let sent = Instant::now();
        m.app_event("status_update_event", &apps[a].id);
        let mut seen = false;
        while sent.elapsed() < Duration::from_secs(10) {
            if tail.saw(&["service changed", &vip])? {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        ensure!(
            seen,
            "change {k} ({vip}) not applied within 10 s: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        lat.push(sent.elapsed().as_secs_f64() * 1e3);
        moved.push((a, to));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (app_fetches, snapshots) = (m.app_fetches() - fetches, m.snapshots() - snapshots);
    let kernel = lbctl::dataplane::Maps::open(&lab.pins.dir)?.read()?;
    let verified = moved
        .iter()
        .filter(|(a, to)| {
            let vip = lbctl::model::Vip {
                addr: apps[*a].vip,
                proto: lbctl::model::Proto::Tcp,
            };
            kernel
                .services
                .get(&vip)
                .is_some_and(|s| s.backends.contains_key(&SocketAddr::V4(*to)))
        })
        .count();
    drop(agent);
    drop(m);
    drop(lab);
    Ok(EventResult {
        apps: n,
        changes,
        event_ms: Summary::of(&lat).context("no changes")?,
        app_fetches,
        snapshots,
        verified,
    })
}
