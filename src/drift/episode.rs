//! The episode state machine, pure: OK / WARN / DRIFT with hysteresis (a run of
//! drifting tests starts an episode, a run of clean ones ends it) and a cooldown between
//! two events of the same model version. One event per episode.

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
    last_event_at: Option<Instant>,
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
}

impl Episode {
    /// Moves the machine by one test: `drifting` when a finding is at the drift level,
    /// `warning` when there is any finding at all; `now` is the test's time.
    pub fn step(
        &mut self,
        drifting: bool,
        warning: bool,
        settings: &ModelDriftConfig,
        now: Instant,
    ) -> Step {
        if drifting {
            self.drift_run += 1;
            self.clean_run = 0;
        } else {
            self.clean_run += 1;
            self.drift_run = 0;
        }
        let calm = if warning { State::Warn } else { State::Ok };
        match self.state {
            State::Drift => {
                if self.clean_run >= settings.clean_windows {
                    self.state = calm;
                    return Step::Ended;
                }
                Step::Same
            }
            State::Ok | State::Warn => {
                if self.drift_run < settings.drift_windows {
                    self.state = calm;
                    return Step::Same;
                }
                self.state = State::Drift;
                let cooled = self.last_event_at.is_none_or(|t| {
                    now.saturating_duration_since(t) >= Duration::from_secs(settings.cooldown_secs)
                });
                if cooled {
                    self.last_event_at = Some(now);
                }
                Step::Started { send: cooled }
            }
        }
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
            cooldown_secs: 60,
            ..ModelDriftConfig::default()
        };
        let t0 = Instant::now();
        let mut e = Episode::default();
        assert_eq!(e.step(true, true, &settings, t0), Step::Same);
        assert_eq!(e.state, State::Warn);
        assert_eq!(
            e.step(true, true, &settings, t0),
            Step::Started { send: true }
        );
        assert_eq!(e.state, State::Drift);
        assert_eq!(e.step(false, false, &settings, t0), Step::Same);
        assert_eq!(e.step(false, false, &settings, t0), Step::Ended);
        assert_eq!(e.state, State::Ok);
        // A second episode within the cooldown: no event.
        e.step(true, true, &settings, t0);
        assert_eq!(
            e.step(true, true, &settings, t0),
            Step::Started { send: false }
        );
        e.step(false, false, &settings, t0);
        e.step(false, false, &settings, t0);
        let later = t0 + Duration::from_secs(61);
        e.step(true, true, &settings, later);
        assert_eq!(
            e.step(true, true, &settings, later),
            Step::Started { send: true }
        );
    }
}
