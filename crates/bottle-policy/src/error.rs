//! The one error a policy load returns: what is wrong, where (file:line:column, a flag, or a preset) and what would
//! be valid.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where an offending value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A span in a policy file (or in text given without a path).
    Text {
        path: Option<PathBuf>,
        line: usize,
        column: usize,
        /// The offending source line (a window of it, when long), for a caret display.
        snippet: String,
        /// Characters before the caret in `snippet`.
        caret: usize,
        width: usize,
    },
    /// A command-line flag such as `--allow`.
    Flag { flag: &'static str, value: String },
    /// The file as a whole (size, encoding).
    File { path: Option<PathBuf> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub location: Location,
    pub message: String,
}

impl PolicyError {
    pub fn at_span(source: &str, path: Option<&Path>, span: Range<usize>, message: impl Into<String>) -> Self {
        let start = floor_char_boundary(source, span.start.min(source.len()));
        let before = &source[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        let line_end = source[line_start..].find('\n').map_or(source.len(), |i| line_start + i);
        let end = floor_char_boundary(source, span.end.clamp(start, line_end));
        let width = source[start..end].chars().count().max(1);
        // A long line is shown as a window around the offending value, so that a caret can always point at it.
        let (snippet, caret, width) = window(&source[line_start..line_end], column - 1, width);
        Self {
            location: Location::Text {
                path: path.map(Path::to_path_buf),
                line,
                column,
                snippet,
                caret,
                width,
            },
            message: bounded(message.into()),
        }
    }

    pub fn at_flag(flag: &'static str, value: &str, message: impl Into<String>) -> Self {
        Self {
            location: Location::Flag {
                flag,
                value: bounded(value.to_string()),
            },
            message: bounded(message.into()),
        }
    }

    pub fn whole_file(path: Option<&Path>, message: impl Into<String>) -> Self {
        Self {
            location: Location::File {
                path: path.map(Path::to_path_buf),
            },
            message: bounded(message.into()),
        }
    }

    /// `file:line:column` (or the flag), for one-line displays and JSON.
    pub fn where_(&self) -> String {
        match &self.location {
            Location::Text { path, line, column, .. } => format!("{}:{line}:{column}", display_path(path.as_deref())),
            // The message usually quotes the value already: here a short form is enough to find the flag.
            Location::Flag { flag, value } if value.chars().count() > 60 => {
                let head: String = value.chars().take(60).collect();
                format!("{flag} {head:?}…")
            }
            Location::Flag { flag, value } => format!("{flag} {value:?}"),
            Location::File { path } => display_path(path.as_deref()),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.where_(), self.message)?;
        if let Location::Text {
            line,
            snippet,
            caret,
            width,
            ..
        } = &self.location
        {
            let gutter = line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{line} | {snippet}\n{:gutter$} | {}{}",
                "",
                "",
                " ".repeat(*caret),
                "^".repeat(*width),
            )?;
        }
        Ok(())
    }
}

fn display_path(path: Option<&Path>) -> String {
    path.map_or_else(|| "<policy>".to_string(), |p| p.display().to_string())
}

/// Characters of a source line shown before and after the offending value at most.
const CONTEXT_CHARS: usize = 60;
/// Longest caret, and longest value echoed in a message or a flag location.
const MAX_SHOWN_CHARS: usize = 200;

/// The part of `line` around the value at char `at` of `width` chars: (text, caret position, caret width).
fn window(line: &str, at: usize, width: usize) -> (String, usize, usize) {
    let line = line.trim_end_matches('\r');
    let width = width.min(MAX_SHOWN_CHARS);
    let from = at.saturating_sub(CONTEXT_CHARS);
    let total = line.chars().count();
    let to = (at + width + CONTEXT_CHARS).min(total);
    let mut text: String = line.chars().skip(from).take(to.saturating_sub(from)).collect();
    let mut caret = at - from;
    if from > 0 {
        text.insert(0, '…');
        caret += 1;
    }
    if to < total {
        text.push('…');
    }
    (text, caret, width)
}

/// Messages and flag values echo what the user wrote; a huge value is shown cut, once.
fn bounded(mut text: String) -> String {
    const MAX_BYTES: usize = 4 * MAX_SHOWN_CHARS;
    if text.len() > MAX_BYTES {
        let cut = floor_char_boundary(&text, MAX_BYTES);
        let dropped = text.len() - cut;
        text.truncate(cut);
        text.push_str(&format!("… ({dropped} more bytes)"));
    }
    text
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_maps_to_line_and_column_with_caret() {
        let src = "[network]\nallow = [\"*.com\"]\n";
        let start = src.find("\"*.com\"").unwrap();
        let err = PolicyError::at_span(src, Some(Path::new("b.toml")), start..start + 7, "too broad");
        assert_eq!(err.where_(), "b.toml:2:10");
        let shown = err.to_string();
        assert!(shown.contains("2 | allow = [\"*.com\"]"), "{shown}");
        assert!(shown.ends_with("|          ^^^^^^^"), "{shown:?}");
    }

    #[test]
    fn an_error_far_along_a_huge_line_shows_a_window_and_never_panics() {
        let value = "x".repeat(100_000);
        let src = format!("[network]\nallow = [\"a.test\", \"{value}\"]\n");
        let start = src.find(&value).unwrap() - 1;
        let err = PolicyError::at_span(&src, None, start..start + value.len() + 2, format!("bad `{value}`"));
        let shown = err.to_string();
        assert!(shown.len() < 2_000, "{} bytes", shown.len());
        assert!(shown.contains("more bytes") && shown.contains('^'), "{shown}");
        assert_eq!(err.where_(), "<policy>:2:20");
    }
}
