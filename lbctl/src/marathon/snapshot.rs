//! A document read for derivation ([`Snapshot`]), and what lets the agent derive only the apps
//! that changed since the last document ([`AppCache`]).
//!
//! What an app contributes depends on the document only through the app's own text, the group
//! that holds it, the options, and what the task host names it reads resolved to
//! (`derive::names_read`). So an app whose text, group and host answers are those of an app
//! derived before, under the same options, contributes what that app did: the cache keeps each
//! app's result under a key of its text and group, and a document of 10,000 apps in which one
//! task moved costs one app's parse and derivation, plus a pass over the document's text (split
//! and hash).
use super::{
    derive::{AppResult, derive_app, host_names, names_read},
    document::{DocApp, RawApp, split_document},
    options::Options,
    tasks::{Hosts, Lookup, Resolve},
};
use crate::error::Result;
use std::{
    collections::{BTreeSet, HashMap, hash_map::RandomState},
    hash::{BuildHasher, Hasher},
    ops::Range,
    sync::{Arc, Mutex, OnceLock},
};

/// A document read for derivation: its apps, and the addresses of the task hosts they name.
#[derive(Debug)]
pub struct Snapshot {
    /// The document's text: the apps are spans of it.
    text: String,
    apps: Vec<SnapApp>,
    hosts: Hosts,
}

#[derive(Debug)]
struct SnapApp {
    /// The absolute id of the group holding the app.
    parent: String,
    /// The app definition's text in the document.
    span: Range<usize>,
    /// `key_hashes(parent, text)`: the app's key in the cache.
    hash: Key,
    read: Read,
}

#[derive(Debug)]
enum Read {
    /// Not read yet.
    Not,
    /// Read from its text.
    Parsed(Box<DocApp>),
    /// The same text, under the same group, as an app the cache holds.
    Known(Arc<Known>),
}

impl Snapshot {
    /// Parses `text` (`what` names it in errors) and resolves, with `resolver`, the task host
    /// names that deriving it will read. A document that is not one is an error; a malformed
    /// app is not (it becomes that app's problem when derived).
    pub fn read(text: &str, what: &str, resolver: &dyn Resolve) -> Result<Snapshot> {
        let mut snapshot = Snapshot::parse(text, what)?;
        snapshot.resolve_hosts(resolver);
        Ok(snapshot)
    }

    /// Checks `text`'s structure and finds its apps, without reading them yet (see
    /// [`Snapshot::resolve_hosts`]).
    pub fn parse(text: &str, what: &str) -> Result<Snapshot> {
        Snapshot::parse_owned(text.to_string(), what)
    }

    /// [`Snapshot::parse`] of a text the snapshot keeps (no copy of it is made).
    pub fn parse_owned(text: String, what: &str) -> Result<Snapshot> {
        let base = text.as_ptr() as usize;
        let apps = split_document(&text, what)?
            .into_iter()
            .map(|raw| {
                let start = raw.text.as_ptr() as usize - base;
                SnapApp {
                    hash: key_hashes(&raw.parent, raw.text),
                    span: start..start + raw.text.len(),
                    parent: raw.parent,
                    read: Read::Not,
                }
            })
            .collect();
        Ok(Snapshot {
            text,
            apps,
            hosts: Hosts::default(),
        })
    }

    /// Reads every app and resolves, with `resolver`, the task host names that deriving them
    /// will read.
    pub fn resolve_hosts(&mut self, resolver: &dyn Resolve) {
        self.resolve_hosts_with(resolver, None);
    }

    /// [`Snapshot::resolve_hosts`], where an app that `cache` holds is not read again: the
    /// names it needs are those it needed then.
    pub fn resolve_hosts_with(&mut self, resolver: &dyn Resolve, cache: Option<&AppCache>) {
        {
            let entries = cache.map(AppCache::lock);
            for app in &mut self.apps {
                if !matches!(app.read, Read::Not) {
                    continue;
                }
                let text = &self.text[app.span.clone()];
                let known = entries.as_ref().and_then(|e| e.find(app.hash));
                app.read = match known {
                    Some(k) => Read::Known(k),
                    None => Read::Parsed(Box::new(raw(&app.parent, text).parse())),
                };
            }
        }
        let mut names = BTreeSet::new();
        for app in &self.apps {
            match &app.read {
                Read::Parsed(doc) => host_names(doc, &mut names),
                Read::Known(k) => names.extend(k.resolve.iter().map(String::as_str)),
                Read::Not => {}
            }
        }
        self.hosts = Hosts::resolve(names, resolver);
    }

    /// What each app contributes, in document order. Pure: reads only this snapshot.
    pub fn derive_apps(&self, opts: &Options) -> Vec<AppResult> {
        self.apps
            .iter()
            .map(|app| match &app.read {
                Read::Parsed(doc) => derive_app(doc, opts, &self.hosts),
                _ => derive_app(&self.raw(app).parse(), opts, &self.hosts),
            })
            .collect()
    }

    /// [`Snapshot::derive_apps`], taking from `cache` the result of every app it holds whose
    /// host names resolved as they did then, under the same options. Afterwards `cache` holds
    /// exactly this document's apps.
    pub fn derive_cached(&self, opts: &Options, cache: &AppCache) -> Vec<Arc<AppResult>> {
        let mut entries = cache.lock();
        if entries.opts.as_ref() != Some(opts) {
            entries.by_hash.clear();
            entries.opts = Some(opts.clone());
            entries.generation += 1;
        }
        let generation = entries.generation;
        let mut next: HashMap<u64, Vec<Arc<Known>>> = HashMap::with_capacity(self.apps.len());
        let mut out = Vec::with_capacity(self.apps.len());
        for app in &self.apps {
            let known = match &app.read {
                Read::Known(k) => Some(k.clone()),
                _ => entries.find(app.hash).or_else(|| find(&next, app.hash)),
            };
            let known = known.filter(|k| k.generation == generation && k.holds(&self.hosts));
            let known = known.unwrap_or_else(|| {
                let parsed;
                let doc = match &app.read {
                    Read::Parsed(doc) => doc,
                    _ => {
                        parsed = self.raw(app).parse();
                        &parsed
                    }
                };
                Arc::new(Known::new(app.hash, doc, opts, &self.hosts, generation))
            });
            out.push(known.result.clone());
            let bucket = next.entry(app.hash.0).or_default();
            if !bucket.iter().any(|b| Arc::ptr_eq(b, &known)) {
                bucket.push(known);
            }
        }
        entries.by_hash = next;
        out
    }

    /// The task hosts that were resolved for this document.
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }

    /// The document's app ids, in document order (each app read for it).
    pub fn app_ids(&self) -> Vec<String> {
        self.apps
            .iter()
            .map(|app| match &app.read {
                Read::Parsed(doc) => doc.id.clone(),
                Read::Known(k) => k.result.id.clone(),
                Read::Not => self.raw(app).parse().id,
            })
            .collect()
    }

    fn raw(&self, app: &SnapApp) -> RawApp<'_> {
        raw(&app.parent, &self.text[app.span.clone()])
    }
}

fn raw<'a>(parent: &str, text: &'a str) -> RawApp<'a> {
    RawApp {
        parent: parent.to_string(),
        text,
    }
}

/// What an app is known by: two hashes of its group and its text, each SipHash under keys drawn
/// at random once per process. The cache keeps these 128 bits rather than the text (8.5 MB at
/// 10,000 apps): without the keys no document can be written to make two apps collide, and by
/// chance two texts share them with a probability of 2^-128.
type Key = (u64, u64);

fn key_hashes(parent: &str, text: &str) -> Key {
    static KEYS: OnceLock<[RandomState; 2]> = OnceLock::new();
    let keys = KEYS.get_or_init(|| [RandomState::new(), RandomState::new()]);
    let hash = |keys: &RandomState| {
        let mut h = keys.build_hasher();
        h.write(parent.as_bytes());
        // Not UTF-8: no group id and text can run into each other.
        h.write_u8(0xff);
        h.write(text.as_bytes());
        h.finish()
    };
    (hash(&keys[0]), hash(&keys[1]))
}

/// The apps of the last document derived, each with what it contributed: shared by the agent's
/// source (which then does not read an app it holds) and its reconciler (which then does not
/// derive it again).
#[derive(Clone, Debug, Default)]
pub struct AppCache(Arc<Mutex<Entries>>);

impl AppCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The entries are replaced whole once built: a panic elsewhere leaves them consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of apps held.
    pub fn len(&self) -> usize {
        self.lock().by_hash.values().map(Vec::len).sum()
    }

    /// True when no app is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Default)]
struct Entries {
    /// The options the entries were derived with.
    opts: Option<Options>,
    /// Changes with the options: an entry of another generation is derived again.
    generation: u64,
    by_hash: HashMap<u64, Vec<Arc<Known>>>,
}

impl Entries {
    fn find(&self, key: Key) -> Option<Arc<Known>> {
        find(&self.by_hash, key)
    }
}

fn find(by_hash: &HashMap<u64, Vec<Arc<Known>>>, key: Key) -> Option<Arc<Known>> {
    by_hash.get(&key.0)?.iter().find(|k| k.key == key).cloned()
}

/// An app derived before: its key (of its text and group), what it contributed, and the host
/// names its derivation read with their answers then.
#[derive(Debug)]
pub(crate) struct Known {
    key: Key,
    generation: u64,
    result: Arc<AppResult>,
    /// The names to resolve before deriving it (`derive::host_names`).
    resolve: Vec<String>,
    /// Every name its derivation looked up, with the answer it had.
    reads: Vec<(String, Option<Lookup>)>,
}

impl Known {
    fn new(key: Key, doc: &DocApp, opts: &Options, hosts: &Hosts, generation: u64) -> Known {
        let mut resolve = BTreeSet::new();
        host_names(doc, &mut resolve);
        let mut reads = BTreeSet::new();
        names_read(doc, &mut reads);
        Known {
            key,
            generation,
            result: Arc::new(derive_app(doc, opts, hosts)),
            resolve: resolve.into_iter().map(str::to_string).collect(),
            reads: reads
                .into_iter()
                .map(|n| (n.to_string(), hosts.lookup(n)))
                .collect(),
        }
    }

    /// True when every name the derivation read resolves in `hosts` as it did then.
    fn holds(&self, hosts: &Hosts) -> bool {
        self.reads.iter().all(|(n, was)| hosts.lookup(n) == *was)
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
