//! Progress on stderr: a bar when stderr is a terminal, otherwise a plain line every few
//! seconds (cron and journald logs).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain progress line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Progress towards `total` units of work.
pub struct Progress {
    bar: Option<ProgressBar>,
    program: &'static str,
    verb: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Starts reporting progress of `total` units (`verb` as in "12 of 40 events re-queued").
    pub fn new(program: &'static str, verb: &'static str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style =
                ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} {msg} ({elapsed}, eta {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(verb);
            bar
        });
        let now = Instant::now();
        Progress { bar, program, verb, total, done: 0, started: now, last_line: now }
    }

    /// Records `n` more units done.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            return;
        }
        if self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            let percent = (self.done.min(self.total) * 100).checked_div(self.total).unwrap_or(100);
            let _ = writeln!(
                std::io::stderr(),
                "{}: {} of {} {} ({percent}%), {} s",
                self.program,
                self.done,
                self.total,
                self.verb,
                self.started.elapsed().as_secs()
            );
        }
    }

    /// Removes the bar (the summary follows).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
