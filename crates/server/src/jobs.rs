//! Background jobs (indexing, captioning, labelling the library): their state and
//! progress as the API shows them, and cancellation.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Index,
    Caption,
    Classify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct JobProgress {
    pub done: u64,
    pub total: u64,
    pub failed: u64,
    /// Items per second so far.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: u64,
    pub kind: JobKind,
    pub state: JobState,
    pub progress: JobProgress,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
}

struct Entry {
    job: Job,
    started: Instant,
    cancel: Arc<AtomicBool>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
pub(crate) struct Jobs {
    inner: Mutex<(u64, BTreeMap<u64, Entry>)>,
}

/// A running job's handle for its task: progress updates and the end.
#[derive(Clone)]
pub(crate) struct JobHandle {
    jobs: Arc<crate::Inner>,
    pub(crate) id: u64,
    pub(crate) cancel: Arc<AtomicBool>,
}

/// RFC 3339 UTC time, to the second.
pub(crate) fn now_text() -> String {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl Jobs {
    /// Registers a new running job of `kind`, unless one of that kind runs already.
    pub(crate) fn start(&self, state: &crate::AppState, kind: JobKind) -> Result<JobHandle, Job> {
        let mut g = self.inner.lock().expect("jobs lock");
        if let Some(e) = g.1.values().find(|e| e.job.kind == kind && e.job.state == JobState::Running) {
            return Err(e.job.clone());
        }
        g.0 += 1;
        let id = g.0;
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            id,
            kind,
            state: JobState::Running,
            progress: JobProgress::default(),
            started_at: now_text(),
            finished_at: None,
            error: None,
            result: None,
        };
        g.1.insert(id, Entry { job, started: Instant::now(), cancel: cancel.clone(), handle: None });
        Ok(JobHandle { jobs: state.0.clone(), id, cancel })
    }

    pub(crate) fn set_task(&self, id: u64, handle: tokio::task::JoinHandle<()>) {
        if let Some(e) = self.inner.lock().expect("jobs lock").1.get_mut(&id) {
            e.handle = Some(handle);
        }
    }

    pub(crate) fn get(&self, id: u64) -> Option<Job> {
        self.inner.lock().expect("jobs lock").1.get(&id).map(|e| e.job.clone())
    }

    /// Newest first.
    pub(crate) fn list(&self) -> Vec<Job> {
        self.inner.lock().expect("jobs lock").1.values().rev().map(|e| e.job.clone()).collect()
    }

    pub(crate) fn cancel(&self, id: u64) -> Option<Job> {
        let g = self.inner.lock().expect("jobs lock");
        let e = g.1.get(&id)?;
        e.cancel.store(true, Ordering::SeqCst);
        Some(e.job.clone())
    }

    pub(crate) async fn cancel_all_and_wait(&self) {
        let handles: Vec<_> = {
            let mut g = self.inner.lock().expect("jobs lock");
            g.1.values_mut()
                .filter_map(|e| {
                    e.cancel.store(true, Ordering::SeqCst);
                    e.handle.take()
                })
                .collect()
        };
        for h in handles {
            let _ = h.await;
        }
    }
}

impl JobHandle {
    pub(crate) fn progress(&self, done: u64, total: u64, failed: u64) {
        let mut g = self.jobs.jobs.inner.lock().expect("jobs lock");
        if let Some(e) = g.1.get_mut(&self.id) {
            let secs = e.started.elapsed().as_secs_f64().max(1e-6);
            let rate = done as f64 / secs;
            e.job.progress = JobProgress {
                done,
                total,
                failed,
                rate,
                eta_seconds: (rate > 0.0 && total >= done).then(|| (total - done) as f64 / rate),
            };
        }
    }

    /// Records the end: the result, or the error (kept for the API, logged).
    pub(crate) fn finish(&self, result: Result<serde_json::Value, String>) {
        let mut g = self.jobs.jobs.inner.lock().expect("jobs lock");
        if let Some(e) = g.1.get_mut(&self.id) {
            e.job.finished_at = Some(now_text());
            match result {
                Ok(v) => {
                    let cancelled = self.cancel.load(Ordering::SeqCst);
                    e.job.state = if cancelled { JobState::Cancelled } else { JobState::Done };
                    e.job.result = Some(v);
                }
                Err(message) => {
                    tracing::error!("job {} failed: {message}", self.id);
                    e.job.state = JobState::Failed;
                    e.job.error = Some(message);
                }
            }
            e.handle = None;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_rfc3339() {
        let t = super::now_text();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T", "{t}");
    }
}
