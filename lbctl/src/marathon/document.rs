//! Reading a Marathon document: its shapes (`/v2/apps`, `/v2/apps/{id}`, groups, one app, an
//! array), app ids made absolute, and the parts of an app definition the derivation reads.
//! Each app is read on its own, so one malformed app cannot hide the others.
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::{Value, value::RawValue};
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
///
/// The document is never held as a whole tree: its levels are read as raw text
/// (`serde_json::value::RawValue`, borrowed from `text`) and each app is read from its own text
/// straight into `App`, so parsing takes a little more than the apps' fields, not many times
/// the document's size.
pub fn parse_document(text: &str, what: &str) -> Result<Vec<DocApp>> {
    Ok(split_document(text, what)?
        .iter()
        .map(RawApp::parse)
        .collect())
}

/// One app of a document, not read yet: the text of its definition (borrowed from the
/// document) and the id of the group that holds it.
#[derive(Debug)]
pub(crate) struct RawApp<'a> {
    /// The absolute id of the enclosing group (`/` at the top).
    pub(crate) parent: String,
    /// The app definition's JSON text.
    pub(crate) text: &'a str,
}

impl RawApp<'_> {
    /// Reads the app. A broken app (or one with a key given twice, which a typed read refuses)
    /// is read again as a tree, which keeps the last of a repeated key: the same app and the
    /// same error as from a whole-tree parse.
    pub(crate) fn parse(&self) -> DocApp {
        match serde_json::from_str::<App>(self.text) {
            Ok(def) => DocApp {
                id: match string(def.id.as_deref()) {
                    Some(id) => absolute(&id, &self.parent),
                    None => String::new(),
                },
                def: Ok(def),
            },
            Err(_) => {
                let tree: Value = serde_json::from_str(self.text).unwrap_or(Value::Null);
                let id = match tree.get("id").and_then(Value::as_str) {
                    Some(id) => absolute(id, &self.parent),
                    None => String::new(),
                };
                DocApp::new(id, &tree)
            }
        }
    }
}

/// The apps of a Marathon document (see [`parse_document`]) as text, in document order, each
/// with its enclosing group. The document's structure is checked here; each app's definition
/// is left to [`RawApp::parse`]. A `/v2/apps` body is read in one pass.
pub(crate) fn split_document<'a>(text: &'a str, what: &str) -> Result<Vec<RawApp<'a>>> {
    let fail = |reason: String| Error::Document {
        what: what.to_string(),
        reason,
    };
    let invalid = |e: serde_json::Error| fail(format!("invalid JSON: {e}"));
    let mut apps = Vec::new();
    match first_byte(text) {
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(invalid)?;
            collect_apps(items, "/", &mut apps);
        }
        Some(b'{') => {
            let doc: Level = serde_json::from_str(text).map_err(invalid)?;
            check_shape(&doc, "").map_err(fail)?;
            if let Some(app) = doc.app {
                collect_apps(vec![app], "/", &mut apps);
            } else if doc.apps.is_some() || doc.groups.is_some() {
                collect_group(&doc, "/", &mut apps, 0);
            } else if doc.id.is_some() {
                let one: &RawValue = serde_json::from_str(text).map_err(invalid)?;
                collect_apps(vec![one], "/", &mut apps);
            } else {
                return Err(fail(EXPECTED.into()));
            }
        }
        _ => {
            // Not an object or an array: still invalid JSON, or a document of the wrong kind.
            serde_json::from_str::<&RawValue>(text).map_err(invalid)?;
            return Err(fail(EXPECTED.into()));
        }
    }
    Ok(apps)
}

const EXPECTED: &str =
    "expected {\"apps\": [...]}, {\"app\": {...}}, a group, an app or an array of apps";

/// The first byte of `text` that is not JSON white space.
fn first_byte(text: &str) -> Option<u8> {
    text.bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// The keys of a document's level (the top, or a group) that the reader looks at, each kept as
/// the raw text of its value (`null` included); every other key is skipped without being kept.
/// A key given twice keeps its last value, as a whole-tree parse would.
#[derive(Default)]
struct Level<'a> {
    id: Option<&'a RawValue>,
    apps: Option<Items<'a>>,
    groups: Option<Items<'a>>,
    app: Option<&'a RawValue>,
}

/// The value of a level's `apps` or `groups`: the raw text of each item when it is an array
/// (read in the same pass as the level), else the JSON type it has, for the error.
enum Items<'a> {
    Array(Vec<&'a RawValue>),
    Not(&'static str),
}

impl<'de> Deserialize<'de> for Items<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Kind;
        impl<'de> serde::de::Visitor<'de> for Kind {
            type Value = Items<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Items<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Items::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Items<'de>, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Items::Not("an object"))
            }
            fn visit_unit<E>(self) -> std::result::Result<Items<'de>, E> {
                Ok(Items::Not("null"))
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Items<'de>, E> {
                Ok(Items::Not("a boolean"))
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Items<'de>, E> {
                Ok(Items::Not("a string"))
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Items<'de>, E> {
                Ok(Items::Not("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Items<'de>, E> {
                Ok(Items::Not("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Items<'de>, E> {
                Ok(Items::Not("a number"))
            }
        }
        d.deserialize_any(Kind)
    }
}

impl<'a> Items<'a> {
    fn array(&self) -> Option<&[&'a RawValue]> {
        match self {
            Items::Array(items) => Some(items),
            Items::Not(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Level<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = Level<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Level<'de>, A::Error> {
                let mut level = Level::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "id" => level.id = Some(map.next_value()?),
                        "apps" => level.apps = Some(map.next_value()?),
                        "groups" => level.groups = Some(map.next_value()?),
                        "app" => level.app = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(level)
            }
        }
        d.deserialize_map(Keys)
    }
}

/// The JSON type of the raw value `v`, for errors.
fn type_name(v: &RawValue) -> &'static str {
    match first_byte(v.get()) {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

/// A raw JSON string's text (None when `v` is not a string).
fn string(v: Option<&RawValue>) -> Option<String> {
    v.filter(|v| first_byte(v.get()) == Some(b'"'))
        .and_then(|v| serde_json::from_str(v.get()).ok())
}

/// Refuses a document whose structure has the wrong type where the parser would otherwise
/// read nothing: `apps` and `groups` (at the top and in every group) must be arrays, `app` an
/// object. Read as "no apps", such a document would empty the load balancer; as an error, the
/// last good state is kept. `at` is the path of `doc` in the document (`""` at the top).
fn check_shape(doc: &Level, at: &str) -> std::result::Result<(), String> {
    let is_group = at.is_empty() || doc.apps.is_some() || doc.groups.is_some();
    if is_group {
        for (key, items) in [("apps", &doc.apps), ("groups", &doc.groups)] {
            if let Some(Items::Not(kind)) = items {
                return Err(format!("{at}{key} is {kind}, expected an array"));
            }
        }
        if let Some(app) = doc.app.filter(|_| at.is_empty())
            && first_byte(app.get()) != Some(b'{')
        {
            return Err(format!("{at}app is {}, expected an object", type_name(app)));
        }
    }
    if let Some(groups) = doc.groups.as_ref().and_then(Items::array) {
        for (i, g) in groups.iter().enumerate() {
            if first_byte(g.get()) != Some(b'{') {
                return Err(format!(
                    "{at}groups[{i}] is {}, expected an object",
                    type_name(g)
                ));
            }
            let level: Level = serde_json::from_str(g.get()).map_err(|e| e.to_string())?;
            check_shape(&level, &format!("{at}groups[{i}]."))?;
        }
    }
    Ok(())
}

fn collect_group<'a>(group: &Level<'a>, parent: &str, out: &mut Vec<RawApp<'a>>, depth: usize) {
    let base = match string(group.id) {
        Some(id) => absolute(&id, parent),
        None => parent.to_string(),
    };
    if let Some(apps) = group.apps.as_ref().and_then(Items::array) {
        collect_apps(apps.to_vec(), &base, out);
    }
    if depth < 64
        && let Some(groups) = group.groups.as_ref().and_then(Items::array)
    {
        for g in groups {
            if let Ok(level) = serde_json::from_str::<Level>(g.get()) {
                collect_group(&level, &base, out, depth + 1);
            }
        }
    }
}

fn collect_apps<'a>(items: Vec<&'a RawValue>, parent: &str, out: &mut Vec<RawApp<'a>>) {
    out.extend(items.into_iter().map(|app| RawApp {
        parent: parent.to_string(),
        text: app.get(),
    }));
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
    /// The app's id as written (a string, or anything a broken document puts there).
    pub(crate) id: Option<Box<RawValue>>,
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

    /// A key given twice keeps its last value, at every level (as a whole-tree parse does).
    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        assert_eq!(
            ids(r#"{"apps": [{"id": "/x"}], "apps": [{"id": "/y", "id": "/z"}]}"#),
            ["/z"]
        );
        assert_eq!(
            ids(r#"{"id": "/", "groups": [{"id": "/a", "id": "/b", "apps": [{"id": "c"}]}]}"#),
            ["/b/c"]
        );
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
