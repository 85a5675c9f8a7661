//! Tests of the settings: the file, the layering, the checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn toml(text: &str) -> Settings {
    Settings::from_toml(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn the_example_config_parses() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
    let s = Settings::from_file(&p).expect("examples/agent.toml");
    let cfg = s.agent_config().expect("valid");
    assert!(matches!(cfg.source, Source::Marathon { .. }));
    assert_eq!(cfg.ifaces, vec!["eth0".to_string()]);
}

/// Every key of the file reaches what the agent runs with.
#[test]
fn every_key_of_the_file_reaches_the_agent() {
    let s = toml(
        r#"
marathon = ["http://m1:8080", "http://m2:8080"]
iface = ["eth0", "eth1"]
pin_dir = "/sys/fs/bpf/t1"
vip_range = ["10.1.0.0/16"]
named_vip_pool = "11.2.0.0/16"
framework = "fw"
resync_secs = 7
debounce_ms = 9
timeout_secs = 3
ca_file = "/etc/ca.pem"
status_socket = "/tmp/t1.sock"
metrics_listen = "127.0.0.1:9101"
bpf_log = true
ring_size = 1021
maglev_seed = 42
flow_table_size = 4096
max_services = 10
max_backends = 20
max_members = 30
[auth]
user = "u"
password = "p"
"#,
    );
    let cfg = s.agent_config().expect("valid");
    let Source::Marathon {
        client,
        resync,
        debounce,
    } = &cfg.source
    else {
        panic!("{:?}", cfg.source);
    };
    assert_eq!(client.urls, ["http://m1:8080", "http://m2:8080"]);
    assert_eq!(client.ca_file, Some(PathBuf::from("/etc/ca.pem")));
    assert_eq!(client.timeout, Duration::from_secs(3));
    assert!(
        matches!(&client.auth, Auth::Basic { user, password } if user == "u" && password == "p")
    );
    assert_eq!(
        (*resync, *debounce),
        (Duration::from_secs(7), Duration::from_millis(9))
    );
    assert_eq!(cfg.ifaces, ["eth0", "eth1"]);
    assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/t1"));
    assert_eq!(cfg.status_socket, PathBuf::from("/tmp/t1.sock"));
    assert_eq!(
        cfg.metrics_listen,
        Some("127.0.0.1:9101".parse().expect("address"))
    );
    assert!(cfg.bpf_log);
    let want_ranges: Vec<Cidr> = vec!["10.1.0.0/16".parse().expect("cidr")];
    assert_eq!(cfg.options.vip_ranges, want_ranges);
    assert_eq!(cfg.options.named_pool, "11.2.0.0/16".parse().expect("cidr"));
    assert_eq!(cfg.options.framework, "fw");
    let t = cfg.table;
    assert_eq!(
        (t.size, t.seed, t.flows, t.services, t.backends, t.members),
        (1021, 42, 4096, 10, 20, 30)
    );

    // The keys only a file source has.
    let s =
        toml("apps = \"/tmp/a.json\"\niface = [\"eth0\"]\npoll_ms = 77\n[auth]\ntoken = \"t\"\n");
    let cfg = s.agent_config().expect("valid");
    assert!(matches!(
        &cfg.source,
        Source::File { path, poll } if path == &PathBuf::from("/tmp/a.json") && *poll == Duration::from_millis(77)
    ));
    let s = toml(
        "marathon = [\"http://m\"]\niface = [\"eth0\"]\n[auth]\ntoken_file = \"/nonexistent/token\"\n",
    );
    let e = s
        .agent_config()
        .expect_err("the token file is read")
        .to_string();
    assert!(e.contains("/nonexistent/token"), "{e}");
}

#[test]
fn the_defaults_are_the_documented_ones() {
    let cfg = toml("marathon = [\"http://m\"]\niface = [\"eth0\"]\n")
        .agent_config()
        .expect("valid");
    let Source::Marathon {
        client,
        resync,
        debounce,
    } = &cfg.source
    else {
        panic!("{:?}", cfg.source);
    };
    assert_eq!(client.timeout, Duration::from_secs(10));
    assert_eq!(
        (*resync, *debounce),
        (Duration::from_secs(30), Duration::from_millis(500))
    );
    assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/lb"));
    assert_eq!(cfg.status_socket, PathBuf::from("/run/lb/agent.sock"));
    assert_eq!(cfg.metrics_listen, None);
    assert!(!cfg.bpf_log);
    assert_eq!(cfg.table, dataplane::TableConfig::default());
    let cfg = toml("apps = \"a.json\"\niface = [\"eth0\"]\n")
        .agent_config()
        .expect("valid");
    assert!(matches!(cfg.source, Source::File { poll, .. } if poll == Duration::from_millis(250)));
}

#[test]
fn flags_override_the_file_and_secrets_stay_hidden() {
    let file = toml(
        "marathon = [\"http://m1:8080\"]\niface = [\"eth0\"]\n[auth]\nuser = \"lb\"\npassword = \"s3cret\"\n",
    );
    let flags = Settings {
        iface: vec!["eth1".into()],
        resync_secs: Some(5),
        status_socket: Some("/tmp/s.sock".into()),
        metrics_listen: Some("127.0.0.1:9100".into()),
        ..Default::default()
    };
    let s = file.overridden_by(flags);
    assert_eq!(s.iface, vec!["eth1".to_string()]);
    assert_eq!(s.marathon, vec!["http://m1:8080".to_string()]);
    assert_eq!(s.resync_secs, Some(5));
    let cfg = s.agent_config().expect("valid");
    assert_eq!(cfg.status_socket, PathBuf::from("/tmp/s.sock"));
    assert_eq!(
        cfg.metrics_listen,
        Some("127.0.0.1:9100".parse().expect("address"))
    );
    let shown = s.to_toml_redacted().expect("printable");
    assert!(
        !shown.contains("s3cret") && shown.contains("(hidden)"),
        "{shown}"
    );
    assert!(!format!("{s:?}").contains("s3cret"));
    // What --print-config prints reads back as the same settings (secrets aside).
    let mut back = toml(&shown);
    back.auth.password = Some("s3cret".into());
    assert_eq!(back, s);
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    for (text, named) in [
        ("ifaces = [\"eth0\"]", "ifaces"),
        ("ring_sise = 1021", "ring_sise"),
        ("[auth]\nusr = \"x\"", "usr"),
        ("ring_size = \"big\"", "big"),
        ("poll_ms = -1", "poll_ms"),
    ] {
        let e = Settings::from_toml(text).expect_err(text);
        assert!(e.contains(named), "{text}: {e}");
    }
    let s = Settings {
        apps: Some("a.json".into()),
        marathon: vec!["http://m".into()],
        iface: vec!["eth0".into()],
        ..Default::default()
    };
    assert!(
        s.agent_config()
            .expect_err("two sources")
            .to_string()
            .contains("not both")
    );
    for (key, value) in [
        ("vip_range", "[\"10.0.0.0/33\"]"),
        ("named_vip_pool", "\"11.0.0.0/40\""),
        ("metrics_listen", "\"localhost\""),
        ("poll_ms", "5"),
        ("resync_secs", "0"),
        ("debounce_ms", "600001"),
        ("timeout_secs", "0"),
        ("ring_size", "1024"),
        ("flow_table_size", "1"),
        ("max_services", "0"),
        ("max_backends", "0"),
        ("max_members", "0"),
    ] {
        let text = format!("apps = \"a.json\"\niface = [\"eth0\"]\n{key} = {value}\n");
        let e = toml(&text).agent_config().expect_err(&text).to_string();
        let what = key.trim_start_matches("max_").replace('_', " ");
        assert!(
            e.contains(key) || e.contains(&what) || e.contains("Maglev table size"),
            "{key} = {value}: {e}"
        );
    }
}

#[test]
fn sizes_come_from_the_file_and_the_flags() {
    let file = toml(
        "apps = \"a.json\"\niface = [\"eth0\"]\nring_size = 1021\nmax_services = 100000\nmax_backends = 50000\n",
    );
    let flags = Settings {
        table: TableSettings {
            max_members: Some(500_000),
            max_services: Some(20_000),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = file
        .overridden_by(flags)
        .agent_config()
        .expect("valid")
        .table;
    assert_eq!(
        (t.size, t.services, t.backends, t.members),
        (1021, 20_000, 50_000, 500_000)
    );
    assert_eq!(
        t.table_bytes(),
        64 * 64,
        "1021 slots take 64 elements of 64 bytes"
    );
    assert_eq!(t.full_tables_bytes(), 20_000 * 64 * 64);
    let defaults = TableSettings::default().table().expect("defaults");
    assert_eq!(defaults, dataplane::TableConfig::default());
    assert_eq!(
        defaults.table_bytes(),
        64 << 10,
        "64 KiB a table at the defaults"
    );
    assert_eq!(
        defaults.full_tables_bytes(),
        64 << 20,
        "64 MiB of tables when all 1024 services are in use"
    );
}

/// Deadlines and limits: their defaults, the file's keys, and their ranges.
#[test]
fn limits_reach_the_client_and_are_range_checked() {
    let limits = |text: &str| match toml(text).agent_config().map(|c| c.source) {
        Ok(Source::Marathon { client, .. }) => Ok(client.limits),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.to_string()),
    };
    let base = "marathon = [\"http://m:8080\"]\niface = [\"eth0\"]\n";
    let d = limits(base).unwrap();
    assert_eq!(d.stream_idle, Duration::from_secs(60));
    assert_eq!(d.max_snapshot, 256 << 20);
    assert_eq!(d.max_event_line, 1 << 20);
    let l = limits(&format!(
        "{base}stream_idle_secs = 2\nmax_snapshot_mib = 3\nmax_event_line_kib = 4\n"
    ))
    .unwrap();
    assert_eq!(l.stream_idle, Duration::from_secs(2));
    assert_eq!(l.max_snapshot, 3 << 20);
    assert_eq!(l.max_event_line, 4 << 10);
    for (key, bad) in [
        ("stream_idle_secs", "0"),
        ("max_snapshot_mib", "0"),
        ("max_snapshot_mib", "5000"),
        ("max_event_line_kib", "0"),
    ] {
        let e = limits(&format!("{base}{key} = {bad}\n")).unwrap_err();
        assert!(e.contains(key), "{key} = {bad}: {e}");
    }
}
