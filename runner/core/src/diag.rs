//! Diagnostics that point into the recipe: `FILE:LINE:COL: message`.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// Where a value came from: a byte range of the recipe file, or a `--set` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(Range<usize>),
    /// A `--set` argument; `near` is the recipe range the override belongs to (e.g. the op's
    /// `[ops.NAME]` header), so the error still has a line to point at.
    Set {
        arg: String,
        near: Option<Range<usize>>,
    },
}

impl Origin {
    pub fn start(&self) -> usize {
        match self {
            Origin::File(r) => r.start,
            Origin::Set { near: Some(r), .. } => r.start,
            Origin::Set { near: None, .. } => 0,
        }
    }
}

/// One problem with a recipe or the command line that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: String,
    /// 1-based line and column (in characters); `None` when nothing in the file is to blame.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// The recipe text, to turn byte offsets into lines and columns.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user wrote it (what error messages show).
    pub display: String,
    pub text: Arc<str>,
}

impl SourceFile {
    pub fn new(display: impl Into<String>, text: impl Into<Arc<str>>) -> Self {
        Self {
            display: display.into(),
            text: text.into(),
        }
    }

    /// 1-based (line, column) of a byte offset; columns count characters.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    pub fn at(&self, origin: &Origin, message: impl Into<String>) -> Diagnostic {
        let message = message.into();
        match origin {
            Origin::File(r) => Diagnostic {
                path: self.display.clone(),
                position: Some(self.line_col(r.start)),
                message,
            },
            Origin::Set { arg, near } => Diagnostic {
                path: self.display.clone(),
                position: near.as_ref().map(|r| self.line_col(r.start)),
                message: format!("{message} (from `--set {arg}`)"),
            },
        }
    }

    /// A diagnostic about the file as a whole, pointing at its first line.
    pub fn at_start(&self, message: impl Into<String>) -> Diagnostic {
        self.at(&Origin::File(0..0), message)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Formats a "did you mean" hint for `wrong` among `candidates`, or lists them all when none is close.
pub fn suggestion<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    match op_api::params::nearest(wrong, candidates.iter().copied()) {
        Some(n) => format!("; did you mean `{n}`?"),
        None => {
            let all: Vec<String> = candidates.into_iter().map(|c| format!("`{c}`")).collect();
            if all.is_empty() {
                String::new()
            } else {
                format!("; valid: {}", all.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let f = SourceFile::new("r.toml", "a = 1\nbé = 'x'\n");
        assert_eq!(f.line_col(0), (1, 1));
        assert_eq!(f.line_col(6), (2, 1));
        // `=` after "bé " : byte 6 + 'b'(1) + 'é'(2) + ' '(1) = 10, column 4 in characters.
        assert_eq!(f.line_col(10), (2, 4));
        assert_eq!(f.line_col(1000), (3, 1));
    }

    #[test]
    fn set_origin_mentions_argument() {
        let f = SourceFile::new("r.toml", "[ops.a]\nop = 'x'\n");
        let d = f.at(
            &Origin::Set {
                arg: "ops.a.k=1".into(),
                near: Some(1..6),
            },
            "bad",
        );
        assert_eq!(d.to_string(), "r.toml:1:2: bad (from `--set ops.a.k=1`)");
    }
}
