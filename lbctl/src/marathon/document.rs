//! Reading a Marathon document: its shapes (`/v2/apps`, `/v2/apps/{id}`, groups, one app, an
//! array), app ids made absolute, and the parts of an app definition the derivation reads.
//! Each app is read on its own, so one malformed app cannot hide the others.
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// One app of a document: its absolute id and its definition, read into the fields the
/// derivation uses, or why it could not be read.
#[derive(Debug)]
pub struct DocApp {
    /// The app's absolute id; empty when the app has none.
    pub id: String,
    pub(crate) def: std::result::Result<App, String>,
}

impl DocApp {
    /// Reads the app definition `app` under the (absolute) id `id`.
    pub fn new(id: impl Into<String>, app: &Value) -> DocApp {
        DocApp {
            id: id.into(),
            def: App::deserialize(app).map_err(|e| format!("not a valid app definition: {e}")),
        }
    }
}

/// Parses a Marathon document: a `/v2/apps` body (`{"apps": [...]}`), a `/v2/apps/{id}` body
/// (`{"app": {...}}`), a `/v2/groups` body, one app, or an array of apps. Returns the apps
/// with absolute ids; `what` names the document in the error.
pub fn parse_document(text: &str, what: &str) -> Result<Vec<DocApp>> {
    let doc: Value = serde_json::from_str(text).map_err(|e| Error::Document {
        what: what.to_string(),
        reason: format!("invalid JSON: {e}"),
    })?;
    check_shape(&doc, "").map_err(|reason| Error::Document {
        what: what.to_string(),
        reason,
    })?;
    let mut apps = Vec::new();
    match &doc {
        Value::Array(items) => collect_apps(items, "/", &mut apps),
        Value::Object(o) if o.contains_key("app") => {
            collect_apps(std::slice::from_ref(&o["app"]), "/", &mut apps)
        }
        Value::Object(o) if o.contains_key("apps") || o.contains_key("groups") => {
            collect_group(&doc, "/", &mut apps, 0)
        }
        Value::Object(o) if o.contains_key("id") => {
            collect_apps(std::slice::from_ref(&doc), "/", &mut apps)
        }
        _ => {
            return Err(Error::Document {
                what: what.to_string(),
                reason: "expected {\"apps\": [...]}, {\"app\": {...}}, a group, an app or an array of apps".into(),
            });
        }
    }
    Ok(apps)
}

/// The JSON type of `v`, for errors.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses a document whose structure has the wrong type where the parser would otherwise
/// read nothing: `apps` and `groups` (at the top and in every group) must be arrays, `app` an
/// object. Read as "no apps", such a document would empty the load balancer; as an error, the
/// last good state is kept. `at` is the path of `doc` in the document (`""` at the top).
fn check_shape(doc: &Value, at: &str) -> std::result::Result<(), String> {
    let Value::Object(o) = doc else {
        return Ok(());
    };
    let is_group = at.is_empty() || o.contains_key("apps") || o.contains_key("groups");
    for (key, want_array) in [("apps", true), ("groups", true), ("app", false)] {
        let Some(v) = o.get(key) else { continue };
        if key == "app" && !at.is_empty() {
            continue;
        }
        let ok = if want_array {
            v.is_array()
        } else {
            v.is_object()
        };
        if is_group && !ok {
            let expected = if want_array { "an array" } else { "an object" };
            return Err(format!(
                "{at}{key} is {}, expected {expected}",
                type_name(v)
            ));
        }
    }
    if let Some(Value::Array(groups)) = o.get("groups") {
        for (i, g) in groups.iter().enumerate() {
            if !g.is_object() {
                return Err(format!(
                    "{at}groups[{i}] is {}, expected an object",
                    type_name(g)
                ));
            }
            check_shape(g, &format!("{at}groups[{i}]."))?;
        }
    }
    Ok(())
}

fn collect_group(group: &Value, parent: &str, out: &mut Vec<DocApp>, depth: usize) {
    let base = match group.get("id").and_then(Value::as_str) {
        Some(id) => absolute(id, parent),
        None => parent.to_string(),
    };
    if let Some(Value::Array(apps)) = group.get("apps") {
        collect_apps(apps, &base, out);
    }
    if depth < 64
        && let Some(Value::Array(groups)) = group.get("groups")
    {
        for g in groups {
            collect_group(g, &base, out, depth + 1);
        }
    }
}

fn collect_apps(items: &[Value], parent: &str, out: &mut Vec<DocApp>) {
    for app in items {
        let id = match app.get("id").and_then(Value::as_str) {
            Some(id) => absolute(id, parent),
            None => String::new(),
        };
        out.push(DocApp::new(id, app));
    }
}

/// An app id made absolute against its enclosing group.
fn absolute(id: &str, parent: &str) -> String {
    let id = id.trim();
    if id.starts_with('/') {
        return id.trim_end_matches('/').to_string();
    }
    let parent = parent.trim_end_matches('/');
    format!("{parent}/{}", id.trim_end_matches('/'))
}

// ---------------------------------------------------------------------------------------------
// The parts of an app definition the derivation reads. Unknown fields are ignored.
// ---------------------------------------------------------------------------------------------

/// An app definition, with its tasks when the document embeds them.
#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct App {
    pub(crate) port_definitions: Option<Vec<PortDefinition>>,
    pub(crate) ports: Option<Vec<Value>>,
    pub(crate) container: Option<Container>,
    pub(crate) networks: Option<Vec<Network>>,
    pub(crate) ip_address: Option<IpAddressSpec>,
    pub(crate) health_checks: Option<Vec<Value>>,
    pub(crate) tasks: Option<Vec<Task>>,
    /// `version` and `versionInfo` (for the order of named VIPs: `App::config_since`).
    pub(crate) version: Option<Value>,
    pub(crate) version_info: Option<Value>,
}

impl App {
    /// True when Marathon health-checks this app's tasks.
    pub(crate) fn has_health_checks(&self) -> bool {
        self.health_checks.as_ref().is_some_and(|h| !h.is_empty())
    }

    /// When this app's configuration last changed, as Marathon reports it
    /// (`versionInfo.lastConfigChangeAt`, else `version`): an ISO 8601 time, which sorts as text.
    pub(crate) fn config_since(&self) -> Option<String> {
        let info = self
            .version_info
            .as_ref()
            .and_then(|v| v.get("lastConfigChangeAt"));
        info.or(self.version.as_ref())
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// Labels of a port: key to value (a string, or any JSON a broken definition puts there).
pub(crate) type Labels = BTreeMap<String, Value>;

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct PortDefinition {
    pub(crate) protocol: Option<String>,
    pub(crate) labels: Option<Labels>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct PortMapping {
    pub(crate) container_port: Option<i64>,
    pub(crate) host_port: Option<i64>,
    pub(crate) protocol: Option<String>,
    pub(crate) labels: Option<Labels>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Container {
    pub(crate) port_mappings: Option<Vec<PortMapping>>,
    pub(crate) docker: Option<Docker>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Docker {
    pub(crate) network: Option<String>,
    pub(crate) port_mappings: Option<Vec<PortMapping>>,
}

/// Marathon ≤ 1.4: `ipAddress` puts the app on a container network; its `discovery.ports` are
/// the container ports.
#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct IpAddressSpec {
    pub(crate) discovery: Option<Discovery>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Discovery {
    pub(crate) ports: Option<Vec<DiscoveryPort>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct DiscoveryPort {
    pub(crate) number: Option<i64>,
    pub(crate) protocol: Option<String>,
    pub(crate) labels: Option<Labels>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Network {
    pub(crate) mode: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Task {
    pub(crate) id: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) ports: Option<Vec<Value>>,
    pub(crate) state: Option<String>,
    pub(crate) started_at: Option<Value>,
    pub(crate) ip_addresses: Option<Vec<TaskIp>>,
    pub(crate) health_check_results: Option<Vec<HealthResult>>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct TaskIp {
    pub(crate) ip_address: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct HealthResult {
    pub(crate) alive: Option<bool>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ids(doc: &str) -> Vec<String> {
        parse_document(doc, "d")
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect()
    }

    #[test]
    fn group_ids_are_resolved() {
        let doc = r#"{"id": "/", "groups": [{"id": "/qa", "apps": [{"id": "web"}], "groups": [
            {"id": "db", "apps": [{"id": "/abs"}, {"id": "mysql"}]}]}]}"#;
        assert_eq!(ids(doc), vec!["/qa/web", "/abs", "/qa/db/mysql"]);
    }

    #[test]
    fn every_shape_of_document() {
        assert_eq!(
            ids(r#"{"apps": [{"id": "/a"}, {"id": "b/"}]}"#),
            ["/a", "/b"]
        );
        assert_eq!(ids(r#"{"app": {"id": "/one"}}"#), ["/one"]);
        assert_eq!(ids(r#"{"id": "/alone"}"#), ["/alone"]);
        assert_eq!(ids(r#"[{"id": "/x"}, {"cmd": "no id"}]"#), ["/x", ""]);
    }

    #[test]
    fn not_json_or_not_a_document_is_a_clear_error() {
        let e = parse_document("{\"apps\": [", "apps.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("apps.json") && e.contains("invalid JSON"), "{e}");
        let e = parse_document("42", "apps.json").unwrap_err().to_string();
        assert!(e.contains("not a Marathon document"), "{e}");
    }

    /// A wrong type where the parser expects the list of apps or groups is an error naming
    /// it, never an empty document (which would remove every service).
    #[test]
    fn wrong_shapes_are_errors_naming_the_key() {
        for (doc, says) in [
            (r#"{"apps": null}"#, "apps is null, expected an array"),
            (
                r#"{"apps": {"id": "/a"}}"#,
                "apps is an object, expected an array",
            ),
            (r#"{"apps": "x"}"#, "apps is a string, expected an array"),
            (r#"{"apps": 3}"#, "apps is a number, expected an array"),
            (r#"{"groups": null}"#, "groups is null, expected an array"),
            (
                r#"{"apps": [], "groups": {}}"#,
                "groups is an object, expected an array",
            ),
            (r#"{"app": null}"#, "app is null, expected an object"),
            (r#"{"app": []}"#, "app is an array, expected an object"),
            (
                r#"{"id": "/", "groups": [{"id": "/qa", "apps": null}]}"#,
                "groups[0].apps is null, expected an array",
            ),
            (
                r#"{"groups": [7]}"#,
                "groups[0] is a number, expected an object",
            ),
        ] {
            let e = parse_document(doc, "snap").unwrap_err().to_string();
            assert!(e.contains("snap") && e.contains(says), "{doc}: {e}");
        }
        // The right shapes, empty ones included, are documents.
        assert!(ids(r#"{"apps": []}"#).is_empty());
        assert!(ids(r#"{"id": "/", "groups": [], "apps": []}"#).is_empty());
    }

    #[test]
    fn one_bad_app_is_kept_apart() {
        let apps = parse_document(
            r#"{"apps": [{"id": "/bad", "tasks": 7}, {"id": "/ok"}]}"#,
            "d",
        )
        .unwrap();
        let e = apps[0].def.as_ref().unwrap_err();
        assert!(e.starts_with("not a valid app definition"), "{e}");
        assert!(apps[1].def.is_ok());
    }
}
