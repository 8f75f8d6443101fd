//! The live users table for SMTP AUTH: loaded from `smtp.auth.users_file` at start, replaced on
//! SIGHUP, and checked on the blocking pool.
//!
//! I/O edge of [`crate::smtp::auth`] (which parses and verifies, purely).
//!
//! Invariants:
//! - A reload that fails (unreadable file, a bad line) keeps the table in use: a typo during
//!   `systemctl reload` never locks everybody out.
//! - At most [`AuthUsers::max_concurrent_checks`] argon2 runs at once (one per CPU). Each takes
//!   the hash's memory cost (19 MiB with the recommended parameters), so a burst of AUTH
//!   attempts cannot exhaust memory or the blocking pool; the others wait their turn.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::Semaphore;

use crate::smtp::auth::{parse_users, Credentials, UserDb, UsersParseError};

/// Why a users file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    /// The file cannot be read (missing, permissions, not UTF-8).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is wrong; `{path}:{line}: ...` like a compiler, so an editor jumps to it.
    #[error("{path}:{line}: {message}", line = .error.line, message = .error.message)]
    Parse {
        path: PathBuf,
        error: UsersParseError,
    },
}

/// Reads and parses a users file (without building the verification table).
pub fn read_users_file(path: &Path) -> Result<crate::smtp::auth::Users, UsersFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_users(&text).map_err(|error| UsersFileError::Parse {
        path: path.to_path_buf(),
        error,
    })
}

/// The reloadable users table every session shares.
#[derive(Debug)]
pub struct AuthUsers {
    path: PathBuf,
    db: RwLock<Arc<UserDb>>,
    checks: Arc<Semaphore>,
}

impl AuthUsers {
    /// Loads `path`. Blocking (file read and one argon2 run for the dummy hash): call it at
    /// start-up or on the blocking pool.
    pub fn load(path: &Path) -> Result<AuthUsers, UsersFileError> {
        let db = UserDb::new(read_users_file(path)?);
        Ok(AuthUsers {
            path: path.to_path_buf(),
            db: RwLock::new(Arc::new(db)),
            checks: Arc::new(Semaphore::new(Self::max_concurrent_checks())),
        })
    }

    /// argon2 runs at once: the number of CPUs.
    pub fn max_concurrent_checks() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// The users file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Users in the table now.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.current().is_empty()
    }

    fn current(&self) -> Arc<UserDb> {
        Arc::clone(&self.db.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the file again and swaps the table in; on error the old table stays. Returns the
    /// number of users.
    pub async fn reload(&self) -> Result<usize, UsersFileError> {
        let path = self.path.clone();
        let db = tokio::task::spawn_blocking(move || read_users_file(&path).map(UserDb::new))
            .await
            .map_err(|e| UsersFileError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })??;
        let n = db.len();
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(db);
        Ok(n)
    }

    /// Checks credentials on the blocking pool (argon2 is slow by design). False on any failure,
    /// including a verification task that could not run.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the result; the argon2 run finishes in the background.
    pub async fn check(&self, creds: Credentials) -> bool {
        let Ok(permit) = Arc::clone(&self.checks).acquire_owned().await else {
            return false;
        };
        let db = self.current();
        tokio::task::spawn_blocking(move || {
            let valid = db.verify(&creds);
            drop(permit);
            valid
        })
        .await
        .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use argon2::password_hash::SaltString;

    fn line(user: &str, password: &str) -> String {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        crate::smtp::auth::users_file_line(user, password.as_bytes(), &salt).unwrap()
    }

    fn creds(user: &str, password: &str) -> Credentials {
        Credentials {
            authzid: String::new(),
            user: user.into(),
            password: password.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn reload_swaps_the_table_and_a_bad_file_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, format!("{}\n", line("alice", "a"))).unwrap();
        let users = AuthUsers::load(&path).unwrap();
        assert!(users.check(creds("alice", "a")).await);
        std::fs::write(&path, format!("{}\n", line("bob", "b"))).unwrap();
        assert_eq!(users.reload().await.unwrap(), 1);
        assert!(!users.check(creds("alice", "a")).await);
        assert!(users.check(creds("bob", "b")).await);
        std::fs::write(&path, "bob:not-a-hash\n").unwrap();
        let err = users.reload().await.unwrap_err();
        assert_eq!(
            err.to_string().split(": ").next().unwrap(),
            format!("{}:1", path.display())
        );
        assert!(users.check(creds("bob", "b")).await, "old table kept");
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = AuthUsers::load(Path::new("/nonexistent/users")).unwrap_err();
        assert!(matches!(err, UsersFileError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/users"), "{err}");
    }
}
