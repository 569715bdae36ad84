//! The WGSL preprocessor: `#include`, `#feature` and `#if`/`#elif`/`#else`/`#endif`.
//!
//! WGSL itself has no way to share code between modules or to select variants, so every kernel
//! module is composed from files under `shaders/` by these directives (a line whose first
//! non-blank character is `#`; WGSL never starts a line with one):
//!
//! - `#include "lib/staging"`: the text of `shaders/lib/staging.wgsl` (or of a module generated
//!   in Rust, `gen/...`), once per composition: a second include of the same module is skipped,
//!   so modules can include what they need without guards.
//! - `#feature NAME [text]`: declares a feature this module can be composed with (the text says
//!   what it does). A caller asking for an undeclared feature, or an `#if` testing one, is an
//!   error: a misspelt feature never silently selects the other branch.
//! - `#if EXPR` / `#elif EXPR` / `#else` / `#endif`, nested; EXPR combines declared features
//!   with `!`, `&&`, `||` and parentheses (`&&` binds tighter than `||`).
//!
//! The output is plain WGSL (inspectable, hashed by content for the module cache); errors name
//! the file and line.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};

use anyhow::{bail, Context, Result};

/// Resolves an include path (`lib/staging`, `gen/nf4_codes`) to its text.
pub(crate) type Lookup<'a> = &'a dyn Fn(&str) -> Option<Cow<'static, str>>;

/// Composes module `root` with `features` on: its text with every directive applied.
pub(crate) fn preprocess(root: &str, features: &[&str], lookup: Lookup) -> Result<String> {
    let mut state = State {
        features: features.iter().map(|f| f.to_string()).collect(),
        declared: BTreeSet::new(),
        included: HashSet::new(),
        out: String::new(),
        lookup,
    };
    let text = lookup(root).with_context(|| format!("no shader module `{root}`"))?;
    state.included.insert(root.to_string());
    state.emit(root, &text)?;
    if let Some(missing) = state.features.iter().find(|f| !state.declared.contains(*f)) {
        bail!(
            "shader `{root}` has no feature `{missing}` (it declares: {})",
            state
                .declared
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(state.out)
}

struct State<'a> {
    features: BTreeSet<String>,
    declared: BTreeSet<String>,
    included: HashSet<String>,
    out: String,
    lookup: Lookup<'a>,
}

/// One open `#if`: whether its enclosing text is active, whether a branch was taken, and
/// whether `#else` was seen.
struct Branch {
    outer_active: bool,
    taken: bool,
    in_else: bool,
    line: usize,
}

impl State<'_> {
    fn emit(&mut self, path: &str, text: &str) -> Result<()> {
        let mut open: Vec<Branch> = Vec::new();
        let mut active = true;
        for (index, line) in text.lines().enumerate() {
            let at = || format!("shaders/{path}.wgsl:{}", index + 1);
            let Some(directive) = line.trim_start().strip_prefix('#') else {
                if active {
                    self.out.push_str(line);
                    self.out.push('\n');
                }
                continue;
            };
            let (word, rest) = directive
                .split_once(char::is_whitespace)
                .map_or((directive, ""), |(w, r)| (w, r.trim()));
            match word {
                "include" if active => {
                    let name = rest
                        .strip_prefix('"')
                        .and_then(|r| r.strip_suffix('"'))
                        .with_context(|| format!("{}: expected #include \"path\"", at()))?;
                    if self.included.insert(name.to_string()) {
                        let included = (self.lookup)(name)
                            .with_context(|| format!("{}: no shader module `{name}`", at()))?;
                        self.out.push_str(&format!("// ---- {name}\n"));
                        self.emit(name, &included)?;
                        self.out.push_str(&format!("// ---- end {name}\n"));
                    }
                }
                "feature" if active => {
                    let name = rest.split_whitespace().next().unwrap_or("");
                    if !is_identifier(name) {
                        bail!("{}: expected #feature NAME", at());
                    }
                    self.declared.insert(name.to_string());
                }
                "include" | "feature" => {}
                "if" => {
                    let value = active && self.eval(rest).with_context(at)?;
                    open.push(Branch {
                        outer_active: active,
                        taken: value,
                        in_else: false,
                        line: index + 1,
                    });
                    active = value;
                }
                "elif" => {
                    let Some(b) = open.last_mut() else {
                        bail!("{}: #elif without #if", at());
                    };
                    if b.in_else {
                        bail!("{}: #elif after #else", at());
                    }
                    let value = b.outer_active && !b.taken && self.eval(rest).with_context(at)?;
                    b.taken |= value;
                    active = value;
                }
                "else" => {
                    let Some(b) = open.last_mut() else {
                        bail!("{}: #else without #if", at());
                    };
                    if b.in_else {
                        bail!("{}: a second #else", at());
                    }
                    b.in_else = true;
                    active = b.outer_active && !b.taken;
                    b.taken = true;
                }
                "endif" => {
                    let Some(b) = open.pop() else {
                        bail!("{}: #endif without #if", at());
                    };
                    active = b.outer_active;
                }
                _ => bail!("{}: unknown directive #{word}", at()),
            }
        }
        if let Some(b) = open.last() {
            bail!("shaders/{path}.wgsl:{}: #if without #endif", b.line);
        }
        Ok(())
    }

    fn eval(&self, expr: &str) -> Result<bool> {
        let tokens = tokenize(expr)?;
        let mut parser = Parser {
            tokens: &tokens,
            pos: 0,
            state: self,
        };
        let value = parser.or()?;
        if parser.pos != tokens.len() {
            bail!("unexpected `{}` in #if {expr}", tokens[parser.pos]);
        }
        Ok(value)
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn tokenize(expr: &str) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    let mut rest = expr.trim_start();
    while !rest.is_empty() {
        let len = if rest.starts_with("&&") || rest.starts_with("||") {
            2
        } else if rest.starts_with(['!', '(', ')']) {
            1
        } else {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if len == 0 {
                bail!("unexpected `{rest}` in #if {expr}");
            }
            len
        };
        tokens.push(rest[..len].to_string());
        rest = rest[len..].trim_start();
    }
    if tokens.is_empty() {
        bail!("#if needs an expression");
    }
    Ok(tokens)
}

/// Recursive descent over `or := and ('||' and)*`, `and := not ('&&' not)*`,
/// `not := '!' not | '(' or ')' | FEATURE`.
struct Parser<'t, 's> {
    tokens: &'t [String],
    pos: usize,
    state: &'s State<'s>,
}

impl Parser<'_, '_> {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.pos).map(String::as_str)
    }

    fn or(&mut self) -> Result<bool> {
        let mut value = self.and()?;
        while self.peek() == Some("||") {
            self.pos += 1;
            value |= self.and()?;
        }
        Ok(value)
    }

    fn and(&mut self) -> Result<bool> {
        let mut value = self.not()?;
        while self.peek() == Some("&&") {
            self.pos += 1;
            value &= self.not()?;
        }
        Ok(value)
    }

    fn not(&mut self) -> Result<bool> {
        let token = self
            .peek()
            .context("#if expression ends early")?
            .to_string();
        self.pos += 1;
        match token.as_str() {
            "!" => Ok(!self.not()?),
            "(" => {
                let value = self.or()?;
                if self.peek() != Some(")") {
                    bail!("missing `)` in #if expression");
                }
                self.pos += 1;
                Ok(value)
            }
            name if is_identifier(name) => {
                if !self.state.declared.contains(name) {
                    bail!("#if tests `{name}`, which no #feature declares before it");
                }
                Ok(self.state.features.contains(name))
            }
            other => bail!("unexpected `{other}` in #if expression"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(name: &str) -> Option<Cow<'static, str>> {
        let text = match name {
            "root" => "#feature A first\n#feature B\n#include \"lib\"\nbody\n#if A && !B\na-only\n#elif B || (A && B)\nb\n#else\nneither\n#endif\n#include \"lib\"\n",
            "lib" => "#include \"leaf\"\nlib\n",
            "leaf" => "  #if A\nleaf-a\n  #endif\n",
            "nested" => "#feature A\n#feature B\n#if A\n#if B\nab\n#else\na\n#endif\n#elif B\nb\n#endif\n",
            "undeclared" => "#if A\nx\n#endif\n#feature A\n",
            "unclosed" => "#feature A\n#if A\nx\n",
            "stray" => "#endif\n",
            "unknown" => "#define X 1\n",
            "double_else" => "#feature A\n#if A\n#else\n#else\n#endif\n",
            "bad_include" => "#include \"missing\"\n",
            "bad_expr" => "#feature A\n#if A &&\n#endif\n",
            _ => return None,
        };
        Some(Cow::Borrowed(text))
    }

    fn run(root: &str, features: &[&str]) -> Result<String> {
        preprocess(root, features, &files)
    }

    #[test]
    fn branches_and_includes_compose() {
        let body = |s: String| {
            s.lines()
                .filter(|l| !l.starts_with("// ----"))
                .collect::<Vec<_>>()
                .join(",")
        };
        // `lib` (and through it `leaf`) is included once although named twice
        assert_eq!(body(run("root", &[]).unwrap()), "lib,body,neither");
        assert_eq!(body(run("root", &["A"]).unwrap()), "leaf-a,lib,body,a-only");
        assert_eq!(body(run("root", &["B"]).unwrap()), "lib,body,b");
        assert_eq!(body(run("root", &["A", "B"]).unwrap()), "leaf-a,lib,body,b");
        assert_eq!(run("nested", &["A", "B"]).unwrap(), "ab\n");
        assert_eq!(run("nested", &["A"]).unwrap(), "a\n");
        assert_eq!(run("nested", &["B"]).unwrap(), "b\n");
        assert_eq!(run("nested", &[]).unwrap(), "");
    }

    #[test]
    fn mistakes_are_errors_with_their_line() {
        let err = |root: &str, features: &[&str]| format!("{:#}", run(root, features).unwrap_err());
        assert!(err("root", &["C"]).contains("has no feature `C` (it declares: A, B)"));
        assert!(err("undeclared", &[]).contains("undeclared.wgsl:1"));
        assert!(err("unclosed", &["A"]).contains("unclosed.wgsl:2: #if without #endif"));
        assert!(err("stray", &[]).contains("stray.wgsl:1: #endif without #if"));
        assert!(err("unknown", &[]).contains("unknown directive #define"));
        assert!(err("double_else", &[]).contains("double_else.wgsl:4: a second #else"));
        assert!(err("bad_include", &[]).contains("bad_include.wgsl:1: no shader module `missing`"));
        assert!(err("bad_expr", &["A"]).contains("bad_expr.wgsl:2"));
        assert!(err("nothing", &[]).contains("no shader module `nothing`"));
    }
}
