//! Matchers — `equals`, `one_of`, `glob`, `regex`, `exists`, `before`, `after` — compiled at
//! load time (regexes and globs included) and evaluated against one fact's value.
//!
//! `equals`, `one_of` and `glob` ignore case (Entra compares names and addresses that way);
//! `regex` is as written (add `(?i)`) and searches (anchor with `^…$`). `glob` knows `*` and
//! `?` and matches the whole value. On a list fact (`proxy_addresses`, `proxy_domains`) a
//! matcher holds when any element matches; on `member_of` when any group's id or display name
//! matches. `before X` means at or before X, `after X` strictly after: exact complements.

use chrono::{DateTime, Utc};
use regex::Regex;
use toml::Spanned;
use toml::de::DeValue;

use super::decision::{Truth, stamp};
use super::fact::{Fact, Kind, Value};
use super::file::Located;

#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Equals(Lit),
    OneOf(Vec<String>),
    Glob { pattern: String, re: Regex },
    Regex(Regex),
    Exists(bool),
    Before(When),
    After(When),
}

#[derive(Debug, Clone)]
pub(crate) enum Lit {
    Bool(bool),
    Text(String),
}

/// A point in time relative to `now`, or absolute.
#[derive(Debug, Clone)]
pub(crate) enum When {
    /// `now + offset`; `text` as written (`now`, `7d ago`, `in 2h`).
    Relative {
        offset: chrono::Duration,
        text: String,
    },
    At(DateTime<Utc>),
}

impl When {
    fn at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            When::Relative { offset, .. } => now.checked_add_signed(*offset).unwrap_or(now),
            When::At(t) => *t,
        }
    }

    /// When a comparison of `t` against this instant flips, if it moves with `now`.
    fn flip(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Relative { offset, .. } => t.checked_sub_signed(*offset),
            When::At(_) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            When::Relative { text, .. } => text.clone(),
            When::At(t) => stamp(*t),
        }
    }

    fn parse(s: &str) -> Result<When, String> {
        let s = s.trim();
        let rel = |d: &str, sign: i32| -> Result<When, String> {
            let std = humantime::parse_duration(d.trim())
                .map_err(|e| format!("bad duration `{d}`: {e}"))?;
            let offset = chrono::Duration::from_std(std)
                .map_err(|_| format!("duration `{d}` is too long"))?;
            Ok(When::Relative {
                offset: offset * sign,
                text: s.to_owned(),
            })
        };
        if s == "now" {
            Ok(When::Relative {
                offset: chrono::Duration::zero(),
                text: s.to_owned(),
            })
        } else if let Some(d) = s.strip_suffix(" ago") {
            rel(d, -1)
        } else if let Some(d) = s.strip_prefix("in ") {
            rel(d, 1)
        } else if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            Ok(When::At(t.with_timezone(&Utc)))
        } else {
            Err(format!(
                "bad time `{s}`: expected \"now\", \"<duration> ago\", \"in <duration>\" \
                 (e.g. \"7d ago\") or an RFC 3339 timestamp"
            ))
        }
    }
}

/// Parse `deactivate_after`, `window` and relative times: humantime (`7d`, `1h 30m`).
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("bad duration `{s}`: {e}"))
}

impl Matcher {
    /// Compile the matcher written for `fact`: a bare scalar (shorthand for `equals`) or a
    /// table with exactly one matcher key.
    pub(crate) fn compile(fact: Fact, v: &Spanned<DeValue<'_>>) -> Result<Matcher, Located> {
        let name = fact.name();
        match v.get_ref() {
            DeValue::Table(t) => {
                let mut entries = t.iter();
                let (Some((key, arg)), None) = (entries.next(), entries.next()) else {
                    return Err(Located::new(
                        v.span(),
                        format!(
                            "`{name}` needs exactly one matcher (equals, one_of, glob, regex, exists, before, after)"
                        ),
                    ));
                };
                Self::compile_one(fact, key.get_ref(), arg)
            }
            DeValue::Array(_) => Err(Located::new(
                v.span(),
                format!("`{name}`: a list is not a matcher; write {{ one_of = [...] }}"),
            )),
            _ => Self::compile_one(fact, "equals", v),
        }
    }

    fn compile_one(
        fact: Fact,
        matcher: &str,
        arg: &Spanned<DeValue<'_>>,
    ) -> Result<Matcher, Located> {
        let name = fact.name();
        let kind = fact.kind();
        let err = |msg: String| Located::new(arg.span(), msg);
        let text_kinds = matches!(kind, Kind::Text | Kind::List | Kind::Groups);
        let applies = match matcher {
            "equals" => kind != Kind::Time,
            "one_of" | "glob" | "regex" => text_kinds,
            "exists" => true,
            "before" | "after" => kind == Kind::Time,
            other => {
                return Err(err(format!(
                    "unknown matcher `{other}` for `{name}` (expected equals, one_of, glob, regex, exists, before or after)"
                )));
            }
        };
        if !applies {
            let hint = match kind {
                Kind::Bool => "a true/false fact: use equals or exists",
                Kind::Time => "a date: use before, after or exists",
                _ => "a text fact: use equals, one_of, glob, regex or exists",
            };
            return Err(err(format!(
                "`{matcher}` does not apply to `{name}` ({hint})"
            )));
        }
        let string = |what: &str| match arg.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            other => Err(err(format!(
                "`{name}`: {what} takes a string, not {}",
                other.type_str()
            ))),
        };
        match matcher {
            "equals" if kind == Kind::Bool => match arg.get_ref() {
                DeValue::Boolean(b) => Ok(Matcher::Equals(Lit::Bool(*b))),
                other => Err(err(format!(
                    "`{name}` is true or false, not {}",
                    other.type_str()
                ))),
            },
            "equals" => {
                let s = string("equals")?;
                check_known(fact, &s).map_err(err)?;
                Ok(Matcher::Equals(Lit::Text(s)))
            }
            "one_of" => {
                let DeValue::Array(items) = arg.get_ref() else {
                    return Err(err(format!("`{name}`: one_of takes a list of strings")));
                };
                if items.is_empty() {
                    return Err(err(format!(
                        "`{name}`: one_of is empty, so it could never match"
                    )));
                }
                items
                    .iter()
                    .map(|i| match i.get_ref() {
                        DeValue::String(s) => {
                            check_known(fact, s).map_err(|m| Located::new(i.span(), m))?;
                            Ok(s.to_string())
                        }
                        other => Err(Located::new(
                            i.span(),
                            format!("`{name}`: one_of takes strings, not {}", other.type_str()),
                        )),
                    })
                    .collect::<Result<_, _>>()
                    .map(Matcher::OneOf)
            }
            "glob" => {
                let pattern = string("glob")?;
                let re = Regex::new(&glob_to_regex(&pattern))
                    .map_err(|e| err(format!("`{name}`: bad glob `{pattern}`: {e}")))?;
                Ok(Matcher::Glob { pattern, re })
            }
            "regex" => {
                let src = string("regex")?;
                Regex::new(&src).map(Matcher::Regex).map_err(|e| {
                    err(format!(
                        "`{name}`: bad regex `{src}`: {}",
                        one_line(&e.to_string())
                    ))
                })
            }
            "exists" => match arg.get_ref() {
                DeValue::Boolean(b) => Ok(Matcher::Exists(*b)),
                other => Err(err(format!(
                    "`{name}`: exists takes true or false, not {}",
                    other.type_str()
                ))),
            },
            _ => {
                let when =
                    When::parse(&string(matcher)?).map_err(|m| err(format!("`{name}`: {m}")))?;
                Ok(if matcher == "before" {
                    Matcher::Before(when)
                } else {
                    Matcher::After(when)
                })
            }
        }
    }

    /// Evaluate against one value: truth, a sentence for the trace, and the instant at which
    /// the answer would flip as time passes (for rechecks).
    pub(crate) fn eval(
        &self,
        name: &str,
        v: &Value<'_>,
        now: DateTime<Utc>,
    ) -> (Truth, String, Option<DateTime<Utc>>) {
        if let Value::Unavailable(why) = v {
            return (Truth::Unknown, format!("{name}: unknown ({why})"), None);
        }
        match self {
            Matcher::Exists(want) => {
                let (have, shown) = match v {
                    Value::Absent => (false, "absent".to_owned()),
                    Value::List(l) if l.is_empty() => (false, "empty".to_owned()),
                    Value::Groups([]) => (false, "empty (no groups)".to_owned()),
                    _ => (true, "present".to_owned()),
                };
                let truth = Truth::from_bool(have == *want);
                let wanted = if *want { "present" } else { "absent" };
                let text = if truth == Truth::True {
                    format!("{name} is {shown}")
                } else {
                    format!("{name} is {shown}, wanted {wanted}")
                };
                (truth, text, None)
            }
            Matcher::Before(w) | Matcher::After(w) => {
                let before = matches!(self, Matcher::Before(_));
                let op = if before { "before" } else { "after" };
                let Value::Time(t) = v else {
                    return (
                        Truth::False,
                        format!("{name} is absent, wanted {op} {}", w.describe()),
                        None,
                    );
                };
                let threshold = w.at(now);
                let hit = if before {
                    *t <= threshold
                } else {
                    *t > threshold
                };
                let flip = w.flip(*t).filter(|f| *f > now);
                let not = if hit { "" } else { "not " };
                let at = match w {
                    When::Relative { .. } => format!(" ({})", stamp(threshold)),
                    When::At(_) => String::new(),
                };
                let text = format!("{name} {} is {not}{op} {}{at}", stamp(*t), w.describe());
                (Truth::from_bool(hit), text, flip)
            }
            Matcher::Equals(Lit::Bool(want)) => match v {
                Value::Bool(b) if b == want => (Truth::True, format!("{name} is {b}"), None),
                Value::Bool(b) => (Truth::False, format!("{name} is {b}, wanted {want}"), None),
                _ => (
                    Truth::False,
                    format!("{name} is absent, wanted {want}"),
                    None,
                ),
            },
            _ => self.eval_text(name, v),
        }
    }

    fn eval_text(&self, name: &str, v: &Value<'_>) -> (Truth, String, Option<DateTime<Utc>>) {
        let (pos, neg) = self.describe();
        let (truth, text) = match v {
            Value::Text(s) if self.test(s) => match self {
                Matcher::Equals(_) => (true, format!("{name} = \"{s}\"")),
                _ => (true, format!("{name} = \"{s}\" {pos}")),
            },
            Value::Text(s) => (false, format!("{name} = \"{s}\" {neg}")),
            Value::List(items) if items.is_empty() => {
                (false, format!("{name} is empty, wanted {pos}"))
            }
            Value::List(items) => match items.iter().find(|s| self.test(s)) {
                Some(s) => (true, format!("{name} has \"{s}\" {pos}")),
                None => (false, format!("{name} = [{}]: none {pos}", quoted(items))),
            },
            Value::Groups([]) => (
                false,
                format!("{name}: the user is in no groups, wanted {pos}"),
            ),
            Value::Groups(groups) => {
                let hit = groups.iter().find(|g| {
                    self.test(&g.id) || g.display_name.as_deref().is_some_and(|n| self.test(n))
                });
                match hit {
                    Some(g) => {
                        let label = g
                            .display_name
                            .as_deref()
                            .map(|n| format!("\"{n}\" "))
                            .unwrap_or_default();
                        (true, format!("{name}: group {label}({}) {pos}", g.id))
                    }
                    None => (
                        false,
                        format!("{name}: none of the user's {} groups {pos}", groups.len()),
                    ),
                }
            }
            _ => (false, format!("{name} is absent, wanted {pos}")),
        };
        (Truth::from_bool(truth), text, None)
    }

    fn test(&self, s: &str) -> bool {
        match self {
            Matcher::Equals(Lit::Text(want)) => eq_ci(s, want),
            Matcher::OneOf(set) => set.iter().any(|w| eq_ci(s, w)),
            Matcher::Glob { re, .. } | Matcher::Regex(re) => re.is_match(s),
            _ => false,
        }
    }

    /// The matcher as a phrase, positive and negative.
    fn describe(&self) -> (String, String) {
        match self {
            Matcher::Equals(Lit::Text(w)) => (format!("= \"{w}\""), format!("≠ \"{w}\"")),
            Matcher::OneOf(set) => {
                let list = set.join(", ");
                (format!("∈ [{list}]"), format!("∉ [{list}]"))
            }
            Matcher::Glob { pattern, .. } => (
                format!("matches glob \"{pattern}\""),
                format!("does not match glob \"{pattern}\""),
            ),
            Matcher::Regex(re) => (
                format!("matches regex /{}/", re.as_str()),
                format!("does not match regex /{}/", re.as_str()),
            ),
            _ => (String::new(), String::new()),
        }
    }
}

fn check_known(fact: Fact, s: &str) -> Result<(), String> {
    match fact.known_values() {
        Some(known) if !known.iter().any(|k| eq_ci(k, s)) => Err(format!(
            "`{}` is never `{s}` (known values: {})",
            fact.name(),
            known.join(", ")
        )),
        _ => Ok(()),
    }
}

/// Case-insensitive comparison without allocating.
fn eq_ci(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_lowercase)
        .eq(b.chars().flat_map(char::to_lowercase))
}

/// `*` any run, `?` one character, everything else literal; whole value, any case.
fn glob_to_regex(pattern: &str) -> String {
    let mut re = String::from("(?is)^");
    for c in pattern.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
    }
    re.push('$');
    re
}

fn quoted(items: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(", … {} more", items.len() - SHOWN));
    }
    s
}

/// The regex crate's errors span several lines with a caret diagram; keep the last line.
fn one_line(msg: &str) -> String {
    msg.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(msg)
        .trim()
        .to_owned()
}
