//! What the in-process tests share: a small SMTP client over any byte stream (a
//! `tokio::io::duplex` end or a TCP socket), independent dot-stuffing, and reading back what a
//! spool holds.
//!
//! The spool is read only through the calls the end-to-end harness uses too (`Spool::open`,
//! `list`, `body`), so a rewrite of the spool's internals does not touch these tests.
#![allow(dead_code)] // each test file uses a part
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

use bytes::Bytes;
use lsmtpd::config::SpoolConfig;
use lsmtpd::spool::{Record, Spool};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};

/// One SMTP reply: its code and the text of each line (without the code and separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The last line's text, e.g. `5.3.4 Message size exceeds fixed limit`.
    pub fn text(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    /// `"552 5.3.4"`: the code and the enhanced code of the last line.
    pub fn codes(&self) -> String {
        let enhanced = self.text().split(' ').next().unwrap_or("");
        format!("{} {enhanced}", self.code)
    }
}

/// A client that writes raw bytes and parses replies, over any stream.
pub struct Client<S> {
    reader: BufReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        let (r, w) = tokio::io::split(stream);
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Closes our sending side: the server reads end-of-file.
    pub async fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.writer.shutdown().await
    }

    /// Reads one (possibly multi-line) reply. An error if the server closed first.
    pub async fn reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line
                .strip_suffix("\r\n")
                .ok_or_else(|| bad(format!("reply line without CRLF: {line:?}")))?;
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad(format!("no reply code: {line:?}")))?;
            let sep = line.as_bytes().get(3).copied();
            lines.push(line.get(4..).unwrap_or("").to_string());
            match sep {
                Some(b'-') => continue,
                Some(b' ') | None => return Ok(Reply { code, lines }),
                Some(_) => return Err(bad(format!("bad separator: {line:?}"))),
            }
        }
    }

    /// Sends `line` with CRLF and reads the reply.
    pub async fn cmd(&mut self, line: &str) -> std::io::Result<Reply> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// MAIL, RCPT for each recipient, DATA and the already stuffed `data` (terminator
    /// included); returns the reply to the end of data. Each reply before it must be positive.
    pub async fn send_message(
        &mut self,
        from: &str,
        rcpts: &[&str],
        data: &[u8],
    ) -> std::io::Result<Reply> {
        let mut steps = vec![format!("MAIL FROM:<{from}>")];
        steps.extend(rcpts.iter().map(|r| format!("RCPT TO:<{r}>")));
        steps.push("DATA".to_string());
        for step in steps {
            let r = self.cmd(&step).await?;
            if r.code >= 400 {
                return Err(bad(format!("{step}: {r:?}")));
            }
        }
        self.send(data).await?;
        self.reply().await
    }

    /// True when the server closed the connection and sent nothing more.
    pub async fn closed(&mut self) -> std::io::Result<bool> {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).await?;
        Ok(rest.is_empty())
    }
}

fn bad(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// Dot-stuffs `body` and appends the terminator, as a client sends it (written here rather than
/// taken from the code under test). `body` must end with CRLF or be empty.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    assert!(
        body.is_empty() || body.ends_with(b"\r\n"),
        "test bodies end with CRLF"
    );
    let mut out = Vec::with_capacity(body.len() + 8);
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The stored bytes without our `Received:` header (which may be folded over several lines).
pub fn strip_received(stored: &[u8]) -> &[u8] {
    assert!(
        stored.starts_with(b"Received: "),
        "no Received: header first"
    );
    let mut i = 0;
    loop {
        let end = i
            + stored[i..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("header line ends")
            + 2;
        match stored.get(end) {
            Some(b' ') | Some(b'\t') => i = end,
            _ => return &stored[end..],
        }
    }
}

/// A spool configuration in `dir` (the rest default).
pub fn spool_config(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        ..SpoolConfig::default()
    }
}

/// Every message in `spool` with its stored bytes, in id order.
pub fn stored(spool: &Spool) -> Vec<(Record, Bytes)> {
    spool
        .list()
        .unwrap()
        .into_iter()
        .map(|(record, _leased)| {
            let body = spool.body(record.id).unwrap().expect("a body");
            (record, body)
        })
        .collect()
}
