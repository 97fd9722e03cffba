//! Live folders: after an index run, file-system events (the `notify` crate: inotify on
//! Linux) tell which paths changed; each burst of events is indexed as a set of paths
//! (new files embedded, changed ones re-embedded, vanished ones retired, a folder moved
//! in walked) without re-walking the tree. When the system cannot watch everything
//! (inotify's `max_user_watches`) or reports lost events, the roots are rescanned in
//! full instead, periodically, and the caller is told why.

use crate::{IndexOptions, IndexReport, Library, Result};
use magpie_core::ImageEmbedder;
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the watch behaves.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Events are gathered until none came for this long, then indexed together.
    pub debounce: Duration,
    /// When events cannot be had: the time between full rescans.
    pub rescan_every: Duration,
    /// Force periodic rescans even when watching works (for tests and odd file systems).
    pub poll_only: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self { debounce: Duration::from_millis(750), rescan_every: Duration::from_secs(300), poll_only: false }
    }
}

/// What the watch reports as it goes.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// Watching the roots for changes.
    Watching { roots: Vec<PathBuf> },
    /// Events cannot be had; rescanning every `every` instead (the reason says why,
    /// e.g. the inotify limit and how to raise it).
    Polling { reason: String, every: Duration },
    /// A burst of changes was indexed (`paths` changed paths, `rescan` a full rescan).
    Indexed { paths: usize, rescan: bool, report: IndexReport },
    /// Indexing a burst failed; the watch goes on.
    Failed { message: String },
}

impl Library {
    /// Watches `roots` until `cancel` is set, indexing what changes (see the module
    /// documentation). The roots should have been indexed once already.
    pub async fn watch(
        &self,
        roots: &[PathBuf],
        embedder: Arc<dyn ImageEmbedder>,
        opts: &IndexOptions,
        wopts: &WatchOptions,
        on_event: &(dyn Fn(&WatchEvent) + Sync),
        cancel: Arc<AtomicBool>,
    ) -> Result<()> {
        let roots: Vec<PathBuf> =
            roots.iter().map(|r| std::fs::canonicalize(r).map_err(|e| crate::Error::path(r, e))).collect::<Result<_>>()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<notify::Result<notify::Event>>();
        let mut watcher = None;
        let mut polling: Option<String> = wopts.poll_only.then(|| "periodic rescans were asked for".to_string());
        if polling.is_none() {
            match notify::recommended_watcher(move |e| {
                let _ = tx.send(e);
            }) {
                Ok(mut w) => {
                    let mut failed = None;
                    for r in &roots {
                        if let Err(e) = w.watch(r, RecursiveMode::Recursive) {
                            failed = Some(describe_watch_error(r, &e));
                            break;
                        }
                    }
                    match failed {
                        None => watcher = Some(w),
                        Some(reason) => polling = Some(reason),
                    }
                }
                Err(e) => polling = Some(format!("cannot watch for changes: {e}")),
            }
        }
        match &polling {
            Some(reason) => on_event(&WatchEvent::Polling { reason: reason.clone(), every: wopts.rescan_every }),
            None => on_event(&WatchEvent::Watching { roots: roots.clone() }),
        }
        let tick = Duration::from_millis(100);
        let mut pending: BTreeSet<PathBuf> = BTreeSet::new();
        let mut rescan = false;
        let mut last_event = Instant::now();
        let mut last_scan = Instant::now();
        while !cancel.load(Ordering::SeqCst) {
            if polling.is_some() {
                if last_scan.elapsed() >= wopts.rescan_every {
                    self.run_burst(&roots, &[], true, &embedder, opts, on_event, &cancel).await;
                    last_scan = Instant::now();
                }
                tokio::time::sleep(tick).await;
                continue;
            }
            match tokio::time::timeout(tick, rx.recv()).await {
                Ok(Some(Ok(ev))) => {
                    last_event = Instant::now();
                    if ev.need_rescan() {
                        rescan = true;
                    }
                    if !matches!(ev.kind, EventKind::Access(_)) {
                        pending.extend(ev.paths);
                    }
                }
                Ok(Some(Err(e))) => {
                    // Lost events (a queue overflow): only a rescan can tell what changed.
                    tracing::warn!("watch error: {e}; rescanning");
                    last_event = Instant::now();
                    rescan = true;
                }
                Ok(None) => break,
                Err(_) => {}
            }
            if (rescan || !pending.is_empty()) && last_event.elapsed() >= wopts.debounce {
                let paths: Vec<PathBuf> = std::mem::take(&mut pending).into_iter().collect();
                self.run_burst(&roots, &paths, std::mem::take(&mut rescan), &embedder, opts, on_event, &cancel).await;
            }
        }
        drop(watcher);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_burst(
        &self,
        roots: &[PathBuf],
        paths: &[PathBuf],
        rescan: bool,
        embedder: &Arc<dyn ImageEmbedder>,
        opts: &IndexOptions,
        on_event: &(dyn Fn(&WatchEvent) + Sync),
        cancel: &Arc<AtomicBool>,
    ) {
        let r = if rescan {
            self.index_cancellable(roots, embedder.clone(), opts, &|_| {}, cancel.clone()).await
        } else {
            self.index_paths(roots, paths, embedder.clone(), opts, cancel.clone()).await
        };
        match r {
            Ok(report) => on_event(&WatchEvent::Indexed { paths: paths.len(), rescan, report }),
            Err(e) => on_event(&WatchEvent::Failed { message: e.to_string() }),
        }
    }
}

fn describe_watch_error(root: &std::path::Path, e: &notify::Error) -> String {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => format!(
            "{}: too many folders to watch (the inotify limit fs.inotify.max_user_watches; raise it with \
             `sysctl fs.inotify.max_user_watches=524288`)",
            root.display()
        ),
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(28) => format!(
            "{}: too many folders to watch (the inotify limit fs.inotify.max_user_watches; raise it with \
             `sysctl fs.inotify.max_user_watches=524288`)",
            root.display()
        ),
        _ => format!("{}: cannot watch for changes: {e}", root.display()),
    }
}
