//! Every Marathon document under tests/fixtures/marathon/render (copied from the shared fixtures), run through the real
//! `lbctl render --json`, must give what its `.expect.json` says (in the fixtures' reduced form).
// Test code: a panic with its message is how a fixture fails.
#![allow(clippy::expect_used, clippy::unwrap_used)]
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/marathon/render");
    assert!(
        dir.is_dir(),
        "{} is missing: the fixtures are part of the repository",
        dir.display()
    );
    dir
}

/// The reduced form of render's output that the fixtures record.
fn reduce(out: &Value) -> Value {
    let mut services: Vec<Value> = out["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            let key = match s["name"].as_str() {
                Some(name) => {
                    let port = s["vip"].as_str().and_then(|v| v.rsplit_once(':')).map(|p| p.1).unwrap_or("");
                    format!("{name}:{port}")
                }
                None => s["vip"].as_str().unwrap_or("").to_string(),
            };
            let backends: Vec<Value> = s["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .map(|b| json!([b["address"], b["state"]]))
                .collect();
            json!({"key": key, "protocol": s["protocol"], "name": s["name"], "apps": s["apps"], "backends": backends})
        })
        .collect();
    services.sort_by_key(|s| (s["key"].to_string(), s["protocol"].to_string()));
    let problems: Vec<Value> = out["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| json!([p["app"], p["port_index"], p["label"]]))
        .collect();
    json!({"services": services, "problems": problems})
}

fn sorted(expect: &Value) -> Value {
    let mut e = expect.clone();
    if let Some(s) = e["services"].as_array_mut() {
        s.sort_by_key(|s| (s["key"].to_string(), s["protocol"].to_string()));
    }
    e
}

#[test]
fn every_render_fixture() {
    let dir = fixtures_dir();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p.to_string_lossy().ends_with(".expect.json")
        })
        .collect();
    names.sort();
    assert!(names.len() >= 60, "only {} fixtures found", names.len());
    let mut failures = Vec::new();
    for input in &names {
        let expect_path = input.with_extension("expect.json");
        let expect: Value = serde_json::from_str(
            &std::fs::read_to_string(&expect_path)
                .unwrap_or_else(|e| panic!("{}: {e}", expect_path.display())),
        )
        .expect("expect file is JSON");
        let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
            .args(["render", "--json"])
            .arg(input)
            .output()
            .expect("running lbctl render");
        let name = input
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if expect.get("error").is_some() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success()
                || !stderr.contains("not a Marathon document")
                || !stderr.contains(&name)
            {
                failures.push(format!(
                    "{name}: expected a failure naming the file, got {} / {stderr}",
                    out.status
                ));
            }
            continue;
        }
        if !out.status.success() {
            failures.push(format!(
                "{name}: render failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        let got: Value = serde_json::from_slice(&out.stdout).expect("render --json prints JSON");
        let (got, want) = (reduce(&got), sorted(&expect));
        if got != want {
            failures.push(format!(
                "{name}:\n  got  {}\n  want {}",
                serde_json::to_string(&got).unwrap_or_default(),
                serde_json::to_string(&want).unwrap_or_default()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures differ:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}
