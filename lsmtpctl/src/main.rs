//! `lsmtpctl`: the admin CLI for lsmtpd. Thin: everything is in the library (`lib.rs`).

fn main() -> std::process::ExitCode {
    lsmtpctl::run()
}
