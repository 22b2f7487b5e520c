//! Progress of long evaluations where no bar is drawn (shared by `eval`, `calibrate` and
//! `eval-report`).

use indicatif::ProgressBar;

/// Users between the plain progress lines of [`log_progress`].
const LOG_EVERY_USERS: u64 = 50;

/// A plain line every [`LOG_EVERY_USERS`] users and at the end when the bar is hidden (stderr is
/// a log file under nohup, where indicatif draws nothing): a long evaluation shows progress there too.
pub fn log_progress(bar: &ProgressBar, label: &str) {
    let (done, total) = (bar.position(), bar.length().unwrap_or(0));
    if bar.is_hidden() && (done % LOG_EVERY_USERS == 0 || done == total) {
        eprintln!("{label}: {done}/{total} users · {} · {:.0} s", bar.message(), bar.elapsed().as_secs_f64());
    }
}
