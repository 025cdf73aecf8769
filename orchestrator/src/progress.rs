//! Progress of long work on the command line: a bar with an ETA where stderr is a
//! terminal, plain log lines (at most one every few seconds, and the last) where it is not
//! (a container's log, CI).

use engine::progress::ProgressHook;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Least time between two plain log lines.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: String,
    bar: Option<ProgressBar>,
    started: Instant,
    /// When the last plain line went out, and the last step reported.
    logged: Mutex<(Instant, usize)>,
}

impl Progress {
    /// Progress of `what` (a noun phrase: "loading the target model").
    pub fn new(what: impl Into<String>) -> Arc<Self> {
        let what = what.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what.clone());
            b
        });
        let now = Instant::now();
        Arc::new(Self {
            what,
            bar,
            started: now,
            logged: Mutex::new((now, 0)),
        })
    }

    /// `done` of `total` steps.
    pub fn set(&self, done: usize, total: usize) {
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
            return;
        }
        let mut logged = serving::sessions::lock(&self.logged);
        let now = Instant::now();
        let last = done >= total;
        if done == logged.1 || !(last || now - logged.0 >= LOG_EVERY) {
            return;
        }
        *logged = (now, done);
        let spent = (now - self.started).as_secs_f64();
        let eta = match done {
            0 => String::new(),
            _ if last => format!(" in {spent:.0} s"),
            _ => format!(
                ", about {:.0} s left",
                spent / done as f64 * (total - done) as f64
            ),
        };
        tracing::info!("{}: {done}/{total}{eta}", self.what);
    }

    /// A line of output that does not tear the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// A hook for the engine and the profiler that reports here.
    pub fn hook(self: &Arc<Self>) -> ProgressHook {
        let me = self.clone();
        ProgressHook::new(move |done, total| me.set(done, total))
    }
}
