//! The episode state machine, pure: OK / WARN / DRIFT with hysteresis and a cooldown
//! between two events of the same model version. One event per episode.
//!
//! An episode starts at the first alarm of the sequential statistics ([`Episode::row`])
//! or after `drift_windows` drifting window tests in a row ([`Episode::step`]); it ends
//! once `clean_rows` *rows* in a row were under every threshold (and, in window mode,
//! `clean_windows` clean tests in a row): small steps cannot make a marginal drift
//! flap. An episode that starts within the cooldown sends its event when the cooldown
//! is over, if it is still open then: a false episode cannot hide a real drift that
//! comes during the cooldown for longer than the cooldown.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::ModelDriftConfig;

/// A model version's drift state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    #[default]
    Ok,
    Warn,
    Drift,
}

impl State {
    /// The value of the drift state gauge.
    pub fn gauge(self) -> f64 {
        match self {
            State::Ok => 0.0,
            State::Warn => 1.0,
            State::Drift => 2.0,
        }
    }
}

/// Where a model version stands.
#[derive(Debug, Clone, Default)]
pub struct Episode {
    pub state: State,
    drift_run: u32,
    clean_run: u32,
    /// Rows since the last drifting row or test.
    clean_rows: u64,
    last_event_at: Option<Instant>,
    /// The open episode's event is still to send (the cooldown held it back).
    pending: bool,
}

/// What one test did to the episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No episode began or ended.
    Same,
    /// An episode began; `send` is false when the cooldown suppresses its event.
    Started { send: bool },
    /// The episode ended.
    Ended,
    /// The cooldown that held back the open episode's event is over: send it now.
    Late,
}

impl Episode {
    /// Moves the machine by one test: `drifting` when a finding is at the drift level,
    /// `warning` when there is any finding at all; `now` is the test's time.
    /// `rows` rows came since the last test.
    pub fn step(
        &mut self,
        drifting: bool,
        warning: bool,
        rows: u64,
        settings: &ModelDriftConfig,
        now: Instant,
    ) -> Step {
        if drifting {
            self.drift_run += 1;
            self.clean_run = 0;
            self.clean_rows = 0;
        } else {
            self.clean_run += 1;
            self.clean_rows += rows;
            self.drift_run = 0;
        }
        let calm = if warning { State::Warn } else { State::Ok };
        match self.state {
            State::Drift => {
                if self.clean_run >= settings.clean_windows
                    && self.clean_rows >= settings.clean_rows
                {
                    return self.end(calm);
                }
                self.late(settings, now)
            }
            State::Ok | State::Warn => {
                if self.drift_run < settings.drift_windows {
                    self.state = calm;
                    return Step::Same;
                }
                self.start(settings, now)
            }
        }
    }

    /// Moves the machine by one row of the sequential statistics: `over` when some
    /// statistic is at or past its threshold. The state is OK or DRIFT (the detector
    /// shows WARN from the statistics themselves).
    pub fn row(&mut self, over: bool, settings: &ModelDriftConfig, now: Instant) -> Step {
        if over {
            self.clean_rows = 0;
            if self.state != State::Drift {
                return self.start(settings, now);
            }
            return self.late(settings, now);
        }
        self.clean_rows += 1;
        if self.state == State::Drift {
            if self.clean_rows >= settings.clean_rows {
                return self.end(State::Ok);
            }
            return self.late(settings, now);
        }
        Step::Same
    }

    fn start(&mut self, settings: &ModelDriftConfig, now: Instant) -> Step {
        self.state = State::Drift;
        let cooled = self.cooled(settings, now);
        if cooled {
            self.last_event_at = Some(now);
        }
        self.pending = !cooled;
        Step::Started { send: cooled }
    }

    fn end(&mut self, calm: State) -> Step {
        self.state = calm;
        self.pending = false;
        Step::Ended
    }

    /// The open episode's held-back event, once the cooldown is over.
    fn late(&mut self, settings: &ModelDriftConfig, now: Instant) -> Step {
        if self.pending && self.cooled(settings, now) {
            self.pending = false;
            self.last_event_at = Some(now);
            return Step::Late;
        }
        Step::Same
    }

    fn cooled(&self, settings: &ModelDriftConfig, now: Instant) -> bool {
        self.last_event_at.is_none_or(|t| {
            now.saturating_duration_since(t) >= Duration::from_secs(settings.cooldown_secs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_and_cooldown() {
        let settings = ModelDriftConfig {
            drift_windows: 2,
            clean_windows: 2,
            clean_rows: 200,
            cooldown_secs: 60,
            ..ModelDriftConfig::default()
        };
        let t0 = Instant::now();
        let mut e = Episode::default();
        assert_eq!(e.step(true, true, 100, &settings, t0), Step::Same);
        assert_eq!(e.state, State::Warn);
        assert_eq!(
            e.step(true, true, 100, &settings, t0),
            Step::Started { send: true }
        );
        assert_eq!(e.state, State::Drift);
        assert_eq!(e.step(false, false, 100, &settings, t0), Step::Same);
        assert_eq!(e.step(false, false, 100, &settings, t0), Step::Ended);
        assert_eq!(e.state, State::Ok);
        // A second episode within the cooldown: no event.
        e.step(true, true, 100, &settings, t0);
        assert_eq!(
            e.step(true, true, 100, &settings, t0),
            Step::Started { send: false }
        );
        e.step(false, false, 100, &settings, t0);
        e.step(false, false, 100, &settings, t0);
        let later = t0 + Duration::from_secs(61);
        e.step(true, true, 100, &settings, later);
        assert_eq!(
            e.step(true, true, 100, &settings, later),
            Step::Started { send: true }
        );
    }

    #[test]
    fn episodes_end_after_clean_rows_not_tests() {
        // Tests every 10 rows: two clean tests are 20 rows, not the 200 clean rows asked.
        let settings = ModelDriftConfig {
            drift_windows: 1,
            clean_windows: 2,
            clean_rows: 200,
            cooldown_secs: 0,
            ..ModelDriftConfig::default()
        };
        let t0 = Instant::now();
        let mut e = Episode::default();
        assert_eq!(
            e.step(true, true, 10, &settings, t0),
            Step::Started { send: true }
        );
        for _ in 0..19 {
            assert_eq!(e.step(false, false, 10, &settings, t0), Step::Same);
        }
        assert_eq!(e.step(false, false, 10, &settings, t0), Step::Ended);
    }

    #[test]
    fn rows_flapping_around_a_threshold_stay_one_episode() {
        let settings = ModelDriftConfig {
            clean_rows: 100,
            cooldown_secs: 0,
            ..ModelDriftConfig::default()
        };
        let t0 = Instant::now();
        let mut e = Episode::default();
        let mut starts = 0;
        for i in 0..=10_000 {
            // Over the threshold one row in 50 (the last one too): never 100 clean rows in a row.
            if let Step::Started { .. } = e.row(i % 50 == 0, &settings, t0) {
                starts += 1;
            }
        }
        assert_eq!(starts, 1);
        for _ in 0..99 {
            assert_eq!(e.row(false, &settings, t0), Step::Same);
        }
        assert_eq!(e.row(false, &settings, t0), Step::Ended);
        assert_eq!(e.state, State::Ok);
    }

    #[test]
    fn an_episode_held_back_by_the_cooldown_is_sent_when_it_ends() {
        let settings = ModelDriftConfig {
            clean_rows: 10,
            cooldown_secs: 60,
            ..ModelDriftConfig::default()
        };
        let t0 = Instant::now();
        let mut e = Episode::default();
        assert_eq!(e.row(true, &settings, t0), Step::Started { send: true });
        for _ in 0..10 {
            e.row(false, &settings, t0);
        }
        assert_eq!(e.state, State::Ok);
        // A second episode within the cooldown: held back, sent once the cooldown is
        // over while it is still open; then nothing more for it.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(e.row(true, &settings, t1), Step::Started { send: false });
        assert_eq!(e.row(true, &settings, t1), Step::Same);
        let t2 = t0 + Duration::from_secs(60);
        assert_eq!(e.row(true, &settings, t2), Step::Late);
        assert_eq!(e.row(true, &settings, t2), Step::Same);
    }
}
