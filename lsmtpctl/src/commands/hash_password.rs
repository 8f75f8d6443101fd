//! `lsmtpctl hash-password [USER]`: a users-file line for lsmtpd's SMTP AUTH.
//!
//! The format and the hashing live in `lsmtpd::smtp::auth`, so the line this prints is exactly
//! what the daemon parses. Only the salt is made here (from the OS's random source).

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::SaltString;
use lsmtpd::smtp::auth::{check_user_name, hash_password, users_file_line};

pub fn run(user: Option<&str>) -> anyhow::Result<ExitCode> {
    if let Some(user) = user {
        check_user_name(user).with_context(|| format!("cannot use {user:?} as a user name"))?;
    }
    let password = read_password()?;
    let salt = SaltString::generate(&mut OsRng);
    let line = match user {
        Some(user) => users_file_line(user, &password, &salt)?,
        None => hash_password(&password, &salt)?,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Asks twice on a terminal; otherwise takes the first line of stdin (which must be the only one).
fn read_password() -> anyhow::Result<Vec<u8>> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
        let again =
            rpassword::prompt_password("Repeat password: ").context("cannot read the password")?;
        if first != again {
            bail!("the passwords do not match");
        }
        return Ok(first.into_bytes());
    }
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("cannot read the password from standard input")?;
    let password = strip_line_end(&input);
    if password.contains(&b'\n') {
        bail!("standard input holds more than one line; give the password alone");
    }
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password.to_vec())
}

/// Removes one trailing LF or CRLF.
fn strip_line_end(input: &[u8]) -> &[u8] {
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    input.strip_suffix(b"\r").unwrap_or(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_end_is_removed_and_nothing_else() {
        assert_eq!(strip_line_end(b"pw\n"), b"pw");
        assert_eq!(strip_line_end(b"pw\r\n"), b"pw");
        assert_eq!(strip_line_end(b"pw"), b"pw");
        assert_eq!(strip_line_end(b" pw \n\n"), b" pw \n");
    }
}
