//! Held-out rows: a deterministic split of a dataset into a training part and a held-out part,
//! for datasets with one split (MMIU has only `test`, and the guide trains on it).
//!
//! A row is held out when `sha256(seed as 8 little-endian bytes ‖ the row's fields)`, its first
//! 8 bytes read as a big-endian integer over 2^64, is below `fraction`. The fields are hashed in
//! name order with a type tag and a length before every value (bytes included, so two rows that
//! differ only in an embedded image differ), so the split depends only on the row's content and
//! the seed: not on the row's position, the file order or the number of rows. Identical rows fall
//! on the same side (a duplicate cannot leak from training into the held-out part), `take =
//! "train"` and `take = "holdout"` with the same fraction and seed partition the dataset
//! exactly, and a larger fraction holds out a superset.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::dataset::Dataset;
use super::value::Value;

/// Which side of the split a load keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Take {
    Train,
    Holdout,
}

/// `holdout = { fraction, seed, take }` of a dataset `load`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Holdout {
    pub fraction: f64,
    pub seed: u64,
    pub take: Take,
}

impl Holdout {
    /// Parses the recipe's table strictly; errors say what a valid table looks like.
    pub fn from_toml(v: &toml::Value) -> Result<Self> {
        const SHAPE: &str =
            "expected `holdout = { fraction = 0.05, seed = 0, take = \"train\" | \"holdout\" }`";
        let Some(t) = v.as_table() else {
            bail!("{SHAPE}");
        };
        for key in t.keys() {
            if !["fraction", "seed", "take"].contains(&key.as_str()) {
                bail!("unknown key `{key}` in `holdout`; {SHAPE}");
            }
        }
        let fraction = match t.get("fraction") {
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            _ => bail!("`holdout.fraction` is missing or not a number; {SHAPE}"),
        };
        if !(fraction > 0.0 && fraction < 1.0) {
            bail!("`holdout.fraction` must be strictly between 0 and 1, got {fraction}");
        }
        let seed = match t.get("seed") {
            None => 0,
            Some(toml::Value::Integer(i)) if *i >= 0 => *i as u64,
            Some(other) => bail!("`holdout.seed` must be a non-negative integer, got {other}"),
        };
        let take = match t.get("take").and_then(|v| v.as_str()) {
            Some("train") => Take::Train,
            Some("holdout") => Take::Holdout,
            _ => bail!("`holdout.take` must be \"train\" or \"holdout\"; {SHAPE}"),
        };
        Ok(Self {
            fraction,
            seed,
            take,
        })
    }

    /// Whether a row with these fields is on the held-out side.
    pub fn is_held_out(&self, fields: &std::collections::BTreeMap<String, Value>) -> bool {
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        for (name, value) in fields {
            hash_str(&mut h, name);
            hash_value(&mut h, value);
        }
        let digest = h.finalize();
        let top = u64::from_be_bytes(digest[..8].try_into().unwrap());
        (top as f64) < self.fraction * 2f64.powi(64)
    }

    /// Whether the load keeps a row with these fields.
    pub fn keeps(&self, fields: &std::collections::BTreeMap<String, Value>) -> bool {
        self.is_held_out(fields) == (self.take == Take::Holdout)
    }

    /// The global row numbers (in order) of the rows this load keeps.
    pub fn select(&self, dataset: &Dataset) -> Result<Vec<usize>> {
        let mut kept = Vec::new();
        for row in dataset.rows() {
            let row = row?;
            if self.keeps(&row.fields) {
                kept.push(row.index);
            }
        }
        Ok(kept)
    }
}

fn hash_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// An unambiguous encoding: a tag per type, lengths before variable-size values.
fn hash_value(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update([0u8]),
        Value::Bool(b) => h.update([1u8, u8::from(*b)]),
        Value::Int(i) => {
            h.update([2u8]);
            h.update(i.to_le_bytes());
        }
        Value::Float(f) => {
            h.update([3u8]);
            h.update(f.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            h.update([4u8]);
            hash_str(h, s);
        }
        Value::Bytes(b) => {
            h.update([5u8]);
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        Value::List(items) => {
            h.update([6u8]);
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Struct(fields) => {
            h.update([7u8]);
            h.update((fields.len() as u64).to_le_bytes());
            for (k, item) in fields {
                hash_str(h, k);
                hash_value(h, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn row(i: i64) -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("question".to_string(), Value::Str(format!("q{i}"))),
            ("n".to_string(), Value::Int(i)),
        ])
    }

    fn spec(fraction: f64, seed: u64, take: Take) -> Holdout {
        Holdout {
            fraction,
            seed,
            take,
        }
    }

    #[test]
    fn takes_partition_rows_and_fraction_is_respected() {
        let rows: Vec<_> = (0..4000).map(row).collect();
        let held: Vec<bool> = rows
            .iter()
            .map(|r| spec(0.05, 7, Take::Holdout).keeps(r))
            .collect();
        for (r, &h) in rows.iter().zip(&held) {
            assert_eq!(spec(0.05, 7, Take::Train).keeps(r), !h);
        }
        let n = held.iter().filter(|&&h| h).count();
        // Binomial(4000, 0.05): mean 200, sd 13.8; 5 sd either side.
        assert!((131..=269).contains(&n), "{n} of 4000 held out");
        // Another seed gives another split; a larger fraction a superset.
        let other: Vec<bool> = rows
            .iter()
            .map(|r| spec(0.05, 8, Take::Holdout).keeps(r))
            .collect();
        assert_ne!(held, other);
        for (r, &h) in rows.iter().zip(&held) {
            if h {
                assert!(spec(0.2, 7, Take::Holdout).keeps(r));
            }
        }
    }

    #[test]
    fn split_depends_on_content_only() {
        let s = spec(0.5, 0, Take::Holdout);
        let a = row(3);
        assert_eq!(s.keeps(&a), s.keeps(&a.clone()));
        // Bytes count in full (an image differing in one byte is another row).
        let img = |b: u8| BTreeMap::from([("img".to_string(), Value::Bytes(vec![0, 1, b]))]);
        let sides: Vec<bool> = (0..64).map(|b| s.keeps(&img(b))).collect();
        assert!(sides.iter().any(|&x| x) && sides.iter().any(|&x| !x));
        // Type tags: the string "1" and the integer 1 are different rows.
        let s_row = BTreeMap::from([("x".to_string(), Value::Str("1".into()))]);
        let i_row = BTreeMap::from([("x".to_string(), Value::Int(1))]);
        let mut h1 = Sha256::new();
        hash_value(&mut h1, &Value::Struct(s_row));
        let mut h2 = Sha256::new();
        hash_value(&mut h2, &Value::Struct(i_row));
        assert_ne!(h1.finalize(), h2.finalize());
    }

    #[test]
    fn recipe_table_is_parsed_strictly() {
        let parse = |s: &str| Holdout::from_toml(&toml::from_str::<toml::Table>(s).unwrap()["h"]);
        assert_eq!(
            parse("h = { fraction = 0.05, seed = 3, take = \"train\" }").unwrap(),
            spec(0.05, 3, Take::Train)
        );
        assert_eq!(
            parse("h = { fraction = 0.1, take = \"holdout\" }").unwrap(),
            spec(0.1, 0, Take::Holdout)
        );
        for bad in [
            "h = { fraction = 1.0, take = \"train\" }",
            "h = { fraction = 0.0, take = \"train\" }",
            "h = { fraction = 0.1 }",
            "h = { fraction = 0.1, take = \"test\" }",
            "h = { fraction = 0.1, take = \"train\", seeds = 1 }",
            "h = { fraction = 0.1, take = \"train\", seed = -1 }",
            "h = 0.05",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
