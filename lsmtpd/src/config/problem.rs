//! [`Problem`]: one configuration problem, naming the setting it is about. A leaf: every
//! section's validation and the environment overrides produce these, and nothing here imports
//! the rest of the daemon.

/// One configuration problem, naming the setting it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The RON path (`smtp.max_recipients`) or the environment variable (`BIND_PORT`).
    pub setting: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

impl Problem {
    /// A problem with `setting`.
    pub fn new(setting: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            setting: setting.into(),
            message: message.into(),
        }
    }
}
