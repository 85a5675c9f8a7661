//! Tests of the command line: every flag of the agent reaches its settings over the file, and
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! every numeric flag is range-checked.
use super::*;
use crate::config::{AuthSettings, DeriveSettings, LimitSettings, Settings, TableSettings};

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("lbctl").chain(args.iter().copied()))
}

fn agent_args(args: &[&str]) -> AgentArgs {
    let mut all = vec!["agent"];
    all.extend_from_slice(args);
    match parse(&all) {
        Ok(Cli {
            command: Command::Agent(a),
        }) => *a,
        other => panic!("{args:?}: {other:?}"),
    }
}

/// Every setting given, as flags would give them (no auth: that is file-only).
const FLAGS: &[&str] = &[
    "--apps",
    "/flag/apps.json",
    "--marathon",
    "http://flag:1",
    "--marathon",
    "http://flag:2",
    "--iface",
    "f0",
    "--iface",
    "f1",
    "--pin-dir",
    "/flag/pin",
    "--vip-range",
    "10.9.0.0/16",
    "--named-vip-pool",
    "11.9.0.0/16",
    "--framework",
    "flagfw",
    "--poll-ms",
    "11",
    "--resync-secs",
    "12",
    "--debounce-ms",
    "13",
    "--timeout-secs",
    "14",
    "--ca-file",
    "/flag/ca.pem",
    "--status-socket",
    "/flag/s.sock",
    "--metrics-listen",
    "127.0.0.1:1",
    "--bpf-log",
    "--ring-size",
    "1031",
    "--maglev-seed",
    "15",
    "--flow-table-size",
    "2048",
    "--max-services",
    "16",
    "--max-backends",
    "17",
    "--max-members",
    "18",
    "--stream-idle-secs",
    "19",
    "--max-snapshot-mib",
    "20",
    "--max-event-line-kib",
    "21",
    "--max-removal",
    "0.25",
    "--max-removal-floor",
    "7",
    "--removal-confirm-secs",
    "8",
    "--resolve-timeout-ms",
    "9",
    "--resolve-ttl-secs",
    "10",
    "--resolve-negative-ttl-secs",
    "11",
    "--dns-listen",
    "127.0.0.1:53",
    "--dns-listen",
    "[::1]:53",
    "--dns-ttl",
    "12",
    "--dns-upstream",
    "127.0.0.1:5353",
    "--local",
    "--cgroup",
    "/flag/cgroup",
    "--local-backend-gone",
    "keep",
];

/// The same settings as a file, each with another value.
const FILE: &str = r#"
apps = "/file/apps.json"
marathon = ["http://file:1"]
iface = ["e0"]
pin_dir = "/file/pin"
vip_range = ["10.8.0.0/16"]
named_vip_pool = "11.8.0.0/16"
framework = "filefw"
poll_ms = 21
resync_secs = 22
debounce_ms = 23
timeout_secs = 24
ca_file = "/file/ca.pem"
status_socket = "/file/s.sock"
metrics_listen = "127.0.0.1:2"
bpf_log = false
ring_size = 1021
maglev_seed = 25
flow_table_size = 4096
max_services = 26
max_backends = 27
max_members = 28
stream_idle_secs = 29
max_snapshot_mib = 30
max_event_line_kib = 31
max_removal = 0.75
max_removal_floor = 17
removal_confirm_secs = 18
resolve_timeout_ms = 19
resolve_ttl_secs = 20
resolve_negative_ttl_secs = 21
dns_listen = ["127.0.0.2:53"]
dns_ttl = 22
dns_upstream = ["127.0.0.2:5353"]
local = false
cgroup = "/file/cgroup"
local_backend_gone = "end"
[auth]
user = "fileuser"
"#;

/// What FLAGS say, written out by hand.
fn flag_settings() -> Settings {
    Settings {
        apps: Some("/flag/apps.json".into()),
        marathon: vec!["http://flag:1".into(), "http://flag:2".into()],
        iface: vec!["f0".into(), "f1".into()],
        pin_dir: Some("/flag/pin".into()),
        derive: DeriveSettings {
            vip_range: vec!["10.9.0.0/16".into()],
            named_vip_pool: Some("11.9.0.0/16".into()),
            framework: Some("flagfw".into()),
        },
        poll_ms: Some(11),
        resync_secs: Some(12),
        debounce_ms: Some(13),
        timeout_secs: Some(14),
        ca_file: Some("/flag/ca.pem".into()),
        status_socket: Some("/flag/s.sock".into()),
        metrics_listen: Some("127.0.0.1:1".into()),
        bpf_log: Some(true),
        table: TableSettings {
            ring_size: Some(1031),
            maglev_seed: Some(15),
            flow_table_size: Some(2048),
            max_services: Some(16),
            max_backends: Some(17),
            max_members: Some(18),
        },
        guard: crate::config::GuardSettings {
            max_removal: Some(0.25),
            max_removal_floor: Some(7),
            removal_confirm_secs: Some(8),
            resolve_timeout_ms: Some(9),
            resolve_ttl_secs: Some(10),
            resolve_negative_ttl_secs: Some(11),
        },
        auth: AuthSettings::default(),
        limits: LimitSettings {
            stream_idle_secs: Some(19),
            max_snapshot_mib: Some(20),
            max_event_line_kib: Some(21),
        },
        dns: crate::config::DnsSettings {
            dns_listen: vec!["127.0.0.1:53".into(), "[::1]:53".into()],
            dns_ttl: Some(12),
            dns_upstream: vec!["127.0.0.1:5353".into()],
        },
        local: crate::config::LocalSettings {
            local: Some(true),
            cgroup: Some("/flag/cgroup".into()),
            local_backend_gone: Some(crate::dataplane::BackendGone::Keep),
        },
        unknown: Default::default(),
    }
}

#[test]
fn every_flag_is_read_and_wins_over_the_file() {
    let dir = std::env::temp_dir().join(format!("lbctl-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("agent.toml");
    std::fs::write(&file, FILE).expect("writing the file");
    let file_arg = file.to_string_lossy().into_owned();

    // Flags alone.
    assert_eq!(
        agent_args(FLAGS).settings().expect("settings"),
        flag_settings()
    );
    // The file alone: every key is read (none is a default).
    let from_file = agent_args(&["--config", &file_arg])
        .settings()
        .expect("settings");
    assert_eq!(from_file, Settings::from_toml(FILE).expect("file"));
    let flags = flag_settings();
    let mut differs = vec![];
    let f = &from_file;
    for (name, same) in [
        ("apps", f.apps == flags.apps),
        ("marathon", f.marathon == flags.marathon),
        ("iface", f.iface == flags.iface),
        ("derive", f.derive == flags.derive),
        ("table", f.table == flags.table),
        ("guard", f.guard == flags.guard),
        ("dns", f.dns == flags.dns),
        ("poll_ms", f.poll_ms == flags.poll_ms),
        ("bpf_log", f.bpf_log == flags.bpf_log),
        ("local", f.local.local == flags.local.local),
        ("cgroup", f.local.cgroup == flags.local.cgroup),
        (
            "local_backend_gone",
            f.local.local_backend_gone == flags.local.local_backend_gone,
        ),
    ] {
        if same {
            differs.push(name);
        }
    }
    assert!(
        differs.is_empty(),
        "the file repeats the flags for {differs:?}"
    );
    // Both: every flag wins, and what only the file says (auth) stays.
    let mut args = vec!["--config", file_arg.as_str()];
    args.extend_from_slice(FLAGS);
    let both = agent_args(&args).settings().expect("settings");
    let want = Settings {
        auth: AuthSettings {
            user: Some("fileuser".into()),
            ..Default::default()
        },
        ..flag_settings()
    };
    assert_eq!(both, want);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bpf_log_takes_an_optional_value() {
    assert_eq!(agent_args(&["--bpf-log"]).settings.bpf_log, Some(true));
    assert_eq!(
        agent_args(&["--bpf-log=false"]).settings.bpf_log,
        Some(false)
    );
    assert_eq!(agent_args(&[]).settings.bpf_log, None);
    // It does not swallow the next flag.
    let a = agent_args(&["--bpf-log", "--iface", "eth0"]);
    assert_eq!(
        (a.settings.bpf_log, a.settings.iface),
        (Some(true), vec!["eth0".into()])
    );
}

/// Every numeric flag refuses what is out of its range, and takes its edges.
#[test]
fn numeric_flags_are_range_checked() {
    let bad: &[&[&str]] = &[
        &["agent", "--poll-ms", "9"],
        &["agent", "--poll-ms=-1"],
        &["agent", "--resync-secs", "0"],
        &["agent", "--resync-secs", "86401"],
        &["agent", "--debounce-ms", "600001"],
        &["agent", "--debounce-ms", "nan"],
        &["agent", "--timeout-secs", "0"],
        &["agent", "--ring-size", "2"],
        &["agent", "--ring-size", "131072"],
        &["agent", "--maglev-seed=-1"],
        &["agent", "--maglev-seed", "18446744073709551616"],
        &["agent", "--flow-table-size", "1023"],
        &["agent", "--flow-table-size", "16777217"],
        &["agent", "--max-services", "0"],
        &["agent", "--max-services", "1048577"],
        &["agent", "--max-backends", "0"],
        &["agent", "--max-members", "0"],
        &["agent", "--max-members", "16777217"],
        &["agent", "--metrics-listen", "9100"],
        &["agent", "--vip-range", "10.0.0.0/33"],
        &["agent", "--max-removal", "1.5"],
        &["agent", "--max-removal=-0.1"],
        &["agent", "--max-removal", "nan"],
        &["agent", "--removal-confirm-secs", "3601"],
        &["agent", "--resolve-timeout-ms", "0"],
        &["agent", "--resolve-ttl-secs", "86401"],
        &["stats", "--watch", "--interval", "nan"],
        &["stats", "--watch", "--interval", "NaN"],
        &["stats", "--watch", "--interval", "inf"],
        &["stats", "--watch", "--interval=-1"],
        &["stats", "--watch", "--interval", "0"],
        &["stats", "--watch", "--interval", "0.05"],
        &["stats", "--watch", "--interval", "3601"],
        &["stats", "--watch", "--interval", "1e400"],
        &["stats", "--count=-1"],
        &["flows", "--limit", "0"],
        &["flows", "--limit=-5"],
        &["flows", "--proto", "icmp"],
        &[
            "simulate",
            "--vip",
            "10.0.0.1:80",
            "--src",
            "10.1.0.1:5",
            "--ring-size",
            "0",
        ],
        &[
            "simulate",
            "--vip",
            "10.0.0.1:80",
            "--src",
            "10.1.0.1:5",
            "--max-backends",
            "0",
        ],
        &[
            "simulate",
            "--vip",
            "10.0.0.1:80",
            "--src",
            "10.1.0.1:99999",
        ],
    ];
    for args in bad {
        let e = parse(args).expect_err(&format!("{args:?} was accepted"));
        assert!(
            matches!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
            ),
            "{args:?}: {:?} {e}",
            e.kind()
        );
    }
    let good: &[&[&str]] = &[
        &[
            "agent",
            "--poll-ms",
            "10",
            "--resync-secs",
            "86400",
            "--debounce-ms",
            "0",
        ],
        &[
            "agent",
            "--ring-size",
            "131071",
            "--flow-table-size",
            "1024",
            "--max-members",
            "16777216",
        ],
        &[
            "agent",
            "--maglev-seed",
            "18446744073709551615",
            "--timeout-secs",
            "3600",
        ],
        &["stats", "--watch", "--interval", "0.1", "--count", "0"],
        &["stats", "--watch", "--interval", "3600"],
        &["flows", "--limit", "1", "--proto", "udp"],
    ];
    for args in good {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    match parse(&["stats", "--interval", "0.25"]) {
        Ok(Cli {
            command: Command::Stats(a),
        }) => {
            assert_eq!(a.interval, std::time::Duration::from_millis(250))
        }
        other => panic!("{other:?}"),
    }
}
