//! A small, independent checker of the two exposition formats the exporter serves:
//! Prometheus text 0.0.4 and OpenMetrics 1.0 text. It is stricter than the parser in
//! exporter/tests/common (which only pulls values out) and written from the format
//! documents, not from prometheus-client's encoder:
//!
//! * UTF-8, one record a line, every line ended by `\n`;
//! * comments are `# HELP name text`, `# TYPE name type` (and `# UNIT` in OpenMetrics)
//!   with a valid metric name and, for TYPE, a type the format knows; at most one of
//!   each per family, before the family's samples;
//! * OpenMetrics ends with exactly one `# EOF` line, and text never has one;
//! * a sample is `name{label="value",...} value [timestamp]` (OpenMetrics: an optional
//!   exemplar after ` # `), with valid metric and label names, no repeated label,
//!   only the escapes `\\` `\"` `\n` in values, and a value that is a number,
//!   `+Inf`, `-Inf` or `NaN`;
//! * a sample belongs to the family of the last TYPE line: its name is the family
//!   name plus a suffix the type allows (`_total`, `_bucket`, ...);
//! * no series (name and label set) appears twice;
//! * histogram buckets carry `le`, are cumulative (never decrease), end with
//!   `le="+Inf"`, and `_count` equals the `+Inf` bucket.

use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

/// What a valid body contained.
#[derive(Debug, Default)]
pub struct Stats {
    pub families: usize,
    pub samples: usize,
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn is_number(s: &str) -> bool {
    if matches!(s, "+Inf" | "-Inf" | "NaN") {
        return true;
    }
    // [+-]digits[.digits][e[+-]digits], or .digits
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
        i += 1;
    }
    let d0 = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i > d0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let f0 = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        digits |= i > f0;
    }
    if !digits {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let e0 = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == e0 {
            return false;
        }
    }
    i == b.len()
}

fn value(s: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => s.parse().unwrap_or(f64::NAN),
    }
}

/// `{a="x",b="y"}` (the braces already stripped by the caller's scan). Returns the
/// labels and the rest of the line after the closing brace.
fn labels(s: &str, fmt: Format) -> Result<(BTreeMap<String, String>, &str), String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = BTreeMap::new();
    loop {
        if i < b.len() && b[i] == b'}' {
            return Ok((out, &s[i + 1..]));
        }
        let eq = s[i..]
            .find('=')
            .ok_or_else(|| format!("label without '=' in {{{s}"))?
            + i;
        let name = &s[i..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        if b.get(eq + 1) != Some(&b'"') {
            return Err(format!("label {name} value not quoted"));
        }
        let mut j = eq + 2;
        let mut v = String::new();
        loop {
            match b.get(j) {
                None => return Err(format!("label {name} value not closed")),
                Some(b'"') => break,
                Some(b'\\') => {
                    match b.get(j + 1) {
                        Some(b'\\') => v.push('\\'),
                        Some(b'"') => v.push('"'),
                        Some(b'n') => v.push('\n'),
                        other => {
                            return Err(format!(
                                "label {name}: bad escape \\{:?}",
                                other.map(|c| *c as char)
                            ))
                        }
                    }
                    j += 2;
                }
                Some(_) => {
                    let ch = s[j..].chars().next().unwrap();
                    v.push(ch);
                    j += ch.len_utf8();
                }
            }
        }
        if out.insert(name.to_string(), v).is_some() {
            return Err(format!("label {name} repeated"));
        }
        i = j + 1;
        match b.get(i) {
            Some(b',') => {
                i += 1;
                // A trailing comma is allowed in the text format only.
                if fmt == Format::OpenMetrics && b.get(i) == Some(&b'}') {
                    return Err("trailing comma in label set".into());
                }
            }
            Some(b'}') => {}
            _ => return Err(format!("junk after label {name}")),
        }
    }
}

fn suffixes(ty: &str) -> &'static [&'static str] {
    match ty {
        "counter" => &["_total", "_created"],
        "histogram" | "gaugehistogram" => {
            &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
        }
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

#[derive(Default)]
struct Hist {
    last: f64,
    inf: Option<f64>,
    count: Option<f64>,
    le_seen: bool,
}

/// Checks `body` against `fmt`; the error names the first problem and its line.
pub fn check(body: &[u8], fmt: Format) -> Result<Stats, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    if text.is_empty() {
        return Err("empty body".into());
    }
    if !text.ends_with('\n') {
        return Err("last line not ended by \\n".into());
    }
    let lines: Vec<&str> = text[..text.len() - 1].split('\n').collect();
    let mut stats = Stats::default();
    let mut family: Option<(String, String)> = None; // (name, type)
    let mut meta: HashMap<String, HashSet<&str>> = HashMap::new();
    let mut sampled: HashSet<String> = HashSet::new(); // families that have samples
    let mut series: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    let mut hists: HashMap<(String, BTreeMap<String, String>), Hist> = HashMap::new();
    let mut eof = false;
    for (n, line) in lines.iter().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if eof {
            return Err(at("content after # EOF".into()));
        }
        if let Some(rest) = line.strip_prefix('#') {
            if *line == "# EOF" {
                if fmt == Format::Text {
                    return Err(at("# EOF in the text format".into()));
                }
                eof = true;
                continue;
            }
            let rest = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("comment without a space".into()))?;
            let (kind, rest) = rest
                .split_once(' ')
                .ok_or_else(|| at("bare comment".into()))?;
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            let known =
                matches!(kind, "HELP" | "TYPE") || (fmt == Format::OpenMetrics && kind == "UNIT");
            if !known {
                return Err(at(format!("unknown comment {kind}")));
            }
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if sampled.contains(name) {
                return Err(at(format!("{kind} after samples of {name}")));
            }
            if !meta.entry(name.to_string()).or_default().insert(kind) {
                return Err(at(format!("second {kind} for {name}")));
            }
            if kind == "TYPE" {
                let ok = match fmt {
                    Format::Text => {
                        matches!(
                            arg,
                            "counter" | "gauge" | "histogram" | "summary" | "untyped"
                        )
                    }
                    Format::OpenMetrics => matches!(
                        arg,
                        "counter"
                            | "gauge"
                            | "histogram"
                            | "gaugehistogram"
                            | "stateset"
                            | "info"
                            | "summary"
                            | "unknown"
                    ),
                };
                if !ok {
                    return Err(at(format!("unknown type {arg:?}")));
                }
                stats.families += 1;
                family = Some((name.to_string(), arg.to_string()));
            }
            continue;
        }
        // A sample.
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| at("sample without a value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (lbl, rest) = if line.as_bytes()[name_end] == b'{' {
            labels(&line[name_end + 1..], fmt).map_err(&at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?;
        let (rest, exemplar) = match rest.split_once(" # ") {
            Some((r, e)) if fmt == Format::OpenMetrics => (r, Some(e)),
            _ => (rest, None),
        };
        let mut parts = rest.split(' ');
        let v = parts.next().unwrap_or("");
        if !is_number(v) {
            return Err(at(format!("bad value {v:?}")));
        }
        if let Some(ts) = parts.next() {
            if !is_number(ts) {
                return Err(at(format!("bad timestamp {ts:?}")));
            }
        }
        if parts.next().is_some() {
            return Err(at("junk after the value".into()));
        }
        if let Some(e) = exemplar {
            let e = e
                .strip_prefix('{')
                .ok_or_else(|| at("exemplar without labels".into()))?;
            let (_, r) = labels(e, fmt).map_err(&at)?;
            let r = r
                .strip_prefix(' ')
                .ok_or_else(|| at("exemplar value".into()))?;
            if !r.split(' ').all(is_number) {
                return Err(at("bad exemplar value".into()));
            }
        }
        let (fam, ty) = family
            .as_ref()
            .ok_or_else(|| at("sample before any TYPE".into()))?;
        let suffix = name
            .strip_prefix(fam.as_str())
            .ok_or_else(|| at(format!("sample outside family {fam}")))?;
        // Text-format counters may also be named as the family itself.
        let text_plain = fmt == Format::Text && suffix.is_empty() && ty != "histogram";
        if !suffixes(ty).contains(&suffix) && !text_plain {
            return Err(at(format!("suffix {suffix:?} not allowed for a {ty}")));
        }
        sampled.insert(fam.clone());
        if !series.insert((name.to_string(), lbl.clone())) {
            return Err(at("series repeated".into()));
        }
        stats.samples += 1;
        if ty == "histogram" {
            let mut key = lbl.clone();
            let le = key.remove("le");
            let h = hists.entry((fam.clone(), key)).or_default();
            let x = value(v);
            match suffix {
                "_bucket" => {
                    let le = le.ok_or_else(|| at("bucket without le".into()))?;
                    if !is_number(&le) {
                        return Err(at(format!("bad le {le:?}")));
                    }
                    if h.le_seen && x < h.last {
                        return Err(at("bucket counts decrease".into()));
                    }
                    if h.inf.is_some() {
                        return Err(at("bucket after le=\"+Inf\"".into()));
                    }
                    h.le_seen = true;
                    h.last = x;
                    if value(&le) == f64::INFINITY {
                        h.inf = Some(x);
                    }
                }
                "_count" => h.count = Some(x),
                _ => {}
            }
        }
    }
    if fmt == Format::OpenMetrics && !eof {
        return Err("no # EOF line".into());
    }
    for ((fam, l), h) in &hists {
        if h.le_seen && h.inf.is_none() {
            return Err(format!("histogram {fam}{l:?} has no +Inf bucket"));
        }
        if let (Some(i), Some(c)) = (h.inf, h.count) {
            if i != c {
                return Err(format!(
                    "histogram {fam}{l:?}: +Inf bucket {i} != count {c}"
                ));
            }
        }
    }
    Ok(stats)
}
