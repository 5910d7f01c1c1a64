//! `--log.format`: logfmt (the default, as Prometheus exporters log) or JSON.
//!
//! logfmt lines are `ts=… level=… target=… msg="…" key=value`: one event a line,
//! values quoted when they hold spaces, quotes or `=`, so log tools parse them
//! without a grammar of their own.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How the exporter's log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `key=value` pairs, one event a line.
    Logfmt,
    /// One JSON object a line.
    Json,
}

/// A logfmt value: bare when it can be, else quoted with `"` and `\` escaped.
pub fn value(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && c != '"' && c != '=' && !c.is_control())
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Collects an event's fields as logfmt pairs (`message` first, as `msg`).
#[derive(Default)]
struct Pairs {
    msg: Option<String>,
    rest: Vec<(String, String)>,
}

impl Visit for Pairs {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.put(f, v.to_string());
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.put(f, format!("{v:?}"));
    }
}

impl Pairs {
    fn put(&mut self, f: &Field, v: String) {
        if f.name() == "message" {
            self.msg = Some(v);
        } else {
            self.rest.push((f.name().to_string(), v));
        }
    }
}

/// The logfmt event formatter.
pub struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut p = Pairs::default();
        event.record(&mut p);
        let meta = event.metadata();
        write!(
            w,
            "ts={} level={} target={}",
            humantime_now(),
            meta.level().as_str().to_ascii_lowercase(),
            value(meta.target())
        )?;
        if let Some(m) = p.msg {
            write!(w, " msg={}", value(&m))?;
        }
        for (k, v) in p.rest {
            write!(w, " {k}={}", value(&v))?;
        }
        writeln!(w)
    }
}

/// RFC 3339 UTC with milliseconds, from the system clock.
fn humantime_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_bare_or_quoted_and_escaped() {
        assert_eq!(value("watching"), "watching");
        assert_eq!(value("two words"), "\"two words\"");
        assert_eq!(value("a=b"), "\"a=b\"");
        assert_eq!(value("say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
        assert_eq!(value(""), "\"\"");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = humantime_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
