//! Content negotiation for `/metrics`: which exposition format (`Accept`) and whether
//! to gzip the body (`Accept-Encoding`).
//!
//! As HTTP (RFC 9110, 12.5.1 and 12.5.3) and Prometheus's own client libraries do it:
//!
//! - every `Accept` header counts, each a comma-separated list of media ranges (a
//!   client may split its list over several headers); media types and parameter names
//!   are case-insensitive;
//! - a range's `q` (0 to 1, default 1) says how much the client wants it; `q=0` means
//!   *not acceptable*; a malformed `q` makes that range count for nothing;
//! - each format takes the `q` of the most specific range that matches it
//!   (`application/openmetrics-text;version=1.0.0` before `application/openmetrics-text`
//!   before `application/*` before `*/*`), the highest of them if several are equally
//!   specific;
//! - the highest `q` wins; on a tie, the format named more specifically, then the one the
//!   client listed first (Prometheus lists its preferred format first), then the
//!   Prometheus text format;
//! - `text/plain` matches only version 0.0.4 (or no version), OpenMetrics versions
//!   1.0.0 and 0.0.1 (or none; 1.0.0 is served). With no acceptable format, or no
//!   `Accept` at all, the Prometheus text format is served, as the client libraries do
//!   (a scraper always gets metrics, never 406).
//!
//! Gzip is used when `Accept-Encoding` accepts `gzip` (or `x-gzip`, or `*`) with a `q`
//! above 0 and not below `identity`'s. Prometheus sends `Accept-Encoding: gzip`.

/// An exposition format the exporter serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

/// Splits `s` on `sep` outside double-quoted strings (parameter values may be quoted).
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// A qvalue as HTTP defines it: `0[.ddd]` or `1[.000]`, in thousandths. None if
/// malformed.
pub fn parse_q(v: &str) -> Option<u16> {
    let v = v.trim();
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, ""),
    };
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |a, b| a * 10 + u16::from(b - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// A list element: (name, parameters, q in thousandths).
type Element = (String, Vec<(String, String)>, u16);

/// One element of an `Accept`-style list: its lowercased name (media range or coding),
/// its other parameters (names lowercased, values unquoted) and its q in thousandths.
/// None for an empty element or a malformed q.
fn parse_element(e: &str) -> Option<Element> {
    let mut parts = split_unquoted(e, ';').into_iter();
    let name = parts.next()?.trim().to_ascii_lowercase();
    if name.is_empty() {
        return None;
    }
    let mut q = 1000;
    let mut params = Vec::new();
    for p in parts {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), v.trim()),
            None => (p.trim().to_ascii_lowercase(), ""),
        };
        if k.is_empty() {
            continue;
        }
        if k == "q" {
            q = parse_q(v)?;
            // Parameters after q are accept-extensions, not media type parameters.
            break;
        }
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .map(|v| v.replace("\\\"", "\"").replace("\\\\", "\\"))
            .unwrap_or_else(|| v.to_string());
        params.push((k, v));
    }
    Some((name, params, q))
}

/// Every element of every header value, in order. Values that are not visible ASCII
/// are skipped whole.
fn elements<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Vec<Element> {
    let mut out = Vec::new();
    for v in values {
        let Ok(s) = std::str::from_utf8(v) else {
            continue;
        };
        if !s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            continue;
        }
        out.extend(split_unquoted(s, ',').into_iter().filter_map(parse_element));
    }
    out
}

/// How specifically `range` names `f`: 0 not at all, 1 `*/*`, 2 `type/*`, 3 the media
/// type, 4 the media type with parameters.
fn specificity(range: &str, params: &[(String, String)], f: Format) -> u8 {
    let version = params
        .iter()
        .find(|(k, _)| k == "version")
        .map(|(_, v)| v.as_str());
    match (range, f) {
        ("*/*", _) => 1,
        ("text/*", Format::Text) | ("application/*", Format::OpenMetrics) => 2,
        ("text/plain", Format::Text) => match version {
            None => 3 + u8::from(!params.is_empty()),
            Some("0.0.4") => 4,
            Some(_) => 0,
        },
        ("application/openmetrics-text", Format::OpenMetrics) => match version {
            None => 3 + u8::from(!params.is_empty()),
            Some("1.0.0") | Some("0.0.1") => 4,
            Some(_) => 0,
        },
        _ => 0,
    }
}

/// The format to serve for these `Accept` header values (all of them, in order).
pub fn negotiate_format<'a>(accept: impl IntoIterator<Item = &'a [u8]>) -> Format {
    let els = elements(accept);
    // Per format: (specificity, q, first position) of its most specific ranges.
    let mut best: Vec<(Format, u8, u16, usize)> = Vec::new();
    for f in [Format::Text, Format::OpenMetrics] {
        let mut b: Option<(u8, u16, usize)> = None;
        for (pos, (range, params, q)) in els.iter().enumerate() {
            let s = specificity(range, params, f);
            if s == 0 {
                continue;
            }
            b = match b {
                Some((bs, _, _)) if s > bs => Some((s, *q, pos)),
                Some((bs, bq, bp)) if s == bs && *q > bq => Some((s, *q, bp)),
                None => Some((s, *q, pos)),
                keep => keep,
            };
        }
        if let Some((s, q, pos)) = b {
            if q > 0 {
                best.push((f, s, q, pos));
            }
        }
    }
    // Highest q, then the more specific, then listed first, then text (pushed first).
    best.iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| {
            (a.2, a.1)
                .cmp(&(b.2, b.1))
                .then_with(|| b.3.cmp(&a.3))
                .then_with(|| ib.cmp(ia))
        })
        .map(|(_, b)| b.0)
        .unwrap_or(Format::Text)
}

/// True if the body should be gzipped for these `Accept-Encoding` header values.
pub fn wants_gzip<'a>(accept_encoding: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let els = elements(accept_encoding);
    let q_of = |names: &[&str]| {
        els.iter()
            .filter(|(n, _, _)| names.contains(&n.as_str()))
            .map(|(_, _, q)| *q)
            .max()
    };
    let star = q_of(&["*"]);
    let gzip = q_of(&["gzip", "x-gzip"]).or(star).unwrap_or(0);
    let identity = q_of(&["identity"]).or(star).unwrap_or(1000);
    gzip > 0 && gzip >= identity
}

#[cfg(test)]
mod tests {
    use super::Format::{OpenMetrics as OM, Text};
    use super::*;

    fn fmt(headers: &[&str]) -> Format {
        negotiate_format(headers.iter().map(|h| h.as_bytes()))
    }

    #[test]
    fn q_values() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("1.000"), Some(1000));
        assert_eq!(parse_q("0"), Some(0));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.125"), Some(125));
        assert_eq!(parse_q(" 0.1 "), Some(100));
        for bad in ["1.5", "2", "0.1234", "-0", "abc", "", ".5", "0.5x", "1.001"] {
            assert_eq!(parse_q(bad), None, "{bad}");
        }
    }

    #[test]
    fn format_table() {
        let prometheus2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        let table: &[(&[&str], Format)] = &[
            // No preference: the Prometheus text format.
            (&[], Text),
            (&[""], Text),
            (&["*/*"], Text),
            (&["text/plain"], Text),
            (&["text/plain;version=0.0.4"], Text),
            (&["application/json"], Text),
            // What Prometheus sends.
            (&[prometheus2], OM),
            (&[prometheus3], OM),
            (&["text/plain;version=0.0.4;q=0.5,*/*;q=0.1"], Text),
            // Case does not matter.
            (&["APPLICATION/OpenMetrics-Text"], OM),
            (&["Application/OpenMetrics-Text; Version=1.0.0"], OM),
            (
                &["application/openmetrics-text;Q=0.5, text/plain;q=0.4"],
                OM,
            ),
            // q=0: not acceptable.
            (&["application/openmetrics-text;q=0"], Text),
            (&["application/openmetrics-text;q=0, */*"], Text),
            (&["application/openmetrics-text;q=0.0"], Text),
            (&["text/plain;q=0, application/openmetrics-text;q=0.1"], OM),
            (&["text/plain;q=0, */*"], OM),
            (&["text/plain;q=0, application/openmetrics-text;q=0"], Text),
            // Several Accept headers make one list.
            (&["text/plain;q=0.2", "application/openmetrics-text"], OM),
            (&["application/openmetrics-text;q=0.2", "text/plain"], Text),
            // The same range twice: the higher q counts.
            (
                &[
                    "application/openmetrics-text;q=0",
                    "application/openmetrics-text",
                ],
                OM,
            ),
            // Highest q wins, whatever the order.
            (
                &["text/plain;q=0.3, application/openmetrics-text;q=0.9"],
                OM,
            ),
            (
                &["application/openmetrics-text;q=0.3, text/plain;q=0.9"],
                Text,
            ),
            // Ties: the more specific, then the one listed first, then text.
            (&["text/plain, application/openmetrics-text"], Text),
            (&["application/openmetrics-text, text/plain"], OM),
            (&["application/*, text/plain"], Text),
            (&["text/*, application/openmetrics-text"], OM),
            (
                &["application/openmetrics-text;version=1.0.0, text/plain"],
                OM,
            ),
            (
                &["text/plain, application/openmetrics-text;version=1.0.0"],
                OM,
            ),
            // The most specific range decides a format's q.
            (&["application/*;q=0, application/openmetrics-text"], OM),
            (&["application/openmetrics-text;q=0, application/*"], Text),
            (&["*/*;q=0.1, application/openmetrics-text;q=0"], Text),
            (&["application/*"], OM),
            // Versions we cannot serve do not match.
            (&["application/openmetrics-text;version=2.0.0"], Text),
            (
                &["text/plain;version=1.0.0, application/openmetrics-text;q=0.5"],
                OM,
            ),
            // Malformed q: that range counts for nothing.
            (&["application/openmetrics-text;q=abc"], Text),
            (&["application/openmetrics-text;q=2"], Text),
            // Junk is ignored, not fatal.
            (&[",,;;,application/openmetrics-text,"], OM),
            (&["application/openmetrics-text;x=\"a,b;q=0\""], OM),
            (&["\u{e9}application/openmetrics-text"], Text),
            (
                &["text/plain;q=0.5", "\u{e9}", "application/openmetrics-text"],
                OM,
            ),
        ];
        for (headers, want) in table {
            assert_eq!(fmt(headers), *want, "Accept: {headers:?}");
        }
    }

    #[test]
    fn gzip_table() {
        let table: &[(&[&str], bool)] = &[
            (&[], false),
            (&["gzip"], true),
            (&["GZIP"], true),
            (&["x-gzip"], true),
            (&["gzip, deflate, br"], true),
            (&["deflate", "gzip"], true),
            (&["gzip;q=0"], false),
            (&["gzip;q=0.000"], false),
            (&["*"], true),
            (&["*;q=0"], false),
            (&["*, gzip;q=0"], false),
            (&["gzip;q=0.5, identity"], false),
            (&["gzip, identity;q=0.5"], true),
            (&["gzip;q=0.5, identity;q=0.5"], true),
            (&["identity"], false),
            (&["deflate"], false),
            (&["gzip;q=x"], false),
        ];
        for (headers, want) in table {
            assert_eq!(
                wants_gzip(headers.iter().map(|h| h.as_bytes())),
                *want,
                "Accept-Encoding: {headers:?}"
            );
        }
    }
}
