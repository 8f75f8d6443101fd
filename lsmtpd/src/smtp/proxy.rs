//! The PROXY protocol (HAProxy, versions 1 and 2): the `smtp.proxy_protocol` section, a pure
//! header parser, and the one async function that reads a header off a fresh connection.
//!
//! A listener in `smtp.proxy_protocol.listen` expects every connection to start with a PROXY
//! header from a peer in `trusted_proxies`; the header's source address then stands for the
//! client everywhere (limits, policy, logs, `Received:`, the spool record). A peer that is not
//! trusted, or that sends no valid header within `timeout`, is closed without a greeting.
//! `PROXY UNKNOWN` (v1) and `LOCAL` or non-IP addresses (v2) mean "no client address": the
//! proxy's own address is used. Normal listeners never look for a header: there, `PROXY ...`
//! is just an unknown command.
//!
//! The parser is pure and incremental: [`parse`] says either how many more bytes the header
//! needs *at least* or where it ends, so the reader never reads past the header and the bytes
//! after it stay in the socket for the SMTP session.
//!
//! Why not the `ppp` crate (checked against ppp 2.3.0, the current release): its parser
//! cannot be fed incrementally, which the rule above needs. Given a valid v1 header byte by
//! byte, `v1::Header::try_from` returns a terminal (`!is_incomplete()`) error as soon as the
//! bytes end in `"<source port> "` (`InvalidDestinationPort`: the still-missing port parses as
//! ""), so every `TCP4`/`TCP6` header would be refused; reading more than the header to dodge
//! that would eat SMTP bytes. It also reports a complete `PROXY UNKNOWN` line with more than
//! four fields as incomplete forever, accepts `+1` as a port, and refuses a v2 `LOCAL` whose
//! (to-be-ignored) family has no address block; the spec, and this parser, decide otherwise.
//! The tests below pin each of these cases.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the spec's limit).
pub const V1_MAX: usize = 107;
/// Longest v2 address block we accept (addresses + TLVs); the spec allows 65535 but real
/// proxies send a few hundred bytes at most.
pub const V2_MAX_PAYLOAD: usize = 4096;
/// The shortest possible header: `PROXY UNKNOWN\r\n`.
const MIN_HEADER: usize = 15;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The proxied client's address (and the address it connected to).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// `PROXY UNKNOWN`, v2 `LOCAL`, or a v2 address family we do not use (UNIX, unspecified):
    /// the connection stands for itself.
    Local,
}

impl ProxyHeader {
    /// The client IP to use: the header's source, or `peer` (the proxy) when there is none.
    pub fn client_ip(&self, peer: IpAddr) -> IpAddr {
        match self {
            ProxyHeader::Proxied { source, .. } => source.ip().to_canonical(),
            ProxyHeader::Local => peer.to_canonical(),
        }
    }
}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// The header needs at least `more` further bytes (reading exactly that many never reads
    /// past the header).
    NeedMore { more: usize },
    /// A complete header of `len` bytes.
    Done { header: ProxyHeader, len: usize },
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
    #[error("no PROXY header within the timeout")]
    TimedOut,
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    #[error("read error")]
    Io,
}

/// Parses the start of a connection. Pure; never reads beyond `buf`, never panics.
pub fn parse(buf: &[u8]) -> Result<Parse, ProxyError> {
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    let v1_len = buf.len().min(6);
    if buf[..sig_len] == V2_SIGNATURE[..sig_len] && !buf.is_empty() {
        return parse_v2(buf);
    }
    if buf[..v1_len] == b"PROXY "[..v1_len] {
        return parse_v1(buf);
    }
    if buf.is_empty() {
        return Ok(Parse::NeedMore { more: MIN_HEADER });
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::BadV1("longer than 107 bytes"));
        }
        return Ok(Parse::NeedMore {
            more: MIN_HEADER.saturating_sub(buf.len()).max(1),
        });
    };
    let len = lf + 1;
    if len > V1_MAX {
        return Err(ProxyError::BadV1("longer than 107 bytes"));
    }
    let line = buf[..lf]
        .strip_suffix(b"\r")
        .ok_or(ProxyError::BadV1("line must end with CRLF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::BadV1("not ASCII"))?;
    let mut fields = line.split(' ');
    let _proxy = fields.next();
    let family = fields.next().ok_or(ProxyError::BadV1("no protocol"))?;
    if family == "UNKNOWN" {
        // The rest of the line is to be ignored (the spec).
        return Ok(Parse::Done {
            header: ProxyHeader::Local,
            len,
        });
    }
    let v6 = match family {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(ProxyError::BadV1("protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    let mut next = || fields.next().ok_or(ProxyError::BadV1("missing field"));
    let src = v1_ip(next()?, v6)?;
    let dst = v1_ip(next()?, v6)?;
    let sport = v1_port(next()?)?;
    let dport = v1_port(next()?)?;
    if fields.next().is_some() {
        return Err(ProxyError::BadV1("extra fields"));
    }
    Ok(Parse::Done {
        header: ProxyHeader::Proxied {
            source: SocketAddr::new(src, sport),
            destination: SocketAddr::new(dst, dport),
        },
        len,
    })
}

fn v1_ip(s: &str, v6: bool) -> Result<IpAddr, ProxyError> {
    let bad = ProxyError::BadV1("bad address");
    if v6 {
        s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad)
    } else {
        s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad)
    }
}

fn v1_port(s: &str) -> Result<u16, ProxyError> {
    // Decimal, no sign, no leading zero (the spec), at most 65535.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return Err(ProxyError::BadV1("bad port"));
    }
    s.parse().map_err(|_| ProxyError::BadV1("bad port"))
}

fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyError> {
    if buf.len() < 16 {
        return Ok(Parse::NeedMore {
            more: 16 - buf.len(),
        });
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2("version must be 2"));
    }
    // Transport protocol: 0 UNSPEC, 1 STREAM, 2 DGRAM; the spec says to refuse anything else.
    if fam & 0x0f > 2 {
        return Err(ProxyError::BadV2("unknown transport protocol"));
    }
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyError::BadV2("address block too long"));
    }
    let len = 16 + payload;
    if buf.len() < len {
        return Ok(Parse::NeedMore {
            more: len - buf.len(),
        });
    }
    let body = &buf[16..len];
    let header = match ver_cmd & 0x0f {
        0x0 => ProxyHeader::Local,
        0x1 => match fam >> 4 {
            // TCP or UDP over IPv4 / IPv6; anything else (UNSPEC, UNIX) has no IP to use.
            0x1 => {
                let b = body
                    .get(..12)
                    .ok_or(ProxyError::BadV2("address block too short for IPv4"))?;
                let ip = |i: usize| IpAddr::from([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(0), u16::from_be_bytes([b[8], b[9]])),
                    destination: SocketAddr::new(ip(4), u16::from_be_bytes([b[10], b[11]])),
                }
            }
            0x2 => {
                let b = body
                    .get(..36)
                    .ok_or(ProxyError::BadV2("address block too short for IPv6"))?;
                let ip = |i: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&b[i..i + 16]);
                    IpAddr::from(a)
                };
                ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(0), u16::from_be_bytes([b[32], b[33]])),
                    destination: SocketAddr::new(ip(16), u16::from_be_bytes([b[34], b[35]])),
                }
            }
            0x0 | 0x3 => ProxyHeader::Local,
            _ => return Err(ProxyError::BadV2("unknown address family")),
        },
        _ => return Err(ProxyError::BadV2("unknown command")),
    };
    Ok(Parse::Done { header, len })
}

/// Reads a PROXY header from the start of `stream`, within `timeout`, consuming exactly the
/// header's bytes.
///
/// # Cancel safety
/// Not cancel-safe (bytes read are lost); it is only raced against its own timeout, after which
/// the connection is dropped anyway.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyError> {
    let read = async {
        let mut buf: Vec<u8> = Vec::with_capacity(V1_MAX);
        loop {
            match parse(&buf)? {
                Parse::Done { header, .. } => return Ok(header),
                Parse::NeedMore { more } => {
                    let start = buf.len();
                    buf.resize(start + more, 0);
                    stream
                        .read_exact(&mut buf[start..])
                        .await
                        .map_err(|e| match e.kind() {
                            std::io::ErrorKind::UnexpectedEof => ProxyError::Closed,
                            _ => ProxyError::Io,
                        })?;
                }
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ProxyError::TimedOut))
}

/// Encodes a v2 header (for tests and the test harness's load-balancer stand-in).
pub fn encode_v2(header: &ProxyHeader, tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let mut body = Vec::new();
    match header {
        ProxyHeader::Local => {
            out.extend_from_slice(&[0x20, 0x00]);
        }
        ProxyHeader::Proxied {
            source,
            destination,
        } => match (source.ip(), destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&[0x21, 0x11]);
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                body.extend_from_slice(&source.port().to_be_bytes());
                body.extend_from_slice(&destination.port().to_be_bytes());
            }
            (s, d) => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => a,
                };
                out.extend_from_slice(&[0x21, 0x21]);
                body.extend_from_slice(&v6(s).octets());
                body.extend_from_slice(&v6(d).octets());
                body.extend_from_slice(&source.port().to_be_bytes());
                body.extend_from_slice(&destination.port().to_be_bytes());
            }
        },
    }
    body.extend_from_slice(tlvs);
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Encodes a v1 header.
pub fn encode_v1(header: &ProxyHeader) -> Vec<u8> {
    match header {
        ProxyHeader::Local => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyHeader::Proxied {
            source,
            destination,
        } => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Feeds `input` the way `read_header` does; returns the header and the bytes consumed.
    fn drive(input: &[u8]) -> Result<(ProxyHeader, usize), ProxyError> {
        let mut have = 0;
        loop {
            match parse(&input[..have])? {
                Parse::Done { header, len } => {
                    assert_eq!(len, have, "Done must come exactly at the header's end");
                    return Ok((header, len));
                }
                Parse::NeedMore { more } => {
                    assert!(more >= 1);
                    if have + more > input.len() {
                        return Err(ProxyError::Closed);
                    }
                    have += more;
                }
            }
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let (h, len) = drive(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n").unwrap();
        assert_eq!(len, 44);
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: sa("192.0.2.1:56324"),
                destination: sa("198.51.100.2:25")
            }
        );
        let (h, _) = drive(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n").unwrap();
        assert_eq!(
            h.client_ip(IpAddr::from([10, 0, 0, 1])),
            sa("[2001:db8::1]:1").ip()
        );
        let (h, len) = drive(b"PROXY UNKNOWN ffff::1 whatever\r\nQUIT\r\n").unwrap();
        assert_eq!((h, len), (ProxyHeader::Local, 32));
        assert_eq!(
            h.client_ip(IpAddr::from([10, 0, 0, 1])),
            IpAddr::from([10, 0, 0, 1])
        );
    }

    #[test]
    fn v1_is_complete_only_at_its_crlf_whatever_the_split() {
        // Every prefix short of the CRLF needs more, none is an error (ppp 2.3.0 fails this
        // at "... 56324 ", see the module doc).
        let full = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n";
        for n in 0..full.len() {
            assert!(
                matches!(parse(&full[..n]), Ok(Parse::NeedMore { .. })),
                "{:?}",
                String::from_utf8_lossy(&full[..n])
            );
        }
        assert!(matches!(parse(full), Ok(Parse::Done { len: 44, .. })));
    }

    #[test]
    fn v1_unknown_ignores_any_number_of_fields_before_the_crlf() {
        let input = b"PROXY UNKNOWN a b c d e f\r\nQUIT\r\n";
        assert_eq!(drive(input), Ok((ProxyHeader::Local, 27)));
    }

    #[test]
    fn v1_garbage_is_refused() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n"[..],
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 25\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"EHLO client.example\r\n",
            b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        ] {
            assert!(drive(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // A port is decimal digits only (`u16::from_str` alone would take the `+`).
        assert_eq!(
            drive(b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 25\r\n"),
            Err(ProxyError::BadV1("bad port"))
        );
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(
            drive(&long),
            Err(ProxyError::BadV1("longer than 107 bytes"))
        );
    }

    #[test]
    fn v2_proxy_local_and_unix() {
        let h = ProxyHeader::Proxied {
            source: sa("203.0.113.7:40000"),
            destination: sa("192.0.2.25:25"),
        };
        let bytes = encode_v2(&h, &[0x04, 0x00, 0x01, 0xAA]);
        assert_eq!(drive(&bytes).unwrap(), (h, bytes.len()));
        let h6 = ProxyHeader::Proxied {
            source: sa("[2001:db8::7]:40000"),
            destination: sa("[2001:db8::25]:25"),
        };
        assert_eq!(drive(&encode_v2(&h6, &[])).unwrap().0, h6);
        assert_eq!(
            drive(&encode_v2(&ProxyHeader::Local, &[])).unwrap().0,
            ProxyHeader::Local
        );
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        assert_eq!(drive(&unix).unwrap().0, ProxyHeader::Local);
        // LOCAL: the family is to be ignored, even with no address block behind it.
        let mut local_inet = V2_SIGNATURE.to_vec();
        local_inet.extend_from_slice(&[0x20, 0x11, 0x00, 0x00]);
        assert_eq!(drive(&local_inet), Ok((ProxyHeader::Local, 16)));
    }

    #[test]
    fn v2_garbage_is_refused() {
        let good = encode_v2(
            &ProxyHeader::Proxied {
                source: sa("203.0.113.7:1"),
                destination: sa("192.0.2.25:25"),
            },
            &[],
        );
        let mut bad_version = good.clone();
        bad_version[12] = 0x11;
        let mut bad_cmd = good.clone();
        bad_cmd[12] = 0x22;
        let mut short = good.clone();
        short[15] = 4;
        short.truncate(20);
        let mut huge = good.clone();
        huge[14] = 0xff;
        let mut bad_transport = good.clone();
        bad_transport[13] = 0x14;
        for bad in [bad_version, bad_cmd, short, huge, bad_transport] {
            assert!(drive(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn read_header_leaves_the_smtp_bytes_in_the_stream() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            tokio::io::AsyncWriteExt::write_all(
                &mut b,
                b"PROXY TCP4 192.0.2.1 192.0.2.2 5 25\r\nEHLO x\r\n",
            )
            .await
            .unwrap();
            let h = read_header(&mut a, Duration::from_secs(5)).await.unwrap();
            assert_eq!(
                h.client_ip(IpAddr::from([127, 0, 0, 1])),
                IpAddr::from([192, 0, 2, 1])
            );
            let mut rest = [0u8; 8];
            a.read_exact(&mut rest).await.unwrap();
            assert_eq!(&rest, b"EHLO x\r\n");
        });
    }

    #[test]
    fn read_header_times_out_on_a_silent_peer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            // Half a header, then silence.
            tokio::io::AsyncWriteExt::write_all(&mut b, b"PROXY TCP4 192.0.2.1")
                .await
                .unwrap();
            let r = read_header(&mut a, Duration::from_millis(50)).await;
            assert_eq!(r, Err(ProxyError::TimedOut));
        });
    }

    #[test]
    fn config_needs_trusted_proxies_a_port_of_its_own_and_a_timeout() {
        let smtp_listen = [sa("127.0.0.1:2525")];
        let mut problems = Vec::new();
        ProxyConfig::default().validate(&smtp_listen, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let cfg = ProxyConfig {
            listen: vec![sa("127.0.0.1:2525")],
            trusted_proxies: vec!["10.0.0.300".into()],
            timeout: Duration::ZERO,
        };
        cfg.validate(&smtp_listen, &mut problems);
        let names: Vec<_> = problems.iter().map(|p| p.setting.as_str()).collect();
        assert_eq!(
            names,
            [
                "smtp.proxy_protocol.trusted_proxies",
                "smtp.proxy_protocol.listen",
                "smtp.proxy_protocol.timeout"
            ]
        );
        let mut problems = Vec::new();
        ProxyConfig {
            listen: vec![sa("0.0.0.0:2526")],
            ..ProxyConfig::default()
        }
        .validate(&smtp_listen, &mut problems);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("must name"), "{}", problems[0]);
    }

    fn any_addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<[u8; 4]>(),
                any::<u16>()
            )
                .prop_map(|(s, sp, d, dp)| (
                    SocketAddr::new(IpAddr::from(s), sp),
                    SocketAddr::new(IpAddr::from(d), dp)
                )),
            (
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<u16>()
            )
                .prop_map(|(s, sp, d, dp)| (
                    SocketAddr::new(IpAddr::from(s), sp),
                    SocketAddr::new(IpAddr::from(d), dp)
                )),
        ]
    }

    proptest! {
        #[test]
        fn encoded_headers_parse_back_and_consume_exactly_themselves(
            (source, destination) in any_addr_pair(),
            v2 in any::<bool>(),
            tlvs in proptest::collection::vec(any::<u8>(), 0..64),
            trailing in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let h = ProxyHeader::Proxied { source, destination };
            let mut bytes = if v2 { encode_v2(&h, &tlvs) } else { encode_v1(&h) };
            let len = bytes.len();
            bytes.extend_from_slice(&trailing);
            prop_assert_eq!(drive(&bytes), Ok((h, len)));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_overread(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            // Done is only ever reported at exactly the bytes given (checked in drive).
            let _ = drive(&bytes);
        }

        #[test]
        fn arbitrary_bytes_after_a_v2_signature_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let input = [V2_SIGNATURE.as_slice(), &bytes].concat();
            let _ = drive(&input);
        }

        #[test]
        fn arbitrary_text_after_proxy_never_panics(s in "\\PC{0,120}") {
            let input = format!("PROXY {s}\r\n");
            let _ = drive(input.as_bytes());
        }
    }
}
