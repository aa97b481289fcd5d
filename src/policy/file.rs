//! The policy file: its TOML model, parsing into a [`RulePolicy`], and [`PolicyError`]s that
//! name the file, the line and the rule (`policy.toml:14: rule "leavers": unknown fact ...`).
//!
//! The document is parsed once into toml's spanned tree ([`DeTable`]). The fixed part of each
//! rule (keys, types, unknown keys) goes through serde with `deny_unknown_fields`; conditions
//! are compiled from the spanned tree so that every error inside them points at its own line.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::breaker::{BreakerConfig, DAY, GlobalLimits};
use super::engine::{Cond, Rule, RulePolicy};
use super::fact::{self, Fact};
use super::matcher::{self, Matcher};
use super::{Action, Guard};

/// Why a policy file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: cannot read the policy file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid policy. `line` is 1-based; `rule` names the rule when the
    /// problem is inside one.
    #[error("{source_name}:{line}: {}{message}", rule_prefix(.rule.as_deref()))]
    Invalid {
        source_name: String,
        line: usize,
        rule: Option<String>,
        message: String,
    },
}

impl PolicyError {
    /// Never: a policy file must be fixed by an operator.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

fn rule_prefix(rule: Option<&str>) -> String {
    rule.map(|r| format!("rule \"{r}\": ")).unwrap_or_default()
}

/// A problem at a byte range of the file, before it is turned into a [`PolicyError`].
#[derive(Debug)]
pub(crate) struct Located {
    pub(crate) span: Range<usize>,
    pub(crate) message: String,
}

impl Located {
    pub(crate) fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        Self {
            span,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    #[serde(default)]
    breaker: Option<BreakerModel>,
    #[serde(default)]
    rule: Vec<Spanned<RuleModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleModel {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    /// Compiled from the spanned tree instead; accepted here so the key is known.
    #[serde(default, rename = "when")]
    _when: Option<IgnoredAny>,
    action: Spanned<String>,
    #[serde(default)]
    deactivate_after: Option<Spanned<String>>,
    #[serde(default)]
    override_guards: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerModel {
    #[serde(default)]
    max_deactivations: Option<Spanned<i64>>,
    #[serde(default)]
    max_share: Option<Spanned<f64>>,
    #[serde(default)]
    window: Option<Spanned<String>>,
    #[serde(default)]
    max_per_day: Option<Spanned<i64>>,
    #[serde(default)]
    global: Option<GlobalModel>,
}

/// `[breaker.global]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobalModel {
    #[serde(default)]
    max_deactivations: Option<Spanned<i64>>,
    #[serde(default)]
    window: Option<Spanned<String>>,
    #[serde(default)]
    max_per_day: Option<Spanned<i64>>,
}

/// The text being parsed, for turning byte offsets into lines.
struct Source<'a> {
    text: &'a str,
    name: &'a str,
}

/// Where one `[[rule]]` sits in the file, to say which rule a serde error is in.
struct Extent {
    span: Range<usize>,
    name: Option<String>,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn invalid(
        &self,
        span: Range<usize>,
        rule: Option<&str>,
        message: impl Into<String>,
    ) -> PolicyError {
        PolicyError::Invalid {
            source_name: self.name.to_owned(),
            line: self.line(span.start),
            rule: rule.map(str::to_owned),
            message: message.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error, rules: &[Extent]) -> PolicyError {
        let span = e.span().unwrap_or(0..0);
        let rule = rules
            .iter()
            .find(|r| r.span.contains(&span.start))
            .and_then(|r| r.name.as_deref());
        self.invalid(span, rule, e.message().trim())
    }
}

/// Parse and compile a policy file. `source_name` prefixes every error (`policy.toml:14: ...`).
pub(crate) fn parse(text: &str, source_name: &str) -> Result<RulePolicy, PolicyError> {
    let src = Source {
        text,
        name: source_name,
    };
    // Of several syntax errors, report the first in the file.
    let (doc, errors) = DeTable::parse_recoverable(text);
    if let Some(e) = errors
        .iter()
        .min_by_key(|e| e.span().map_or(0, |s| s.start))
    {
        return Err(src.toml_error(e, &[]));
    }
    let rule_values: Vec<&Spanned<DeValue<'_>>> =
        match doc.get_ref().get("rule").map(|r| r.get_ref()) {
            Some(DeValue::Array(a)) => a.iter().collect(),
            _ => Vec::new(),
        };
    let extents: Vec<Extent> = rule_values.iter().map(|v| extent(v)).collect();
    let model = FileModel::deserialize(toml::de::Deserializer::from(doc.clone()))
        .map_err(|e| src.toml_error(&e, &extents))?;
    if model.rule.is_empty() {
        return Err(src.invalid(
            0..0,
            None,
            "no rules: a policy needs at least a final default rule (a [[rule]] without `when`)",
        ));
    }
    let count = model.rule.len();
    let mut rules: Vec<Rule> = Vec::with_capacity(count);
    for (i, spanned) in model.rule.iter().enumerate() {
        let when = rule_values
            .get(i)
            .and_then(|v| v.get_ref().as_table())
            .and_then(|t| t.get("when"));
        let rule = compile_rule(&src, spanned, when, i + 1 == count)?;
        if rules.iter().any(|r| r.name == rule.name) {
            return Err(src.invalid(
                spanned.get_ref().name.span(),
                Some(&rule.name),
                "duplicate rule name: an earlier rule has the same name",
            ));
        }
        if rule.when.is_none() && i + 1 < count {
            return Err(src.invalid(
                spanned.span(),
                Some(&rule.name),
                format!(
                    "default rule not last: a rule without `when` always matches, so the {} rule(s) \
                     after it would never be tried; move it to the end or give it a `when`",
                    count - i - 1
                ),
            ));
        }
        rules.push(rule);
    }
    let breaker = compile_breaker(&src, model.breaker.as_ref())?;
    Ok(RulePolicy::new(source_name, rules, breaker))
}

fn compile_rule(
    src: &Source<'_>,
    spanned: &Spanned<RuleModel>,
    when: Option<&Spanned<DeValue<'_>>>,
    last: bool,
) -> Result<Rule, PolicyError> {
    let r = spanned.get_ref();
    let name = r.name.get_ref().trim().to_owned();
    let label = (!name.is_empty()).then_some(name.as_str());
    let at = |span: Range<usize>, msg: String| src.invalid(span, label, msg);
    if name.is_empty() {
        return Err(at(r.name.span(), "the rule name is empty".into()));
    }
    let action = Action::parse(r.action.get_ref()).ok_or_else(|| {
        at(
            r.action.span(),
            format!(
                "unknown action `{}` (expected activate, deactivate, ignore or keep_mail_flowing)",
                r.action.get_ref()
            ),
        )
    })?;
    let when = when
        .map(compile_cond)
        .transpose()
        .map_err(|l| at(l.span, l.message))?;
    if when.is_some() && last {
        return Err(at(
            spanned.span(),
            "missing final default rule: the last rule has a `when`; add a last [[rule]] without \
             `when` that decides for everyone no other rule matched"
                .into(),
        ));
    }
    let not_deactivate = |key: &str| {
        format!(
            "{key} only applies to action = \"deactivate\" (this rule's action is {})",
            action.as_str()
        )
    };
    let grace = match &r.deactivate_after {
        None => None,
        Some(d) if action != Action::Deactivate => {
            return Err(at(d.span(), not_deactivate("deactivate_after")));
        }
        Some(d) => {
            let std = matcher::parse_duration(d.get_ref())
                .map_err(|m| at(d.span(), format!("deactivate_after: {m}")))?;
            let grace = chrono::Duration::from_std(std)
                .map_err(|_| at(d.span(), "deactivate_after is too long".into()))?;
            Some((grace, d.get_ref().trim().to_owned()))
        }
    };
    let mut overrides = Vec::new();
    if let Some(list) = &r.override_guards {
        if action != Action::Deactivate {
            return Err(at(list.span(), not_deactivate("override_guards")));
        }
        for g in list.get_ref() {
            overrides.push(Guard::parse(g.get_ref()).ok_or_else(|| {
                at(
                    g.span(),
                    format!(
                        "unknown guard `{}` (expected admin, functional_account or incomplete_facts)",
                        g.get_ref()
                    ),
                )
            })?);
        }
    }
    Ok(Rule {
        name,
        description: r
            .description
            .as_deref()
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        when,
        action,
        grace,
        overrides,
        line: src.line(spanned.span().start),
    })
}

/// A condition: a table whose keys are facts or `all` / `any` / `not`; several keys must all
/// hold.
fn compile_cond(v: &Spanned<DeValue<'_>>) -> Result<Cond, Located> {
    let DeValue::Table(t) = v.get_ref() else {
        return Err(Located::new(
            v.span(),
            format!(
                "a condition is a table such as {{ account_enabled = false }}, not {}",
                v.get_ref().type_str()
            ),
        ));
    };
    if t.is_empty() {
        return Err(Located::new(
            v.span(),
            "empty condition: name a fact, or drop `when` to make this the default rule",
        ));
    }
    // The table is sorted by key; keep the order of the file for the trace.
    let mut entries: Vec<_> = t.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let mut parts = entries
        .into_iter()
        .map(|(k, v)| compile_entry(k, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Cond::All(parts)
    })
}

fn compile_entry(key: &Spanned<DeString<'_>>, v: &Spanned<DeValue<'_>>) -> Result<Cond, Located> {
    match key.get_ref().as_ref() {
        op @ ("all" | "any") => {
            let DeValue::Array(items) = v.get_ref() else {
                return Err(Located::new(
                    v.span(),
                    format!("`{op}` takes a list of conditions"),
                ));
            };
            if items.is_empty() {
                return Err(Located::new(v.span(), format!("`{op}` is empty")));
            }
            let parts = items
                .iter()
                .map(compile_cond)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if op == "all" {
                Cond::All(parts)
            } else {
                Cond::Any(parts)
            })
        }
        "not" => Ok(Cond::Not(Box::new(compile_cond(v)?))),
        name => {
            let fact = Fact::parse(name).ok_or_else(|| {
                let names = Fact::all_names();
                let known = names
                    .iter()
                    .map(String::as_str)
                    .chain(["all", "any", "not"]);
                let hint = fact::suggest(name, known)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                Located::new(key.span(), format!("unknown fact `{name}`{hint}"))
            })?;
            Ok(Cond::Test {
                fact,
                matcher: Matcher::compile(fact, v)?,
            })
        }
    }
}

/// `[breaker]` and `[breaker.global]` over the defaults. An omitted `max_per_day` is at least
/// the window's `max_deactivations`, so that a file which only raises the window limit (valid
/// before day limits existed) keeps meaning what it says.
fn compile_breaker(
    src: &Source<'_>,
    model: Option<&BreakerModel>,
) -> Result<BreakerConfig, PolicyError> {
    let mut config = BreakerConfig::default();
    let Some(m) = model else { return Ok(config) };
    let at = |span: Range<usize>, msg: String| src.invalid(span, None, format!("[breaker] {msg}"));
    if let Some(n) = &m.max_deactivations {
        config.max_deactivations = count(n, "max_deactivations").map_err(|e| at(n.span(), e))?;
    }
    if let Some(s) = &m.max_share {
        let v = *s.get_ref();
        if !(v > 0.0 && v <= 1.0) {
            return Err(at(
                s.span(),
                "max_share is a fraction of the known users in (0, 1], e.g. 0.10".into(),
            ));
        }
        config.max_share = v;
    }
    if let Some(w) = &m.window {
        config.window = window(w).map_err(|e| at(w.span(), e))?;
    }
    config.max_per_day = per_day(
        m.max_per_day.as_ref(),
        config.max_deactivations,
        config.max_per_day,
        config.window,
    )
    .map_err(|(span, e)| at(span, e))?;
    if let Some(g) = &m.global {
        config.global = compile_global(src, g)?;
    }
    Ok(config)
}

fn compile_global(src: &Source<'_>, m: &GlobalModel) -> Result<GlobalLimits, PolicyError> {
    let at = |span: Range<usize>, msg: String| {
        src.invalid(span, None, format!("[breaker.global] {msg}"))
    };
    let mut limits = GlobalLimits::default();
    if let Some(n) = &m.max_deactivations {
        limits.max_deactivations = count(n, "max_deactivations").map_err(|e| at(n.span(), e))?;
    }
    if let Some(w) = &m.window {
        limits.window = window(w).map_err(|e| at(w.span(), e))?;
    }
    limits.max_per_day = per_day(
        m.max_per_day.as_ref(),
        limits.max_deactivations,
        limits.max_per_day,
        limits.window,
    )
    .map_err(|(span, e)| at(span, e))?;
    Ok(limits)
}

/// A limit on a number of deactivations: a whole number of at least 1.
fn count(n: &Spanned<i64>, key: &str) -> Result<u32, String> {
    match u32::try_from(*n.get_ref()) {
        Ok(0) => Err(format!(
            "{key} must be at least 1: 0 would hold every deactivation; to stop deactivating, \
             use a guard or an `ignore` rule instead"
        )),
        Ok(v) => Ok(v),
        Err(_) => Err(format!(
            "{key} must be a whole number from 1 to {}",
            u32::MAX
        )),
    }
}

const MIN_WINDOW: Duration = Duration::from_secs(60);
const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// A breaker window: from 1 minute to 7 days.
fn window(w: &Spanned<String>) -> Result<Duration, String> {
    let text = w.get_ref();
    let d = matcher::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("window: `{text}` is not a positive duration (e.g. \"1h\")"))?;
    if !(MIN_WINDOW..=MAX_WINDOW).contains(&d) {
        return Err(format!(
            "window: `{text}` is outside the allowed range of 1 minute to 7 days"
        ));
    }
    Ok(d)
}

/// `max_per_day`, given the window limit of the same scope. When omitted: `default`, raised
/// to `max_deactivations`. Set below `max_deactivations` with a window of at most a day, the
/// window limit could never be reached, so it is refused. (With a longer window both limits
/// still bite, so it is allowed.)
fn per_day(
    n: Option<&Spanned<i64>>,
    max_deactivations: u32,
    default: u32,
    window: Duration,
) -> Result<u32, (Range<usize>, String)> {
    let Some(n) = n else {
        return Ok(default.max(max_deactivations));
    };
    let v = count(n, "max_per_day").map_err(|e| (n.span(), e))?;
    if v < max_deactivations && window <= DAY {
        return Err((
            n.span(),
            format!(
                "max_per_day ({v}) is smaller than max_deactivations ({max_deactivations}): \
                 within a day the window limit could never be reached; raise max_per_day or \
                 lower max_deactivations"
            ),
        ));
    }
    Ok(v)
}

/// From a rule table's header to the end of the last thing in it.
fn extent(v: &Spanned<DeValue<'_>>) -> Extent {
    fn end(v: &Spanned<DeValue<'_>>) -> usize {
        let inner = match v.get_ref() {
            DeValue::Table(t) => t.iter().map(|(k, v)| k.span().end.max(end(v))).max(),
            DeValue::Array(a) => a.iter().map(end).max(),
            _ => None,
        };
        inner.unwrap_or(0).max(v.span().end)
    }
    let name = v
        .get_ref()
        .as_table()
        .and_then(|t| t.get("name"))
        .and_then(|n| n.get_ref().as_str())
        .map(str::to_owned);
    Extent {
        span: v.span().start..end(v) + 1,
        name,
    }
}
