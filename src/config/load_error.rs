//! A configuration that could not be read, told without the values it holds.
//!
//! figment's own rendering quotes what it found: a TOML syntax error prints the offending
//! line (`client_secret = "…`), a type error prints the value (`found string "…"`). Config
//! files and the environment carry secrets, so the text shown here keeps the key, the line
//! and column and the file, and drops source excerpts and found values: of every key for a
//! syntax error (the line is not parsed, so which key it holds is unknown), and of secret
//! keys for type errors.

use figment::error::Kind;

/// The operator-facing text of a figment error: every error it carries, joined.
pub(super) fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|one| describe_one(&one))
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_one(e: &figment::Error) -> String {
    let secret = is_secret_key(&e.path);
    let mut text = match &e.kind {
        Kind::Message(m) if secret => format!("invalid value (not shown: secret key): {}", {
            first_line(m)
        }),
        Kind::Message(m) => without_source_excerpt(m),
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) if secret => {
            format!("invalid value (not shown: secret key), expected {expected}")
        }
        other => other.to_string(),
    };
    if !e.path.is_empty() {
        text.push_str(&format!(" for key `{}`", e.path.join(".")));
    }
    if let Some(md) = &e.metadata {
        text.push_str(&format!(" ({}", md.name));
        if let Some(source) = &md.source {
            text.push_str(&format!(" {source}"));
        }
        text.push(')');
    }
    text
}

/// Whether a key holds a secret (its value is never shown).
fn is_secret_key(path: &[String]) -> bool {
    let Some(last) = path.last().map(|k| k.to_ascii_lowercase()) else {
        return false;
    };
    let first = path
        .first()
        .map(|k| k.to_ascii_lowercase())
        .unwrap_or_default();
    ["secret", "password", "token", "client_state"]
        .iter()
        .any(|w| last.contains(w))
        || last == "key"
        || (last == "url" && matches!(first.as_str(), "amqp" | "state"))
}

/// A TOML parser message minus the quoted source lines (`3 | key = "…"` and the `|` and
/// `^` lines under it): what is left names the line, the column and the problem.
fn without_source_excerpt(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_excerpt(l))
        .collect::<Vec<_>>()
        .join(": ")
}

fn is_excerpt(line: &str) -> bool {
    let rest = line
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start();
    rest.starts_with('|') || rest.starts_with('^')
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const SECRET: &str = "Sup3r-S3cret-Value-9f2c";

    fn error_text(toml: &str) -> String {
        let err = Config::from_toml_str(toml).unwrap_err();
        format!("{err} / {err:?}")
    }

    #[test]
    fn a_syntax_error_names_the_line_but_not_the_value() {
        for toml in [
            format!("[graph]\nclient_id = \"a\"\nclient_secret = \"{SECRET}\n"),
            format!("[graph]\nclient_secret = {SECRET}\n"),
            format!("[graph]\nclient_secret = \"{SECRET}\" extra\n"),
            format!("[amqp]\nurl = \"amqp://u:{SECRET}@h\" ]\n"),
        ] {
            let text = error_text(&toml);
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("line"), "the line is named: {text}");
        }
    }

    #[test]
    fn a_type_error_on_a_secret_key_names_the_key_but_not_the_value() {
        for toml in [
            "[graph]\nclient_secret = 918273645546372819\n".to_owned(),
            "[signing]\nkey = [918273645546372819]\n".to_owned(),
            "[proofpoint]\npassword = { a = 918273645546372819 }\n".to_owned(),
        ] {
            let text = error_text(&toml);
            assert!(!text.contains("918273645546372819"), "{text}");
            assert!(text.contains("for key `"), "the key is named: {text}");
        }
    }

    #[test]
    fn type_errors_on_other_keys_still_show_what_was_found() {
        let text = error_text("[worker]\nconcurrency = \"lots\"\n");
        assert!(
            text.contains("lots") && text.contains("worker.concurrency"),
            "{text}"
        );
    }
}
