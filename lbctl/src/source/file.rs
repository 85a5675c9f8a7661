//! A Marathon document on disk, re-read whenever it changes.
use super::update::{Update, sleep_unless};
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    time::{Duration, SystemTime},
};

/// Sends the file's document whenever its text changes (checked every `poll`); a read error is
/// reported once until it changes. Returns when `stop` is set or the receiver is gone.
pub fn watch_file(path: PathBuf, poll: Duration, tx: Sender<Update>, stop: Arc<AtomicBool>) {
    watch_file_with(path, poll, tx, stop, Arc::new(AtomicBool::new(false)));
}

/// [`watch_file`], also re-reading and sending the document, changed or not, whenever `again`
/// is set (the removal guard asks for a confirming snapshot so).
pub fn watch_file_with(
    path: PathBuf,
    poll: Duration,
    tx: Sender<Update>,
    stop: Arc<AtomicBool>,
    again: Arc<AtomicBool>,
) {
    let mut last_seen: Option<(SystemTime, u64)> = None;
    let mut last_text: Option<String> = None;
    let mut last_error: Option<String> = None;
    let from = path.display().to_string();
    while !stop.load(Ordering::Relaxed) {
        let seen = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let asked = again.swap(false, Ordering::Relaxed);
        if asked || seen != last_seen || last_text.is_none() {
            last_seen = seen;
            let update = match std::fs::read_to_string(&path) {
                Ok(text) if asked || Some(&text) != last_text.as_ref() => {
                    last_error = None;
                    let update = Update::document(text.clone(), from.clone());
                    last_text = Some(text);
                    Some(update)
                }
                Ok(_) => None,
                Err(e) => {
                    let e = format!("cannot read {from}: {e}");
                    (last_error.as_ref() != Some(&e)).then(|| {
                        last_error = Some(e.clone());
                        Update::Failed(e)
                    })
                }
            };
            if let Some(u) = update
                && tx.send(u).is_err()
            {
                return;
            }
        }
        sleep_unless(&stop, poll);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn next(rx: &mpsc::Receiver<Update>) -> Update {
        rx.recv_timeout(Duration::from_secs(5)).expect("an update")
    }

    #[test]
    fn follows_changes_and_reports_errors_once() {
        let dir = std::env::temp_dir().join(format!("lbctl-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("apps.json");
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (path.clone(), stop.clone());
        let watcher = std::thread::spawn(move || watch_file(p, Duration::from_millis(10), tx, s));
        match next(&rx) {
            Update::Failed(e) => assert!(e.contains("apps.json"), "{e}"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, r#"{"apps": [{"id": "/a"}]}"#).unwrap();
        match next(&rx) {
            Update::Document { snapshot, from } => {
                assert_eq!(from, path.display().to_string());
                assert_eq!(snapshot.unwrap().app_ids(), ["/a"]);
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, "not json, and longer").unwrap();
        match next(&rx) {
            Update::Document { snapshot, .. } => {
                assert!(snapshot.unwrap_err().contains("invalid JSON"));
            }
            other => panic!("{other:?}"),
        }
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
        // The missing file was reported once, not at every poll.
        assert!(rx.try_iter().next().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
