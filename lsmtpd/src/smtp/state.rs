//! The SMTP transaction state machine: the functional core of a session.
//!
//! Pure: `on_command` takes a parsed command and returns a [`Step`] — the reply to send (if any)
//! and the effect the session must run (read DATA, read a BDAT chunk, start TLS, close). It never
//! touches a socket, the spool or the clock, so every sequencing rule is tested without I/O.
//!
//! Invariants:
//! - A transaction exists only between an accepted `MAIL` and its end (end of DATA / last BDAT,
//!   `RSET`, `HELO`/`EHLO`, `STARTTLS`).
//! - DATA and BDAT are only reachable with at least one accepted recipient; a BDAT chunk is always
//!   read (or discarded) in full, even when the command is refused (RFC 3030 §3).
//! - DATA and BDAT never mix within one transaction.
//! - While an AUTH exchange is open, input lines are SASL responses, not commands: [`SmtpState::on_line`]
//!   routes them to the exchange. AUTH is offered and accepted only over TLS.

use crate::smtp::auth::{self, AuthPolicy, Credentials, Exchange, Mechanism, Progress};
use crate::smtp::wire::command::{
    parse_command, BodyType, Command, ForwardPath, MailParams, ParseError, ReversePath,
};
use crate::smtp::wire::reply::Reply;

/// Limits the state machine enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: u64,
    pub max_recipients: usize,
}

/// What the session must do after sending `Step::reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Read the DATA body (the 354 has been queued as the reply).
    ReadData,
    /// Read a BDAT chunk of `size` bytes into the transaction's body; reply after reading.
    ReadBdat {
        size: u64,
        last: bool,
    },
    /// Read and throw away a BDAT chunk of `size` bytes, then send the reply in the step.
    DiscardBdat {
        size: u64,
    },
    /// Upgrade the connection to TLS after the 220; then call [`SmtpState::on_tls_started`].
    StartTls,
    /// Check these credentials (off the async threads), wait `failure_delay` if they are wrong,
    /// then call [`SmtpState::on_auth_checked`] and send its reply.
    CheckCredentials(Credentials),
    /// Close the connection after the reply.
    Close,
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub reply: Option<Reply>,
    pub effect: Effect,
}

impl Step {
    /// Nothing to send, nothing to do (the shell answered the line itself).
    pub fn none() -> Step {
        Step {
            reply: None,
            effect: Effect::None,
        }
    }

    fn reply(reply: Reply) -> Step {
        Step {
            reply: Some(reply),
            effect: Effect::None,
        }
    }
}

/// The envelope of the transaction in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from: ReversePath,
    pub params: MailParams,
    pub rcpts: Vec<ForwardPath>,
}

/// Which greeting the client used: it decides the extensions and the `Received:` protocol name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub name: String,
    pub extended: bool,
}

/// What the server offers in its EHLO reply.
#[derive(Debug, Clone)]
pub struct Offer {
    pub server_name: String,
    /// STARTTLS is offered when a TLS configuration exists and TLS is not already on.
    pub starttls: bool,
    /// `smtp.tls.required`: MAIL before TLS is on gets 530 5.7.0.
    pub tls_required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyMode {
    None,
    Bdat,
}

/// Per-connection protocol state.
#[derive(Debug)]
pub struct SmtpState {
    limits: Limits,
    offer: Offer,
    tls: bool,
    greeting: Option<Greeting>,
    envelope: Option<Envelope>,
    body_mode: BodyMode,
    /// A refusal found while BDAT chunks were arriving, answered at the last chunk.
    bdat_refusal: Option<Reply>,
    auth_policy: AuthPolicy,
    /// The user who authenticated on this connection.
    auth_user: Option<String>,
    /// An AUTH exchange waiting for the client's next response line.
    exchange: Option<Exchange>,
    /// The user whose credentials are being checked ([`Effect::CheckCredentials`]).
    checking: Option<String>,
    /// Failed AUTH attempts on this connection.
    auth_failures: u32,
}

impl SmtpState {
    pub fn new(limits: Limits, offer: Offer) -> SmtpState {
        SmtpState {
            limits,
            offer,
            tls: false,
            greeting: None,
            envelope: None,
            body_mode: BodyMode::None,
            bdat_refusal: None,
            auth_policy: AuthPolicy::default(),
            auth_user: None,
            exchange: None,
            checking: None,
            auth_failures: 0,
        }
    }

    /// Turns AUTH on (it is off unless a users file is configured).
    pub fn with_auth(mut self, policy: AuthPolicy) -> SmtpState {
        self.auth_policy = policy;
        self
    }

    /// The user who authenticated on this connection, if any.
    pub fn auth_user(&self) -> Option<&str> {
        self.auth_user.as_deref()
    }

    pub fn greeting(&self) -> Option<&Greeting> {
        self.greeting.as_ref()
    }

    pub fn envelope(&self) -> Option<&Envelope> {
        self.envelope.as_ref()
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The protocol name for the `Received:` header (RFC 3848, RFC 6531): `A` marks an
    /// authenticated session (AUTH needs EHLO, so plain SMTP never has it).
    pub fn protocol_name(&self) -> &'static str {
        let extended = self.greeting.as_ref().is_some_and(|g| g.extended);
        let utf8 = self.envelope.as_ref().is_some_and(|e| e.params.smtputf8);
        let authed = self.auth_user.is_some();
        match (extended, utf8, self.tls, authed) {
            (false, _, false, _) => "SMTP",
            (false, _, true, _) => "SMTPS",
            (true, false, false, false) => "ESMTP",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, false) => "ESMTPS",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }

    /// The reply lines of EHLO.
    fn ehlo_reply(&self, client: &str) -> Reply {
        let mut lines = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.limits.max_message_bytes),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "SMTPUTF8".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.offer.starttls && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_policy.enabled && self.tls {
            lines.push(format!("AUTH {}", auth::MECHANISMS));
        }
        lines.push("HELP".to_string());
        Reply::ehlo(
            &format!("{} greets {}", self.offer.server_name, client),
            lines,
        )
    }

    fn reset_transaction(&mut self) {
        self.envelope = None;
        self.body_mode = BodyMode::None;
        self.bdat_refusal = None;
    }

    /// Runs one input line: a SASL response while an AUTH exchange is open, a command otherwise.
    /// A command that does not parse is returned as the error (the session counts and answers it).
    pub fn on_line(
        &mut self,
        line: &[u8],
        has_room: &dyn Fn(u64) -> bool,
    ) -> Result<Step, ParseError> {
        if let Some(exchange) = self.exchange.take() {
            return Ok(self.on_auth_progress(exchange.respond(line)));
        }
        parse_command(line).map(|cmd| self.on_command(cmd, has_room))
    }

    /// True while an AUTH exchange waits for the client's next response line: the next line is
    /// for [`SmtpState::on_auth_response`], not a command.
    pub fn in_auth_exchange(&self) -> bool {
        self.exchange.is_some()
    }

    /// A response line of the AUTH exchange in progress (see [`SmtpState::in_auth_exchange`]).
    pub fn on_auth_response(&mut self, line: &[u8]) -> Step {
        match self.exchange.take() {
            Some(exchange) => self.on_auth_progress(exchange.respond(line)),
            None => Step::reply(Reply::bad_sequence()),
        }
    }

    /// A line over the length limit arrived: the reply. During an AUTH exchange it ends the
    /// exchange (RFC 4954 §4: 500 5.5.6).
    pub fn on_overlong_line(&mut self) -> Reply {
        if self.exchange.take().is_some() {
            Reply::auth_line_too_long()
        } else {
            Reply::command_line_too_long()
        }
    }

    /// Runs one command. `has_room(size)` asks the spool whether a message of `size` bytes
    /// (0 when unknown) can be taken now; it is consulted at MAIL FROM.
    pub fn on_command(&mut self, cmd: Command, has_room: &dyn Fn(u64) -> bool) -> Step {
        match cmd {
            Command::Ehlo(name) => self.on_hello(name, true),
            Command::Helo(name) => self.on_hello(name, false),
            Command::Mail { from, params } => self.on_mail(from, params, has_room),
            Command::Rcpt { to, params } => self.on_rcpt(to, params),
            Command::Data => self.on_data(),
            Command::Bdat { size, last } => self.on_bdat(size, last),
            Command::Rset => {
                self.reset_transaction();
                Step::reply(Reply::ok())
            }
            Command::Noop => Step::reply(Reply::ok()),
            Command::Quit => Step {
                reply: Some(Reply::closing()),
                effect: Effect::Close,
            },
            Command::Help => Step::reply(Reply::help()),
            Command::Vrfy(_) => Step::reply(Reply::cannot_verify()),
            Command::Expn(_) => Step::reply(Reply::not_implemented()),
            Command::Auth { mechanism, initial } => self.on_auth(&mechanism, initial.as_deref()),
            Command::StartTls => self.on_starttls(),
        }
    }

    fn on_hello(&mut self, name: String, extended: bool) -> Step {
        if self.body_mode == BodyMode::Bdat {
            return Step::reply(Reply::bad_sequence());
        }
        self.reset_transaction();
        let reply = if extended {
            self.ehlo_reply(&name)
        } else {
            Reply::helo(&self.offer.server_name)
        };
        self.greeting = Some(Greeting { name, extended });
        Step::reply(reply)
    }

    fn on_mail(
        &mut self,
        from: ReversePath,
        params: MailParams,
        has_room: &dyn Fn(u64) -> bool,
    ) -> Step {
        let Some(greeting) = &self.greeting else {
            return Step::reply(Reply::need_helo());
        };
        if self.offer.tls_required && !self.tls {
            return Step::reply(Reply::tls_required());
        }
        if self.envelope.is_some() {
            return Step::reply(Reply::nested_mail());
        }
        let extended = greeting.extended;
        if self.auth_policy.required && self.auth_user.is_none() {
            return Step::reply(Reply::auth_required());
        }
        // `AUTH=` (RFC 4954 §5) is parsed and ignored: we do not relay to other servers.
        if !extended && (params.size.is_some() || params.body.is_some() || params.smtputf8) {
            return Step::reply(Reply::new(
                555,
                Some((5, 5, 4)),
                "MAIL parameters need EHLO",
            ));
        }
        if let ReversePath::Mailbox(addr) = &from {
            if !addr.is_ascii() && !params.smtputf8 {
                return Step::reply(Reply::smtputf8_required());
            }
        }
        if let Some(size) = params.size {
            if size > self.limits.max_message_bytes {
                return Step::reply(Reply::message_too_big());
            }
        }
        if !has_room(params.size.unwrap_or(0)) {
            return Step::reply(Reply::insufficient_storage());
        }
        self.envelope = Some(Envelope {
            from,
            params,
            rcpts: Vec::new(),
        });
        Step::reply(Reply::ok())
    }

    fn on_rcpt(&mut self, to: ForwardPath, params: Vec<(String, Option<String>)>) -> Step {
        let max = self.limits.max_recipients;
        let Some(env) = &mut self.envelope else {
            return Step::reply(Reply::need_mail());
        };
        if self.body_mode == BodyMode::Bdat {
            return Step::reply(Reply::bad_sequence());
        }
        if let Some((name, _)) = params.first() {
            return Step::reply(Reply::unknown_parameter(name));
        }
        if let ForwardPath::Mailbox(addr) = &to {
            if !addr.is_ascii() && !env.params.smtputf8 {
                return Step::reply(Reply::smtputf8_required());
            }
        }
        if env.rcpts.len() >= max {
            return Step::reply(Reply::too_many_recipients());
        }
        env.rcpts.push(to);
        Step::reply(Reply::ok())
    }

    fn on_data(&mut self) -> Step {
        match &self.envelope {
            None => Step::reply(Reply::need_mail()),
            Some(env) if env.rcpts.is_empty() => Step::reply(Reply::need_rcpt()),
            Some(_) if self.body_mode == BodyMode::Bdat => {
                Step::reply(Reply::new(503, Some((5, 5, 1)), "DATA cannot follow BDAT"))
            }
            Some(env) if env.params.body == Some(BodyType::BinaryMime) => {
                Step::reply(Reply::new(503, Some((5, 5, 1)), "BINARYMIME needs BDAT"))
            }
            Some(_) => Step {
                reply: Some(Reply::start_data()),
                effect: Effect::ReadData,
            },
        }
    }

    fn on_bdat(&mut self, size: u64, last: bool) -> Step {
        let refusal = match &self.envelope {
            None => Some(Reply::need_mail()),
            Some(env) if env.rcpts.is_empty() => Some(Reply::need_rcpt()),
            Some(_) => None,
        };
        if let Some(reply) = refusal {
            return Step {
                reply: Some(reply),
                effect: Effect::DiscardBdat { size },
            };
        }
        self.body_mode = BodyMode::Bdat;
        Step {
            reply: None,
            effect: Effect::ReadBdat { size, last },
        }
    }

    fn on_starttls(&mut self) -> Step {
        if self.tls {
            return Step::reply(Reply::tls_already_active());
        }
        if !self.offer.starttls {
            return Step::reply(Reply::not_implemented());
        }
        if self.body_mode == BodyMode::Bdat {
            return Step::reply(Reply::bad_sequence());
        }
        Step {
            reply: Some(Reply::ready_to_start_tls()),
            effect: Effect::StartTls,
        }
    }

    /// TLS is up: everything learned before is forgotten (RFC 3207 §4.2). The AUTH failure
    /// count stays: it is about the client, not the channel.
    pub fn on_tls_started(&mut self) {
        self.tls = true;
        self.greeting = None;
        self.auth_user = None;
        self.exchange = None;
        self.reset_transaction();
    }

    fn on_auth(&mut self, mechanism: &str, initial: Option<&str>) -> Step {
        if !self.auth_policy.enabled {
            return Step::reply(Reply::not_implemented());
        }
        if !self.greeting.as_ref().is_some_and(|g| g.extended) {
            return Step::reply(Reply::need_helo());
        }
        if self.auth_user.is_some() {
            return Step::reply(Reply::already_authenticated());
        }
        if self.envelope.is_some() || self.body_mode == BodyMode::Bdat {
            return Step::reply(Reply::auth_in_transaction());
        }
        let Some(mechanism) = Mechanism::from_name(mechanism) else {
            return Step::reply(Reply::auth_mechanism_unknown());
        };
        if !self.tls {
            return Step::reply(Reply::auth_needs_tls());
        }
        self.on_auth_progress(Exchange::start(mechanism, initial))
    }

    fn on_auth_progress(&mut self, progress: Progress) -> Step {
        match progress {
            Progress::Continue(exchange, challenge) => {
                self.exchange = Some(exchange);
                Step::reply(challenge)
            }
            Progress::Fail(reply) => Step::reply(reply),
            Progress::Verify(creds) => {
                self.checking = Some(creds.user.clone());
                Step {
                    reply: None,
                    effect: Effect::CheckCredentials(creds),
                }
            }
        }
    }

    /// The credentials of [`Effect::CheckCredentials`] were checked: `235`, `535`, or after
    /// `max_failures` failures `421` and close.
    pub fn on_auth_checked(&mut self, valid: bool) -> Step {
        let user = self.checking.take();
        match user {
            Some(user) if valid => {
                self.auth_user = Some(user);
                Step::reply(Reply::auth_succeeded())
            }
            _ => {
                self.auth_failures = self.auth_failures.saturating_add(1);
                if self.auth_failures >= self.auth_policy.max_failures.max(1) {
                    Step {
                        reply: Some(Reply::too_many_auth_failures()),
                        effect: Effect::Close,
                    }
                } else {
                    Step::reply(Reply::auth_invalid())
                }
            }
        }
    }

    /// Records a refusal found while receiving BDAT chunks (too large, over the memory budget);
    /// the transaction continues to its last chunk, which then gets this reply.
    pub fn refuse_bdat(&mut self, reply: Reply) {
        if self.bdat_refusal.is_none() {
            self.bdat_refusal = Some(reply);
        }
    }

    /// The refusal recorded for the BDAT transaction, if any.
    pub fn bdat_refusal(&self) -> Option<&Reply> {
        self.bdat_refusal.as_ref()
    }

    /// The message's end was reached (stored or refused): the transaction is over.
    pub fn end_transaction(&mut self) {
        self.reset_transaction();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::wire::command::parse_command;

    fn state() -> SmtpState {
        state_with(false, false)
    }

    fn tls_state(required: bool) -> SmtpState {
        state_with(true, required)
    }

    fn state_with(starttls: bool, tls_required: bool) -> SmtpState {
        SmtpState::new(
            Limits {
                max_message_bytes: 1000,
                max_recipients: 3,
            },
            Offer {
                server_name: "mx.test".into(),
                starttls,
                tls_required,
            },
        )
    }

    fn ehlo_text(s: &mut SmtpState) -> String {
        let step = run(s, "EHLO c");
        let mut out = Vec::new();
        step.reply.expect("reply").write_to(&mut out);
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn starttls_is_offered_until_tls_is_on() {
        let mut s = tls_state(false);
        assert!(ehlo_text(&mut s).contains("STARTTLS"));
        s.on_tls_started();
        assert!(!ehlo_text(&mut s).contains("STARTTLS"));
    }

    #[test]
    fn starttls_asks_for_the_upgrade_and_tls_forgets_the_session() {
        let mut s = tls_state(false);
        run(&mut s, "EHLO c");
        run(&mut s, "MAIL FROM:<a@b.c>");
        let step = run(&mut s, "STARTTLS");
        assert_eq!(code(&step), 220);
        assert_eq!(step.effect, Effect::StartTls);
        s.on_tls_started();
        assert!(s.tls());
        assert!(s.envelope().is_none(), "the transaction is reset");
        assert!(s.greeting().is_none(), "the client must EHLO again");
        assert_eq!(code(&run(&mut s, "MAIL FROM:<a@b.c>")), 503);
        run(&mut s, "EHLO c");
        assert_eq!(s.protocol_name(), "ESMTPS");
        let again = run(&mut s, "STARTTLS");
        assert_eq!(code(&again), 554, "TLS already active");
        assert_eq!(again.effect, Effect::None);
    }

    #[test]
    fn required_tls_refuses_mail_before_starttls_with_530() {
        let mut s = tls_state(true);
        run(&mut s, "EHLO c");
        let step = run(&mut s, "MAIL FROM:<a@b.c>");
        assert_eq!(code(&step), 530);
        assert_eq!(step.reply.expect("reply").enhanced(), Some((5, 7, 0)));
        assert!(s.envelope().is_none());
        s.on_tls_started();
        run(&mut s, "EHLO c");
        assert_eq!(code(&run(&mut s, "MAIL FROM:<a@b.c>")), 250);
    }

    fn run(s: &mut SmtpState, line: &str) -> Step {
        let cmd = parse_command(line.as_bytes()).expect("test command parses");
        s.on_command(cmd, &|_| true)
    }

    fn code(step: &Step) -> u16 {
        step.reply.as_ref().map(|r| r.code()).unwrap_or(0)
    }

    #[test]
    fn mail_before_helo_is_a_sequence_error() {
        let mut s = state();
        assert_eq!(code(&run(&mut s, "MAIL FROM:<a@b.c>")), 503);
    }

    #[test]
    fn full_transaction_reaches_read_data() {
        let mut s = state();
        let ehlo = run(&mut s, "EHLO client.test");
        assert_eq!(code(&ehlo), 250);
        assert_eq!(code(&run(&mut s, "MAIL FROM:<a@b.c> SIZE=10")), 250);
        assert_eq!(code(&run(&mut s, "RCPT TO:<x@y.z>")), 250);
        let data = run(&mut s, "DATA");
        assert_eq!(code(&data), 354);
        assert_eq!(data.effect, Effect::ReadData);
        assert_eq!(s.protocol_name(), "ESMTP");
    }

    #[test]
    fn ehlo_advertises_the_extensions() {
        let mut s = state();
        let step = run(&mut s, "EHLO c");
        let mut out = Vec::new();
        step.reply.expect("reply").write_to(&mut out);
        let text = String::from_utf8(out).expect("ascii");
        for ext in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
        ] {
            assert!(text.contains(ext), "{ext} missing in {text}");
        }
        assert!(!text.contains("STARTTLS"), "no TLS configured: {text}");
    }

    #[test]
    fn data_without_recipients_is_refused() {
        let mut s = state();
        run(&mut s, "EHLO c");
        run(&mut s, "MAIL FROM:<>");
        assert_eq!(code(&run(&mut s, "DATA")), 503);
    }

    #[test]
    fn null_sender_is_accepted() {
        let mut s = state();
        run(&mut s, "EHLO c");
        assert_eq!(code(&run(&mut s, "MAIL FROM:<>")), 250);
    }

    #[test]
    fn declared_size_over_the_limit_gets_552_at_mail() {
        let mut s = state();
        run(&mut s, "EHLO c");
        let step = run(&mut s, "MAIL FROM:<a@b.c> SIZE=1001");
        assert_eq!(code(&step), 552);
        assert!(s.envelope().is_none());
    }

    #[test]
    fn a_twenty_digit_size_is_too_big_not_a_syntax_error() {
        // RFC 1870: size-value = 1*20DIGIT, so these are valid and simply too big: 552 5.3.4,
        // also past u64::MAX and also for the null sender. The spool is never asked.
        for size in [
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
        ] {
            let mut s = state();
            run(&mut s, "EHLO c");
            let line = format!("MAIL FROM:<> SIZE={size}");
            let cmd = parse_command(line.as_bytes()).expect("valid syntax");
            let step = s.on_command(cmd, &|_| panic!("a refused size needs no room"));
            let reply = step.reply.expect("reply");
            assert_eq!(
                (reply.code(), reply.enhanced()),
                (552, Some((5, 3, 4))),
                "{line}"
            );
            assert!(s.envelope().is_none());
        }
    }

    #[test]
    fn a_full_spool_gets_452_at_mail() {
        let mut s = state();
        run(&mut s, "EHLO c");
        let cmd = parse_command(b"MAIL FROM:<a@b.c>").expect("parses");
        let step = s.on_command(cmd, &|_| false);
        assert_eq!(code(&step), 452);
    }

    #[test]
    fn recipients_over_the_limit_get_452_4_5_3() {
        let mut s = state();
        run(&mut s, "EHLO c");
        run(&mut s, "MAIL FROM:<a@b.c>");
        for i in 0..3 {
            assert_eq!(code(&run(&mut s, &format!("RCPT TO:<r{i}@y.z>"))), 250);
        }
        let step = run(&mut s, "RCPT TO:<r9@y.z>");
        assert_eq!(code(&step), 452);
        assert_eq!(step.reply.expect("reply").enhanced(), Some((4, 5, 3)));
        assert_eq!(s.envelope().map(|e| e.rcpts.len()), Some(3));
    }

    #[test]
    fn rset_and_helo_end_the_transaction() {
        let mut s = state();
        run(&mut s, "EHLO c");
        run(&mut s, "MAIL FROM:<a@b.c>");
        run(&mut s, "RSET");
        assert!(s.envelope().is_none());
        assert_eq!(code(&run(&mut s, "MAIL FROM:<a@b.c>")), 250);
        run(&mut s, "HELO again");
        assert!(s.envelope().is_none());
        assert_eq!(s.protocol_name(), "SMTP");
    }

    #[test]
    fn nested_mail_is_refused() {
        let mut s = state();
        run(&mut s, "EHLO c");
        run(&mut s, "MAIL FROM:<a@b.c>");
        assert_eq!(code(&run(&mut s, "MAIL FROM:<a@b.c>")), 503);
    }

    #[test]
    fn bdat_without_transaction_discards_the_chunk() {
        let mut s = state();
        run(&mut s, "EHLO c");
        let step = run(&mut s, "BDAT 10 LAST");
        assert_eq!(code(&step), 503);
        assert_eq!(step.effect, Effect::DiscardBdat { size: 10 });
    }

    #[test]
    fn data_cannot_follow_bdat() {
        let mut s = state();
        run(&mut s, "EHLO c");
        run(&mut s, "MAIL FROM:<a@b.c>");
        run(&mut s, "RCPT TO:<x@y.z>");
        let step = run(&mut s, "BDAT 5");
        assert_eq!(
            step.effect,
            Effect::ReadBdat {
                size: 5,
                last: false
            }
        );
        assert_eq!(step.reply, None);
        assert_eq!(code(&run(&mut s, "DATA")), 503);
    }

    #[test]
    fn utf8_address_needs_smtputf8() {
        let mut s = state();
        run(&mut s, "EHLO c");
        assert_eq!(code(&run(&mut s, "MAIL FROM:<jörg@example.de>")), 553);
        assert_eq!(
            code(&run(&mut s, "MAIL FROM:<jörg@example.de> SMTPUTF8")),
            250
        );
        assert_eq!(code(&run(&mut s, "RCPT TO:<ñ@ejemplo.es>")), 250);
        assert_eq!(s.protocol_name(), "UTF8SMTP");
    }

    #[test]
    fn quit_closes() {
        let mut s = state();
        let step = run(&mut s, "QUIT");
        assert_eq!(code(&step), 221);
        assert_eq!(step.effect, Effect::Close);
    }

    #[test]
    fn starttls_is_refused_without_tls_configured() {
        let mut s = state();
        run(&mut s, "EHLO c");
        assert_eq!(code(&run(&mut s, "STARTTLS")), 502);
    }

    #[test]
    fn vrfy_gets_252() {
        let mut s = state();
        assert_eq!(code(&run(&mut s, "VRFY postmaster")), 252);
    }

    // --- AUTH ---------------------------------------------------------------------------

    const POLICY: AuthPolicy = AuthPolicy {
        enabled: true,
        required: false,
        max_failures: 3,
    };

    /// A state with AUTH on, TLS up and EHLO done.
    fn authable(policy: AuthPolicy) -> SmtpState {
        let mut s = state().with_auth(policy);
        s.on_tls_started();
        assert_eq!(code(&line(&mut s, "EHLO c")), 250);
        s
    }

    fn line(s: &mut SmtpState, text: &str) -> Step {
        s.on_line(text.as_bytes(), &|_| true)
            .expect("test line parses")
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn auth_is_advertised_only_over_tls_with_users() {
        let mut s = state().with_auth(POLICY);
        assert!(!ehlo_text(&mut s).contains("AUTH"));
        s.on_tls_started();
        assert!(ehlo_text(&mut s).contains("250-AUTH PLAIN LOGIN\r\n"));
        let mut s = state();
        s.on_tls_started();
        assert!(!ehlo_text(&mut s).contains("AUTH"));
        assert_eq!(code(&line(&mut s, "AUTH PLAIN")), 502);
    }

    #[test]
    fn auth_before_tls_gets_538() {
        let mut s = state().with_auth(POLICY);
        line(&mut s, "EHLO c");
        let step = line(&mut s, &format!("AUTH PLAIN {}", b64(b"\0a\0b")));
        assert_eq!(code(&step), 538);
        assert_eq!(step.reply.expect("reply").enhanced(), Some((5, 7, 11)));
        assert_eq!(step.effect, Effect::None);
    }

    #[test]
    fn plain_with_initial_response_asks_to_check_then_succeeds() {
        let mut s = authable(POLICY);
        let step = line(&mut s, &format!("AUTH PLAIN {}", b64(b"\0alice\0pw")));
        assert_eq!(step.reply, None);
        let Effect::CheckCredentials(creds) = step.effect else {
            panic!("expected a credentials check, got {:?}", step.effect);
        };
        assert_eq!(
            (creds.user.as_str(), creds.password.as_slice()),
            ("alice", &b"pw"[..])
        );
        assert_eq!(code(&s.on_auth_checked(true)), 235);
        assert_eq!(s.auth_user(), Some("alice"));
        assert_eq!(s.protocol_name(), "ESMTPSA");
        assert_eq!(code(&line(&mut s, "AUTH PLAIN")), 503, "a second AUTH");
    }

    #[test]
    fn login_continuation_lines_go_to_the_exchange_not_the_parser() {
        let mut s = authable(POLICY);
        let step = line(&mut s, "AUTH LOGIN");
        assert_eq!(
            step.reply.expect("reply").to_bytes(),
            b"334 VXNlcm5hbWU6\r\n"
        );
        // "QUIT" as a response is base64 for bytes, not the QUIT command: the exchange takes it.
        let step = line(&mut s, "UVVJVA==");
        assert_eq!(
            step.reply.expect("reply").to_bytes(),
            b"334 UGFzc3dvcmQ6\r\n"
        );
        let step = line(&mut s, &b64(b"pw"));
        assert!(matches!(step.effect, Effect::CheckCredentials(ref c) if c.user == "QUIT"));
        // A raw command word during the exchange is a malformed response, not a command.
        let mut s = authable(POLICY);
        line(&mut s, "AUTH LOGIN");
        let step = line(&mut s, "QUIT");
        assert_eq!(code(&step), 501);
        assert_eq!(step.effect, Effect::None);
        // The exchange is over: the next line is a command again.
        assert_eq!(line(&mut s, "QUIT").effect, Effect::Close);
    }

    #[test]
    fn star_cancels_the_exchange_with_501_5_0_0() {
        let mut s = authable(POLICY);
        line(&mut s, "AUTH PLAIN");
        let step = line(&mut s, "*");
        assert_eq!(code(&step), 501);
        assert_eq!(step.reply.expect("reply").enhanced(), Some((5, 0, 0)));
        assert_eq!(code(&line(&mut s, "NOOP")), 250);
    }

    #[test]
    fn an_overlong_line_ends_the_exchange_with_500_5_5_6() {
        let mut s = authable(POLICY);
        line(&mut s, "AUTH LOGIN");
        let r = s.on_overlong_line();
        assert_eq!((r.code(), r.enhanced()), (500, Some((5, 5, 6))));
        assert_eq!(code(&line(&mut s, "NOOP")), 250);
        assert_eq!(s.on_overlong_line().enhanced(), Some((5, 5, 2)));
    }

    #[test]
    fn auth_sequence_errors() {
        let mut s = state().with_auth(POLICY);
        s.on_tls_started();
        assert_eq!(code(&line(&mut s, "AUTH PLAIN")), 503, "before EHLO");
        line(&mut s, "HELO c");
        assert_eq!(code(&line(&mut s, "AUTH PLAIN")), 503, "after HELO");
        line(&mut s, "EHLO c");
        assert_eq!(code(&line(&mut s, "AUTH CRAM-MD5")), 504);
        line(&mut s, "MAIL FROM:<a@b.c>");
        assert_eq!(code(&line(&mut s, "AUTH PLAIN")), 503, "in a transaction");
    }

    #[test]
    fn failures_get_535_until_the_limit_then_421_and_close() {
        let mut s = authable(POLICY);
        for _ in 0..2 {
            line(&mut s, &format!("AUTH PLAIN {}", b64(b"\0a\0wrong")));
            let step = s.on_auth_checked(false);
            assert_eq!(code(&step), 535);
            assert_eq!(step.effect, Effect::None);
        }
        line(&mut s, &format!("AUTH PLAIN {}", b64(b"\0a\0wrong")));
        let step = s.on_auth_checked(false);
        assert_eq!(code(&step), 421);
        assert_eq!(step.effect, Effect::Close);
        assert_eq!(s.auth_user(), None);
    }

    #[test]
    fn require_auth_refuses_mail_until_authenticated() {
        let mut s = authable(AuthPolicy {
            required: true,
            ..POLICY
        });
        let step = line(&mut s, "MAIL FROM:<a@b.c>");
        assert_eq!(code(&step), 530);
        assert_eq!(step.reply.expect("reply").enhanced(), Some((5, 7, 0)));
        line(&mut s, &format!("AUTH PLAIN {}", b64(b"\0a\0pw")));
        s.on_auth_checked(true);
        assert_eq!(code(&line(&mut s, "MAIL FROM:<a@b.c> AUTH=<>")), 250);
        assert_eq!(code(&line(&mut s, "RCPT TO:<x@y.z>")), 250);
        assert_eq!(line(&mut s, "DATA").effect, Effect::ReadData);
        // RSET and a new EHLO keep the authentication.
        line(&mut s, "RSET");
        line(&mut s, "EHLO again");
        assert_eq!(s.auth_user(), Some("a"));
        assert_eq!(code(&line(&mut s, "MAIL FROM:<a@b.c>")), 250);
    }
}
