//! Op parameters: declared once with [`op_params!`], which generates the typed struct, the strict
//! parser (unknown keys are errors, with the nearest valid name), and the listing that
//! `runner ops` prints — so the documentation can never drift from the code.

use std::fmt;

/// One value or a list of them, as TOML and JSON configs write either (`target_modules = "x"`
/// or `["x", "y"]`; `eos_token_id: 1` or `[1, 106]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value(s) as a list.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// One parameter of an op, as `runner ops` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: &'static str,
    /// The Rust type, as written in the declaration (e.g. `f64`, `Option<String>`).
    pub ty: &'static str,
    pub default: ParamDefault,
    pub doc: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParamDefault {
    /// The recipe must set it.
    Required,
    /// Optional with no value (`Option::None`).
    Unset,
    Value(toml::Value),
}

impl fmt::Display for ParamDefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamDefault::Required => f.write_str("(required)"),
            ParamDefault::Unset => f.write_str("(unset)"),
            ParamDefault::Value(v) => write!(f, "{v}"),
        }
    }
}

/// A parameter problem, tied to the key it concerns so the runner can point at its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The offending key; `None` when the problem is about the table as a whole (e.g. a
    /// missing required key, which has no line of its own).
    pub key: Option<String>,
    pub message: String,
}

impl ParamError {
    /// A problem with the param `key`.
    pub fn at(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: Some(key.to_string()),
            message: message.into(),
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParamError {}

/// The closest candidate to `wrong` (Jaro-Winkler), if any is reasonably close.
pub fn nearest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(wrong, c), c))
        .filter(|(score, _)| *score >= 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Implemented by every struct that [`op_params!`] declares.
pub trait OpParams: Sized {
    fn specs() -> Vec<ParamSpec>;
    /// Parses a recipe table strictly: unknown keys, wrong types and missing required keys are errors.
    fn from_table(table: &toml::Table) -> Result<Self, ParamError>;

    /// The table with every default filled in: what the cache key hashes, so that writing a
    /// default explicitly does not change the key.
    fn canonical(table: &toml::Table) -> Result<toml::Table, ParamError> {
        Self::from_table(table)?;
        let mut out = table.clone();
        for spec in Self::specs() {
            if let (ParamDefault::Value(v), false) = (&spec.default, out.contains_key(spec.name)) {
                out.insert(spec.name.to_string(), v.clone());
            }
        }
        Ok(out)
    }
}

/// Rejects keys that no spec names, suggesting the nearest valid one.
pub fn check_unknown_keys(table: &toml::Table, specs: &[ParamSpec]) -> Result<(), ParamError> {
    for key in table.keys() {
        if !specs.iter().any(|s| s.name == key) {
            let hint = match nearest(key, specs.iter().map(|s| s.name)) {
                Some(n) => format!("; did you mean `{n}`?"),
                None => {
                    let all: Vec<&str> = specs.iter().map(|s| s.name).collect();
                    format!("; valid parameters: {}", all.join(", "))
                }
            };
            return Err(ParamError {
                key: Some(key.clone()),
                message: format!("unknown parameter `{key}`{hint}"),
            });
        }
    }
    Ok(())
}

/// Converts one recipe value into the field's type, naming the key on failure.
pub fn convert<T: serde::de::DeserializeOwned>(
    key: &str,
    ty: &str,
    value: &toml::Value,
) -> Result<T, ParamError> {
    value.clone().try_into::<T>().map_err(|e| ParamError {
        key: Some(key.to_string()),
        message: format!(
            "parameter `{key}` must be {ty}, got {} `{value}` ({})",
            value.type_str(),
            e.to_string().trim()
        ),
    })
}

/// Turns a declared default into its listing form; `None` defaults become [`ParamDefault::Unset`].
pub fn default_of<T: serde::Serialize>(value: &T) -> ParamDefault {
    match toml::Value::try_from(value) {
        Ok(v) => ParamDefault::Value(v),
        Err(_) => ParamDefault::Unset,
    }
}

/// Declares an op's parameter struct.
///
/// ```ignore
/// op_params! {
///     pub struct TrainParams {
///         /// Peak learning rate (TRL `learning_rate`).
///         learning_rate: f64 = 2e-5,
///         /// Required: no default.
///         model: String,
///         revision: Option<String> = None,
///     }
/// }
/// ```
#[macro_export]
macro_rules! op_params {
    (
        $(#[$smeta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty $(= $default:expr)?
            ),* $(,)?
        }
    ) => {
        $(#[$smeta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl $crate::params::OpParams for $name {
            fn specs() -> Vec<$crate::params::ParamSpec> {
                vec![$(
                    $crate::params::ParamSpec {
                        name: stringify!($field),
                        ty: stringify!($ty),
                        default: $crate::op_params!(@default $ty $(, $default)?),
                        doc: concat!($($doc),*).trim_start(),
                    },
                )*]
            }

            fn from_table(table: &toml::Table) -> Result<Self, $crate::params::ParamError> {
                $crate::params::check_unknown_keys(table, &Self::specs())?;
                Ok(Self {
                    $(
                        $field: match table.get(stringify!($field)) {
                            Some(v) => $crate::params::convert::<$ty>(stringify!($field), stringify!($ty), v)?,
                            None => $crate::op_params!(@missing $field, $ty $(, $default)?),
                        },
                    )*
                })
            }
        }
    };
    (@default $ty:ty, $default:expr) => {{
        let value: $ty = $default;
        $crate::params::default_of(&value)
    }};
    (@default $ty:ty) => { $crate::params::ParamDefault::Required };
    (@missing $field:ident, $ty:ty, $default:expr) => {{
        let value: $ty = $default;
        value
    }};
    (@missing $field:ident, $ty:ty) => {
        return Err($crate::params::ParamError {
            key: None,
            message: format!("missing required parameter `{}`", stringify!($field)),
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    op_params! {
        struct Demo {
            /// Learning rate.
            learning_rate: f64 = 2e-5,
            /// Required.
            model: String,
            revision: Option<String> = None,
            target_modules: Vec<String> = vec!["q_proj".into()],
        }
    }

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    #[test]
    fn fills_defaults_and_parses() {
        let p = Demo::from_table(&table(r#"model = "m""#)).unwrap();
        assert_eq!(p.learning_rate, 2e-5);
        assert_eq!(p.revision, None);
        assert_eq!(p.target_modules, vec!["q_proj".to_string()]);
        let c = Demo::canonical(&table(r#"model = "m""#)).unwrap();
        assert_eq!(c.get("learning_rate"), Some(&toml::Value::Float(2e-5)));
        assert!(!c.contains_key("revision"));
    }

    #[test]
    fn unknown_key_suggests_nearest() {
        let e = Demo::from_table(&table("model = \"m\"\nlearning_rat = 1.0")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("learning_rat"));
        assert!(
            e.message.contains("did you mean `learning_rate`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let e = Demo::from_table(&table("model = \"m\"\nlearning_rate = \"fast\"")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("learning_rate"));
        assert!(e.message.contains("must be f64"), "{}", e.message);
    }

    #[test]
    fn missing_required() {
        let e = Demo::from_table(&table("")).unwrap_err();
        assert!(e.message.contains("missing required parameter `model`"));
    }

    #[test]
    fn specs_list_defaults() {
        let specs = Demo::specs();
        assert_eq!(specs[0].doc, "Learning rate.");
        assert_eq!(specs[1].default, ParamDefault::Required);
        assert_eq!(specs[2].default, ParamDefault::Unset);
    }
}
