//! One SMTP connection: the imperative shell around [`SmtpState`].
//!
//! Reads bytes, cuts them into command lines ([`LineBuffer`]), lets the pure state machine decide,
//! runs the effect it asks for (read DATA, read a BDAT chunk) and writes the replies. Replies are
//! buffered and written whenever the session is about to wait for input, which is exactly what
//! PIPELINING (RFC 2920) needs.
//!
//! Invariants:
//! - `250` to the end of a message is written only after [`Spool::accept`] returned `Ok`, i.e. the
//!   message is committed and fsynced. A failed store gets 451/452, never 250.
//! - Message bytes held in memory are charged to the daemon-wide memory budget while they are
//!   received and stored; a message that does not fit is read to its end, dropped and refused
//!   with 452 4.3.1, so the connection stays usable.
//! - After STARTTLS every byte received in plaintext and not yet answered is dropped, and the
//!   protocol state is reset (RFC 3207 4.2): a command pipelined behind STARTTLS is never run.
//! - Only the wait for the next command races the shutdown token: a command already read, and a
//!   DATA transfer already begun, run to completion (or are cut by the daemon's grace period, in
//!   which case the client never saw 250 and will retry).

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lsmtp_shared::MessageId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::budget::{Budget, Charge};
use crate::config::SmtpConfig;
use crate::metrics::Metrics;
use crate::smtp::auth::{AuthPolicy, Credentials};
use crate::smtp::auth_users::AuthUsers;
use crate::smtp::body::{reservation_for, BodyBuffer};
use crate::smtp::policy::Guard;
use crate::smtp::ratelimit::{message_rate_reply, ErrorCounter};
use crate::smtp::received::received_header;
use crate::smtp::state::{Effect, Limits, Offer, SmtpState, Step};
use crate::smtp::tls::{received_clause, MaybeTls, ServerTls};
use crate::smtp::wire::command::{parse_command, Command};
use crate::smtp::wire::data::{DataError, DataLimits, DotUnstuffer, Feed};
use crate::smtp::wire::line::{LineBuffer, LineError};
use crate::smtp::wire::reply::Reply;
use crate::spool::{now_ms, NewMessage, Spool, SpoolError};

/// How long closing the connection (TLS close_notify, TCP FIN) may take at the end of a session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of one socket read while a message body is read.
const READ_CHUNK: usize = 16 * 1024;
/// Size of one socket read between commands: an idle connection holds only this much.
const COMMAND_READ: usize = 1024;

/// What every session of a daemon shares.
pub struct SessionContext {
    pub config: Arc<SmtpConfig>,
    pub spool: Spool,
    /// The daemon's memory budget (`memory.budget_bytes`): bodies are charged to it.
    pub budget: Budget,
    pub metrics: Arc<Metrics>,
    pub token: CancellationToken,
    /// The TLS acceptor when `smtp.tls` has a certificate (STARTTLS is then offered).
    pub tls: Option<Arc<ServerTls>>,
    /// The users table when `smtp.auth.users_file` is set: AUTH is offered (over TLS).
    pub auth: Option<Arc<AuthUsers>>,
    /// Recipient policy, rate limits, trusted PROXY peers (`smtp.policy`, `smtp.limits`).
    pub guard: Arc<Guard>,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// How a read ended.
enum Input {
    Data(usize),
    Eof,
    TimedOut,
    Cancelled,
}

/// The session: owns the connection and its buffers.
pub struct Session<S> {
    /// Connection-limit slots, released by [`Session::run`] before it closes the socket (and
    /// declared first, so a session dropped without `run` releases them before the socket too).
    slots: Option<Box<dyn Send>>,
    stream: MaybeTls<S>,
    /// Implicit TLS (RFC 8314): the handshake runs before the greeting.
    implicit_tls: bool,
    /// The `Received:` clause naming the TLS version and cipher, once TLS is on.
    tls_clause: Option<String>,
    peer: IpAddr,
    ctx: Arc<SessionContext>,
    state: SmtpState,
    lines: LineBuffer,
    out: Vec<u8>,
    read_buf: Vec<u8>,
    /// The body of a BDAT transaction in progress.
    bdat_body: Option<(MessageId, BodyBuffer)>,
    /// Budget reserved at MAIL FROM for the declared `SIZE=`, until the body takes it over.
    reserved: Option<Charge>,
    /// Error replies so far (`smtp.limits.hard_error_limit`).
    errors: ErrorCounter,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub fn new(stream: S, peer: IpAddr, ctx: Arc<SessionContext>) -> Session<S> {
        let limits = Limits {
            max_message_bytes: ctx.config.max_message_bytes,
            max_recipients: ctx.config.max_recipients,
        };
        let offer = Offer {
            server_name: ctx.config.server_name.clone(),
            starttls: ctx.tls.is_some(),
            tls_required: ctx.tls.as_ref().is_some_and(|t| t.required()),
        };
        let lines = LineBuffer::new(ctx.config.max_command_line_bytes);
        let auth = AuthPolicy {
            enabled: ctx.auth.is_some(),
            required: ctx.config.auth.require_auth,
            max_failures: ctx.config.auth.max_failures,
        };
        let errors = ErrorCounter::new(ctx.config.limits.hard_error_limit);
        Session {
            slots: None,
            stream: MaybeTls::Plain(stream),
            implicit_tls: false,
            tls_clause: None,
            peer,
            ctx,
            state: SmtpState::new(limits, offer).with_auth(auth),
            lines,
            out: Vec::with_capacity(512),
            read_buf: vec![0; COMMAND_READ],
            bdat_body: None,
            reserved: None,
            errors,
        }
    }

    /// Holds `slots` (connection-limit permits) for the session's life.
    pub fn with_slots(mut self, slots: Box<dyn Send>) -> Session<S> {
        self.slots = Some(slots);
        self
    }

    /// Makes this an implicit-TLS session (RFC 8314): [`Session::run`] handshakes before the
    /// greeting, and a failed handshake ends the session. Needs `ctx.tls`.
    pub fn with_implicit_tls(mut self) -> Session<S> {
        self.implicit_tls = true;
        self
    }

    /// Runs the session to its end: QUIT, the client closing, a timeout, or shutdown.
    pub async fn run(mut self) -> Result<(), SessionError> {
        let served = self.serve().await;
        // The connection-limit slots go before the client can see our close: a client that
        // reconnects the moment it sees it must not find its own old session still counted.
        drop(self.slots.take());
        if served.is_ok() {
            // Over TLS this sends close_notify, so the client can tell our close from a cut.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
        }
        served
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        if self.implicit_tls && !self.start_tls().await {
            return Ok(());
        }
        Reply::greeting(&self.ctx.config.server_name).write_to(&mut self.out);
        loop {
            // Answer every complete command already buffered (pipelining) before reading more.
            while let Some(line) = self.lines.next_line() {
                let keep_going = match line {
                    Ok(line) => self.on_line(&line).await?,
                    Err(LineError::TooLong) => {
                        self.ctx
                            .metrics
                            .rejected_commands
                            .fetch_add(1, Ordering::Relaxed);
                        let reply = self.state.on_overlong_line();
                        self.send_reply(reply)
                    }
                };
                if !keep_going {
                    self.flush().await?;
                    return Ok(());
                }
            }
            self.flush().await?;
            match self.read(self.ctx.config.command_timeout, true).await? {
                Input::Data(n) => {
                    let chunk = &self.read_buf[..n];
                    self.lines.extend(chunk);
                }
                Input::Eof => return Ok(()),
                Input::TimedOut => {
                    Reply::timeout().write_to(&mut self.out);
                    self.flush().await?;
                    return Ok(());
                }
                Input::Cancelled => {
                    Reply::service_closing(&self.ctx.config.server_name).write_to(&mut self.out);
                    self.flush().await?;
                    return Ok(());
                }
            }
        }
    }

    /// Writes the buffered replies. A client that stops reading is given `command_timeout`
    /// before the connection is dropped, so it cannot hold a session forever.
    async fn flush(&mut self) -> Result<(), SessionError> {
        if !self.out.is_empty() {
            let write = async {
                self.stream.write_all(&self.out).await?;
                self.stream.flush().await
            };
            match tokio::time::timeout(self.ctx.config.command_timeout, write).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(SessionError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client did not read our replies",
                    )))
                }
            }
            self.out.clear();
        }
        Ok(())
    }

    /// Reads once. Only a read between commands (`between_commands`) races the shutdown token.
    ///
    /// # Cancel safety
    /// A read that loses the race consumed nothing: `read` is cancel-safe.
    async fn read(
        &mut self,
        limit: Duration,
        between_commands: bool,
    ) -> Result<Input, SessionError> {
        let token = self.ctx.token.clone();
        let read = tokio::time::timeout(limit, self.stream.read(&mut self.read_buf));
        let result = if between_commands {
            tokio::select! {
                biased;
                _ = token.cancelled() => return Ok(Input::Cancelled),
                r = read => r,
            }
        } else {
            read.await
        };
        match result {
            Err(_) => Ok(Input::TimedOut),
            Ok(Ok(0)) => Ok(Input::Eof),
            Ok(Ok(n)) => Ok(Input::Data(n)),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Runs one input line (a command, or a response in an AUTH exchange). Returns false when
    /// the session must end.
    async fn on_line(&mut self, line: &[u8]) -> Result<bool, SessionError> {
        let step = if self.state.in_auth_exchange() {
            // A response line of an AUTH exchange: not a command, never parsed as one.
            self.state.on_auth_response(line)
        } else {
            let cmd = match parse_command(line) {
                Ok(cmd) => cmd,
                Err(e) => {
                    self.ctx
                        .metrics
                        .rejected_commands
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, "command_refused");
                    return Ok(self.send_reply(e.reply()));
                }
            };
            match self.run_command(cmd) {
                Some(step) => step,
                None => return Ok(false),
            }
        };
        if let Some(reply) = step.reply {
            if !self.send_reply(reply) {
                return Ok(false);
            }
        }
        match step.effect {
            Effect::None => Ok(true),
            Effect::Close => Ok(false),
            Effect::ReadData => self.receive_data().await,
            Effect::ReadBdat { size, last } => self.receive_bdat(size, last).await,
            Effect::DiscardBdat { size } => self.discard_bdat(size).await,
            Effect::StartTls => {
                // The 220 goes out in plaintext; whatever the client sent behind STARTTLS was
                // sent before the handshake and must never be taken as a command.
                self.flush().await?;
                self.lines.clear();
                Ok(self.start_tls().await)
            }
            Effect::CheckCredentials(creds) => self.check_credentials(creds).await,
        }
    }

    /// A parsed command through the policy, the state machine and the message rate. Returns the
    /// step to run, or None when a refusal reached the hard error limit (the session must end).
    fn run_command(&mut self, cmd: Command) -> Option<Step> {
        if let Some(refusal) = self.refuse_by_policy(&cmd) {
            return self.send_reply(refusal).then(Step::none);
        }
        let is_mail = matches!(cmd, Command::Mail { .. });
        let spool = &self.ctx.spool;
        let budget = &self.ctx.budget;
        let max = self.ctx.config.max_message_bytes;
        let reservation = std::cell::RefCell::new(None);
        let mut step = self.state.on_command(cmd, &|size| {
            if spool.check_capacity(size).is_err() {
                return false;
            }
            if size == 0 {
                // No SIZE=: the body is charged chunk by chunk as it arrives.
                return true;
            }
            // Reserved before the client sends a byte; short: 452 4.3.1 right here.
            match budget.try_reserve(reservation_for(size, max)) {
                Some(charge) => {
                    *reservation.borrow_mut() = Some(charge);
                    true
                }
                None => {
                    debug!(declared = size, "message_refused_memory_budget");
                    false
                }
            }
        });
        if let Some(charge) = reservation.into_inner() {
            self.reserved = Some(charge);
        }
        if is_mail && step.reply.as_ref().is_some_and(Reply::is_positive) {
            // Counted at accepted MAIL FROM: over the rate, the transaction is undone.
            if !self.ctx.guard.limits.allow_message(self.peer) {
                self.state.end_transaction();
                self.ctx
                    .metrics
                    .rate_limited_messages
                    .fetch_add(1, Ordering::Relaxed);
                info!(client_ip = %self.peer, "message_refused_rate");
                step.reply = Some(message_rate_reply());
            }
        }
        if self.state.envelope().is_none() {
            // No transaction (RSET, refused MAIL, a new EHLO): nothing stays reserved.
            self.reserved = None;
        }
        Some(step)
    }

    /// Runs the TLS handshake (within `smtp.tls.handshake_timeout`, or until shutdown). Returns
    /// false when it failed: the session must end, since the stream is no longer usable.
    async fn start_tls(&mut self) -> bool {
        let Some(tls) = self.ctx.tls.clone() else {
            return false;
        };
        // No transaction exists during a handshake, so shutdown may cut it short.
        let token = self.ctx.token.clone();
        let upgraded = tokio::select! {
            _ = token.cancelled() => {
                debug!("tls_handshake_cancelled_by_shutdown");
                return false;
            }
            r = self.stream.upgrade(&tls, tls.handshake_timeout()) => r,
        };
        match upgraded {
            Ok((version, cipher)) => {
                debug!(version = %version, cipher = %cipher, "tls_started");
                self.tls_clause = Some(received_clause(&version, &cipher));
                self.state.on_tls_started();
                true
            }
            Err(e) => {
                info!(client_ip = %self.peer, error = %e, "tls_handshake_failed");
                false
            }
        }
    }

    /// Checks AUTH credentials on the blocking pool, delays a failure by
    /// `smtp.auth.failure_delay`, counts and logs the outcome (the user name, never the
    /// password), and writes the state machine's reply.
    async fn check_credentials(&mut self, creds: Credentials) -> Result<bool, SessionError> {
        let user = creds.user.clone();
        let valid = match &self.ctx.auth {
            Some(users) => users.check(creds).await,
            None => false,
        };
        let metrics = &self.ctx.metrics;
        if valid {
            metrics.auth_succeeded.fetch_add(1, Ordering::Relaxed);
            info!(client_ip = %self.peer, user = ?user, "auth_succeeded");
        } else {
            metrics.auth_failed.fetch_add(1, Ordering::Relaxed);
            warn!(client_ip = %self.peer, user = ?user, "auth_failed");
            // Replies queued before the AUTH go out now; the 535 only after the delay.
            self.flush().await?;
            tokio::time::sleep(self.ctx.config.auth.failure_delay).await;
        }
        let step = self.state.on_auth_checked(valid);
        if let Some(reply) = &step.reply {
            reply.write_to(&mut self.out);
        }
        Ok(step.effect != Effect::Close)
    }

    /// Queues `reply` and counts it against `smtp.limits.hard_error_limit`. Returns false when
    /// the limit is reached: `421 4.7.0 Too many errors` is queued too and the session must end.
    fn send_reply(&mut self, reply: Reply) -> bool {
        reply.write_to(&mut self.out);
        if !self.errors.on_reply(reply.code()) {
            return true;
        }
        self.ctx
            .metrics
            .too_many_errors
            .fetch_add(1, Ordering::Relaxed);
        warn!(client_ip = %self.peer, errors = self.errors.errors(), "too_many_errors");
        Reply::too_many_errors().write_to(&mut self.out);
        false
    }

    /// `smtp.policy` at RCPT TO (only within a transaction; out of sequence, the state machine
    /// answers 503 as usual). Returns the refusal, if any.
    fn refuse_by_policy(&self, cmd: &Command) -> Option<Reply> {
        let Command::Rcpt { to, .. } = cmd else {
            return None;
        };
        self.state.envelope()?;
        // An authenticated client may send from any network (not to any recipient).
        let authenticated = self.state.auth_user().is_some();
        let refusal = self
            .ctx
            .guard
            .policy
            .check_rcpt(self.peer, authenticated, to)
            .err()?;
        self.ctx
            .metrics
            .policy_refused_recipients
            .fetch_add(1, Ordering::Relaxed);
        info!(client_ip = %self.peer, reason = refusal.name(), "recipient_refused");
        debug!(rcpt = %to, "recipient_refused_address");
        Some(refusal.reply(to))
    }

    /// Builds the `Received:` header and a fresh id for the message that is starting.
    fn start_message(&self) -> (MessageId, Vec<u8>) {
        let id = MessageId::new_v7();
        let greeting = self.state.greeting().map(|g| g.name.as_str()).unwrap_or("");
        let rcpts = self
            .state
            .envelope()
            .map(|e| e.rcpts.as_slice())
            .unwrap_or(&[]);
        let single = match rcpts {
            [one] => Some(one.to_string()),
            _ => None,
        };
        let header = received_header(
            greeting,
            self.peer,
            &self.ctx.config.server_name,
            self.state.protocol_name(),
            self.tls_clause.as_deref(),
            id,
            single.as_deref(),
            time::OffsetDateTime::now_utc(),
        );
        (id, header)
    }

    /// A new body for the message starting now, sized from `SIZE=` and taking over what MAIL
    /// FROM reserved.
    fn new_body(&mut self) -> (MessageId, BodyBuffer) {
        let (id, header) = self.start_message();
        let max = self.ctx.config.max_message_bytes;
        let declared = self
            .state
            .envelope()
            .and_then(|e| e.params.size)
            .filter(|&d| d > 0)
            .map(|d| usize::try_from(d.min(max)).unwrap_or(usize::MAX));
        let charge = self
            .reserved
            .take()
            .unwrap_or_else(|| self.ctx.budget.charge());
        (id, BodyBuffer::new(&header, declared, charge))
    }

    /// Grows the read buffer for a body (and shrinks it back between commands).
    fn body_reads(&mut self, on: bool) {
        let want = if on { READ_CHUNK } else { COMMAND_READ };
        if self.read_buf.len() != want {
            self.read_buf = vec![0; want];
        }
    }

    async fn receive_data(&mut self) -> Result<bool, SessionError> {
        // The client waits for the 354 before it sends the body.
        self.flush().await?;
        let (id, mut body) = self.new_body();
        let max_bytes = usize::try_from(self.ctx.config.max_message_bytes).unwrap_or(usize::MAX);
        let mut reader = DotUnstuffer::new(DataLimits {
            max_bytes,
            max_line: self.ctx.config.data_line_limit(),
            bare_newline: self.ctx.config.bare_newline,
        });
        if body.over_budget() {
            reader.discard();
        }
        self.body_reads(true);
        // Bytes that arrived behind the DATA command are the body's first bytes.
        let mut pending = self.lines.take_buffered();
        let done = loop {
            let mut at = 0;
            let mut consumed = None;
            while at < pending.len() {
                // Fed in pieces that fit the body's current chunk: it never reallocates.
                let n = body.feed_len(pending.len() - at);
                if body.over_budget() {
                    reader.discard();
                }
                match reader.feed(&pending[at..at + n], body.sink()) {
                    Feed::Done { consumed: c } => {
                        consumed = Some(at + c);
                        break;
                    }
                    Feed::NeedMore => at += n,
                }
            }
            if let Some(consumed) = consumed {
                self.lines.extend(&pending[consumed..]);
                break true;
            }
            match self.read(self.ctx.config.data_timeout, false).await? {
                Input::Data(n) => {
                    pending.clear();
                    pending.extend_from_slice(&self.read_buf[..n]);
                }
                Input::Eof | Input::Cancelled => {
                    warn!(msg_id = %id, "connection_lost_in_data");
                    break false;
                }
                Input::TimedOut => {
                    Reply::timeout().write_to(&mut self.out);
                    break false;
                }
            }
        };
        self.body_reads(false);
        if !done {
            // `body` and its charge are dropped here: the budget gets its bytes back.
            return Ok(false);
        }
        let refusal = match reader.finish() {
            Err(e) => Some(data_error_reply(&e, &self.ctx.config)),
            Ok(()) if body.over_budget() => {
                info!(msg_id = %id, client_ip = %self.peer, "message_refused_memory_budget");
                Some(Reply::insufficient_storage())
            }
            Ok(()) => None,
        };
        self.finish_message(id, body, refusal).await;
        Ok(true)
    }

    async fn receive_bdat(&mut self, size: u64, last: bool) -> Result<bool, SessionError> {
        let (id, mut body) = match self.bdat_body.take() {
            Some(started) => started,
            None => self.new_body(),
        };
        if body.over_budget() {
            self.state.refuse_bdat(Reply::insufficient_storage());
        }
        let max = self.ctx.config.max_message_bytes;
        let so_far = body.body_len() as u64;
        if so_far.saturating_add(size) > max {
            self.state.refuse_bdat(Reply::message_too_big());
        }
        let keep = self.state.bdat_refusal().is_none();
        if !keep {
            // The message is refused already: free what its earlier chunks hold.
            body.give_up();
        }
        let Some(()) = self.copy_chunk(size, keep.then_some(&mut body)).await? else {
            return Ok(false);
        };
        if !last {
            Reply::new(250, Some((2, 0, 0)), format!("{size} octets received"))
                .write_to(&mut self.out);
            self.bdat_body = Some((id, body));
            return Ok(true);
        }
        let refusal = self.state.bdat_refusal().cloned();
        self.finish_message(id, body, refusal).await;
        Ok(true)
    }

    /// Copies `size` bytes of a BDAT chunk into `body` (or drops them when `body` is None).
    /// Returns None when the connection ended first.
    async fn copy_chunk(
        &mut self,
        size: u64,
        body: Option<&mut BodyBuffer>,
    ) -> Result<Option<()>, SessionError> {
        self.body_reads(true);
        let copied = self.copy_chunk_reads(size, body).await;
        self.body_reads(false);
        copied
    }

    async fn copy_chunk_reads(
        &mut self,
        size: u64,
        mut body: Option<&mut BodyBuffer>,
    ) -> Result<Option<()>, SessionError> {
        let mut left = size;
        let mut pending = self.lines.take_buffered();
        loop {
            let take = usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(pending.len());
            if let Some(b) = body.as_deref_mut() {
                if !b.append(&pending[..take]) {
                    self.state.refuse_bdat(Reply::insufficient_storage());
                    body = None;
                }
            }
            left -= take as u64;
            if left == 0 {
                self.lines.extend(&pending[take..]);
                return Ok(Some(()));
            }
            self.flush().await?;
            match self.read(self.ctx.config.data_timeout, false).await? {
                Input::Data(n) => {
                    pending.clear();
                    pending.extend_from_slice(&self.read_buf[..n]);
                }
                Input::Eof | Input::Cancelled => return Ok(None),
                Input::TimedOut => {
                    Reply::timeout().write_to(&mut self.out);
                    return Ok(None);
                }
            }
        }
    }

    async fn discard_bdat(&mut self, size: u64) -> Result<bool, SessionError> {
        Ok(self.copy_chunk(size, None).await?.is_some())
    }

    /// Stores the message (or refuses it) and ends the transaction. Writes the reply.
    async fn finish_message(&mut self, id: MessageId, body: BodyBuffer, refusal: Option<Reply>) {
        let envelope = self.state.envelope().cloned();
        let tls = self.state.tls();
        let helo = self
            .state
            .greeting()
            .map(|g| g.name.clone())
            .unwrap_or_default();
        self.state.end_transaction();
        let (Some(envelope), None) = (envelope, &refusal) else {
            let reply = refusal.unwrap_or_else(Reply::bad_sequence);
            self.ctx
                .metrics
                .rejected_messages
                .fetch_add(1, Ordering::Relaxed);
            info!(msg_id = %id, client_ip = %self.peer, code = reply.code(), "message_refused");
            reply.write_to(&mut self.out);
            return;
        };
        // The charge stays held until the spool has answered: it covers the spool's copy too.
        let (bytes, charge) = body.finish();
        let size = bytes.len() as u64;
        let mail_from = envelope.from.to_string();
        let rcpt_to: Vec<String> = envelope.rcpts.iter().map(|r| r.to_string()).collect();
        let rcpt_count = rcpt_to.len();
        let msg = NewMessage {
            id,
            received_at_ms: now_ms(),
            client_ip: self.peer,
            helo,
            tls,
            auth_user: self.state.auth_user().map(str::to_string),
            mail_from: mail_from.clone(),
            rcpt_to,
            body: bytes,
        };
        // The terminator was parsed just before this call: `started` is the end of the data too.
        let started = std::time::Instant::now();
        let stored = self.ctx.spool.accept(msg).await;
        drop(charge);
        let accepted = stored.is_ok();
        let reply = match stored {
            Ok(()) => {
                self.errors.on_message_accepted();
                self.ctx
                    .metrics
                    .accepted_messages
                    .fetch_add(1, Ordering::Relaxed);
                info!(
                    msg_id = %id,
                    sender = %mail_from,
                    rcpts = rcpt_count,
                    size,
                    client_ip = %self.peer,
                    store_us = started.elapsed().as_micros() as u64,
                    "message_spooled"
                );
                Reply::queued(id)
            }
            Err(e) => {
                self.ctx
                    .metrics
                    .rejected_messages
                    .fetch_add(1, Ordering::Relaxed);
                warn!(msg_id = %id, client_ip = %self.peer, error = %e, "message_not_spooled");
                spool_error_reply(&e)
            }
        };
        reply.write_to(&mut self.out);
        if accepted {
            self.ctx.metrics.end_of_data.observe_since(started);
        }
    }
}

/// The reply to a message the DATA reader refused.
fn data_error_reply(e: &DataError, config: &SmtpConfig) -> Reply {
    match e {
        DataError::TooLarge => Reply::message_too_big(),
        DataError::BareNewline => Reply::bare_newline(),
        DataError::LineTooLong => Reply::line_too_long_in_data(config.max_line_bytes),
        // finish() before the terminator: a bug of ours; never a 250.
        DataError::Incomplete => Reply::storage_failed(),
    }
}

/// The reply to a failed store: never 250.
fn spool_error_reply(e: &SpoolError) -> Reply {
    match e {
        SpoolError::Full { .. } => Reply::insufficient_storage(),
        _ => Reply::storage_failed(),
    }
}
