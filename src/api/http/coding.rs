//! HTTP content codings (RFC 9110 8.4): gzip and deflate request bodies are decoded,
//! within `max_request_bytes` measured after decoding (a small body that inflates past
//! the limit is 413, and never more than the limit is inflated); inference answers are
//! compressed as the client's Accept-Encoding asks. Large bodies are inflated and
//! compressed on the blocking pool, off the async threads.

use std::io::{Read, Write};

use axum::http::{HeaderMap, header};
use bytes::Bytes;

use crate::error::{Error, Result};

/// The codings this server decodes and applies (Accept-Encoding of a refusal).
pub const ACCEPTED: &str = "gzip, deflate";
/// Bodies at most this large (compressed) are tried inline, on the async thread...
const INLINE_INPUT: usize = 16 << 10;
/// ...as long as they inflate to at most this much; larger work goes to the blocking pool.
const INLINE_OUTPUT: usize = 256 << 10;
/// Answers above this are compressed on the blocking pool.
const INLINE_COMPRESS: usize = 64 << 10;
/// Answers below this are not worth compressing (unless identity was refused).
const MIN_COMPRESS: usize = 512;
/// Content codings stacked on one request body at most.
const MAX_CODINGS: usize = 2;
/// The header named in refusals.
const UNSUPPORTED: &str = "Content-Encoding";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP's "deflate": the zlib format (RFC 1950). Bare deflate (RFC 1951), which
    /// some clients send under this name, is accepted on requests too.
    Deflate,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The request body's codings in the order they were applied; identity left out.
pub fn request_codings(headers: &HeaderMap) -> Result<Vec<Coding>> {
    let mut out = Vec::new();
    for v in headers.get_all(header::CONTENT_ENCODING) {
        let v = v
            .to_str()
            .map_err(|_| Error::invalid(format!("{UNSUPPORTED} is not visible ASCII")))?;
        for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token.to_ascii_lowercase().as_str() {
                "identity" => {}
                "gzip" | "x-gzip" => out.push(Coding::Gzip),
                "deflate" => out.push(Coding::Deflate),
                _ => {
                    return Err(Error::invalid(format!(
                        "{UNSUPPORTED} '{token}' is not supported (gzip, deflate or identity)"
                    )));
                }
            }
        }
    }
    if out.len() > MAX_CODINGS {
        return Err(Error::invalid(format!(
            "{UNSUPPORTED}: at most {MAX_CODINGS} codings on one body"
        )));
    }
    Ok(out)
}

/// Decodes the request body as its Content-Encoding says; the result is at most
/// `limit` bytes (else 413).
pub async fn decode_request(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes> {
    let codings = request_codings(headers)?;
    if codings.is_empty() {
        return Ok(body);
    }
    let too_large = || Error::PayloadTooLarge { limit };
    if body.len() <= INLINE_INPUT {
        // Small bodies usually inflate to little: no thread hop for them.
        let cap = limit.min(INLINE_OUTPUT);
        match decode_all(body.clone(), &codings, cap)? {
            Some(b) => return Ok(b),
            None if cap == limit => return Err(too_large()),
            None => {}
        }
    }
    tokio::task::spawn_blocking(move || decode_all(body, &codings, limit))
        .await
        .map_err(|e| Error::Internal(format!("decompression task failed: {e}")))??
        .ok_or_else(too_large)
}

/// Undoes `codings` (last applied first); None when a result is over `cap` bytes.
pub(super) fn decode_all(mut data: Bytes, codings: &[Coding], cap: usize) -> Result<Option<Bytes>> {
    for &c in codings.iter().rev() {
        let invalid = |why: String| {
            Error::invalid(format!("request body is not valid {}: {why}", c.as_str()))
        };
        let out = match c {
            Coding::Gzip => gunzip(&data, cap).map_err(|e| invalid(e.to_string()))?,
            Coding::Deflate => {
                let zlib = zlib_header(&data);
                match inflate(&data, zlib, cap) {
                    Ok(out) => out,
                    // A bare deflate stream whose first bytes happen to read as a
                    // zlib header.
                    Err(e) if zlib => inflate(&data, false, cap).map_err(|_| invalid(e))?,
                    Err(e) => return Err(invalid(e)),
                }
            }
        };
        match out {
            Some(v) => data = Bytes::from(v),
            None => return Ok(None),
        }
    }
    Ok(Some(data))
}

/// RFC 1950's two header bytes: deflate method, window at most 32 KiB, check bits.
fn zlib_header(data: &[u8]) -> bool {
    match data {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

/// Room for `n` more bytes in `out`, growing by doubling but never past `cap + 1`
/// (one byte over the cap is how "too large" is seen).
fn grow(out: &mut Vec<u8>, n: usize, cap: usize) {
    if out.capacity() - out.len() < n {
        let room = cap.saturating_add(1) - out.len();
        out.reserve_exact(out.len().max(n).max(32 << 10).min(room));
    }
}

/// Gunzips (concatenated members too); None past `cap`. A truncated stream is an
/// error: flate2 checks each member's CRC and length trailer.
fn gunzip(data: &[u8], cap: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut r = flate2::read::MultiGzDecoder::new(data);
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(Some(out));
        }
        if out.len() + n > cap {
            return Ok(None);
        }
        grow(&mut out, n, cap);
        out.extend_from_slice(&buf[..n]);
    }
}

/// Inflates a zlib (or bare deflate) stream; None past `cap`. Unlike flate2's
/// readers, a stream that ends early is an error, as is data after its end.
fn inflate(data: &[u8], zlib: bool, cap: usize) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut d = flate2::Decompress::new(zlib);
    let mut out = Vec::new();
    loop {
        if out.len() == out.capacity() {
            if out.len() > cap {
                return Ok(None);
            }
            grow(&mut out, 1, cap);
        }
        let (read, wrote) = (d.total_in(), d.total_out());
        let at = usize::try_from(read).unwrap_or(usize::MAX).min(data.len());
        let status = d
            .decompress_vec(&data[at..], &mut out, flate2::FlushDecompress::None)
            .map_err(|e| e.to_string())?;
        match status {
            flate2::Status::StreamEnd => {
                if out.len() > cap {
                    return Ok(None);
                }
                if d.total_in() != data.len() as u64 {
                    return Err("data after the end of the stream".into());
                }
                return Ok(Some(out));
            }
            flate2::Status::Ok | flate2::Status::BufError => {
                let stuck = d.total_in() == read && d.total_out() == wrote;
                if stuck && out.len() < out.capacity() {
                    return Err("the stream ends early".into());
                }
            }
        }
    }
}

/// A response body, perhaps compressed, as the chunks to send.
pub struct Encoded {
    pub chunks: Vec<Bytes>,
    pub coding: Option<Coding>,
    /// Length of the JSON header (before any coding).
    pub head_len: usize,
    /// Binary outputs follow the header.
    pub binary: bool,
}

impl Encoded {
    pub fn plain(head: Vec<u8>, binary: Vec<Bytes>) -> Encoded {
        let head_len = head.len();
        let has_binary = !binary.is_empty();
        let mut chunks = Vec::with_capacity(binary.len() + 1);
        chunks.push(Bytes::from(head));
        chunks.extend(binary);
        Encoded {
            chunks,
            coding: None,
            head_len,
            binary: has_binary,
        }
    }
}

/// What Accept-Encoding asks for the answer.
#[derive(Debug, PartialEq)]
pub struct Accept {
    /// The coding to apply, None for identity.
    pub coding: Option<Coding>,
    /// Whether an uncompressed answer is acceptable.
    pub identity_ok: bool,
}

/// Reads Accept-Encoding (RFC 9110 12.5.3): the acceptable coding with the highest
/// q-value, gzip on a tie, unless identity is explicitly preferred to it. Identity
/// is acceptable unless refused (`identity;q=0`, or `*;q=0` without it).
pub fn accept(headers: &HeaderMap) -> Accept {
    let (mut gzip, mut deflate, mut identity, mut star) = (None, None, None, None);
    for v in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = Some(1.0f32);
            for p in parts {
                if let Some((k, val)) = p.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    q = val
                        .trim()
                        .parse()
                        .ok()
                        .filter(|q: &f32| (0.0..=1.0).contains(q));
                }
            }
            // An element with a malformed q-value is ignored.
            let Some(q) = q else { continue };
            match name.as_str() {
                "gzip" | "x-gzip" => gzip = Some(q),
                "deflate" => deflate = Some(q),
                "identity" => identity = Some(q),
                "*" => star = Some(q),
                _ => {}
            }
        }
    }
    let gzip = gzip.or(star).unwrap_or(0.0);
    let deflate = deflate.or(star).unwrap_or(0.0);
    let (best, q) = if deflate > gzip {
        (Coding::Deflate, deflate)
    } else {
        (Coding::Gzip, gzip)
    };
    let identity = identity.or(star);
    let coding = (q > 0.0 && identity.is_none_or(|i| i <= q)).then_some(best);
    Accept {
        coding,
        identity_ok: identity != Some(0.0),
    }
}

/// The answer's body, compressed when the client asked for it and it is worth it.
pub async fn encode_response(
    headers: &HeaderMap,
    head: Vec<u8>,
    binary: Vec<Bytes>,
) -> Result<Encoded> {
    let plain = Encoded::plain(head, binary);
    let Accept {
        coding,
        identity_ok,
    } = accept(headers);
    let Some(coding) = coding else {
        return Ok(plain);
    };
    let len: usize = plain.chunks.iter().map(Bytes::len).sum();
    if len < MIN_COMPRESS && identity_ok {
        return Ok(plain);
    }
    let Encoded {
        chunks,
        head_len,
        binary,
        ..
    } = plain;
    let compressed = if len <= INLINE_COMPRESS {
        compress(coding, &chunks, len)?
    } else {
        tokio::task::spawn_blocking(move || compress(coding, &chunks, len))
            .await
            .map_err(|e| Error::Internal(format!("compression task failed: {e}")))??
    };
    Ok(Encoded {
        chunks: vec![Bytes::from(compressed)],
        coding: Some(coding),
        head_len,
        binary,
    })
}

fn compress(coding: Coding, chunks: &[Bytes], len: usize) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::Internal(format!("compressing the answer: {e}"));
    // The fastest level: the answer's latency matters more than the last few percent.
    let level = flate2::Compression::fast();
    let out = Vec::with_capacity(len / 4 + 64);
    match coding {
        Coding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(out, level);
            chunks.iter().try_for_each(|c| w.write_all(c)).map_err(io)?;
            w.finish().map_err(io)
        }
        Coding::Deflate => {
            let mut w = flate2::write::ZlibEncoder::new(out, level);
            chunks.iter().try_for_each(|c| w.write_all(c)).map_err(io)?;
            w.finish().map_err(io)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accept_of(v: &str) -> Accept {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        accept(&h)
    }

    #[test]
    fn accept_encoding_q_values() {
        use Coding::{Deflate, Gzip};
        for (v, want, identity_ok) in [
            ("gzip", Some(Gzip), true),
            ("GZIP;Q=0.5", Some(Gzip), true),
            ("deflate", Some(Deflate), true),
            ("gzip;q=0.4, deflate;q=0.6", Some(Deflate), true),
            ("deflate, gzip", Some(Gzip), true),
            ("*", Some(Gzip), true),
            ("*;q=0", None, false),
            ("gzip;q=0, *", Some(Deflate), true),
            ("identity;q=0.9, gzip;q=0.5", None, true),
            ("identity;q=0, deflate", Some(Deflate), false),
            ("gzip;q=abc", None, true),
            ("gzip;q=2", None, true),
            ("br, zstd", None, true),
            ("", None, true),
        ] {
            let a = accept_of(v);
            assert_eq!(a.coding, want, "{v}");
            assert_eq!(a.identity_ok, identity_ok, "{v}");
        }
    }

    #[test]
    fn decoding_stops_at_the_cap_and_refuses_truncated_streams() {
        use std::io::Write;
        let plain = vec![b' '; 1 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&plain).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        zl.write_all(&plain).unwrap();
        let zl = Bytes::from(zl.finish().unwrap());
        for (c, data) in [(Coding::Gzip, gz), (Coding::Deflate, zl)] {
            // One byte short of the decoded size: refused.
            assert!(
                decode_all(data.clone(), &[c], (1 << 20) - 1)
                    .unwrap()
                    .is_none()
            );
            let out = decode_all(data.clone(), &[c], 1 << 20).unwrap().unwrap();
            assert_eq!(out.len(), 1 << 20);
            // Truncated streams are errors, not shorter bodies.
            let cut = data.slice(..data.len() - 6);
            let e = decode_all(cut, &[c], 1 << 20).unwrap_err();
            assert_eq!(e.http_status(), 400, "{e}");
        }
        // Bare deflate is accepted as "deflate".
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(b"{}").unwrap();
        let raw = Bytes::from(raw.finish().unwrap());
        let out = decode_all(raw, &[Coding::Deflate], 10).unwrap().unwrap();
        assert_eq!(&out[..], b"{}");
    }
}
