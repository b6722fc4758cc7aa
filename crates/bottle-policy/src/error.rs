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
        /// The offending source line, for a caret display.
        snippet: String,
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
        let start = span.start.min(source.len());
        let before = &source[..floor_char_boundary(source, start)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        let line_end = source[line_start..].find('\n').map_or(source.len(), |i| line_start + i);
        let snippet = source[line_start..line_end].trim_end_matches('\r').to_string();
        let end = span.end.clamp(start, line_end);
        let width = source[floor_char_boundary(source, start)..floor_char_boundary(source, end)]
            .chars()
            .count()
            .max(1);
        Self {
            location: Location::Text {
                path: path.map(Path::to_path_buf),
                line,
                column,
                snippet,
                width,
            },
            message: message.into(),
        }
    }

    pub fn at_flag(flag: &'static str, value: &str, message: impl Into<String>) -> Self {
        Self {
            location: Location::Flag {
                flag,
                value: value.to_string(),
            },
            message: message.into(),
        }
    }

    pub fn whole_file(path: Option<&Path>, message: impl Into<String>) -> Self {
        Self {
            location: Location::File {
                path: path.map(Path::to_path_buf),
            },
            message: message.into(),
        }
    }

    /// `file:line:column` (or the flag), for one-line displays and JSON.
    pub fn where_(&self) -> String {
        match &self.location {
            Location::Text { path, line, column, .. } => format!("{}:{line}:{column}", display_path(path.as_deref())),
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
            column,
            snippet,
            width,
            ..
        } = &self.location
        {
            let gutter = line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{line} | {snippet}\n{:gutter$} | {:>col$}",
                "",
                "",
                "^".repeat(*width),
                col = column - 1 + width,
            )?;
        }
        Ok(())
    }
}

fn display_path(path: Option<&Path>) -> String {
    path.map_or_else(|| "<policy>".to_string(), |p| p.display().to_string())
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
}
