//! Something in a document that could not be turned into a service or backend, naming where.
use serde::{Deserialize, Serialize};

/// Something in the document that could not be turned into a service or backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The app's absolute id (none when the app has no id).
    pub app: Option<String>,
    /// The task, for a problem of one task.
    pub task: Option<String>,
    /// The index of the port (port definition, port mapping or discovery port).
    pub port_index: Option<usize>,
    /// The label's key, for a problem of one label.
    pub label: Option<String>,
    /// The value at fault (a label's value, a named VIP's name).
    pub value: Option<String>,
    /// What is wrong, for people.
    pub reason: String,
}

impl Problem {
    /// A problem of the app as a whole.
    pub(crate) fn of_app(app: &str, reason: String) -> Problem {
        Problem {
            app: Some(app.to_string()).filter(|s| !s.is_empty()),
            task: None,
            port_index: None,
            label: None,
            value: None,
            reason,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "app {}", self.app.as_deref().unwrap_or("(no id)"))?;
        if let Some(t) = &self.task {
            write!(f, ", task {t}")?;
        }
        if let Some(i) = self.port_index {
            write!(f, ", port {i}")?;
        }
        if let Some(l) = &self.label {
            write!(f, ", label {l}")?;
            if let Some(v) = &self.value {
                write!(f, "={v:?}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}
