//! A hook that long work (loading a model, timing a cost profile) calls with how far it
//! got, so a front end can draw a progress bar or log lines. It never changes what is
//! computed: two options that differ only in their hooks are equal.

use std::sync::Arc;

type Report = dyn Fn(usize, usize) + Send + Sync;

#[derive(Clone, Default)]
pub struct ProgressHook(Option<Arc<Report>>);

impl ProgressHook {
    /// `f(done, total)` after each step.
    pub fn new(f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    pub fn report(&self, done: usize, total: usize) {
        if let Some(f) = &self.0 {
            f(done, total);
        }
    }
}

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProgressHook(set)"
        } else {
            "ProgressHook(none)"
        })
    }
}

impl PartialEq for ProgressHook {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ProgressHook {}
