//! Scoring generated answers: MMIU's multiple-choice rule and a normalized exact match.
//!
//! MMIU (OpenGVLab/MMIU) scores in two scripts. `evaluate.py` maps a model's answer to a choice:
//! it strips whitespace, returns Z for an empty answer (or one of its harness's error strings),
//! deletes no-break spaces, removes a leading and a trailing run of `.,()` (regex
//! `^[.,()]+|[.,()]+$`, spaces are not part of the run), and when what is left is one letter
//! a–n (any case) that letter is the choice. Anything else goes to gpt-4o-mini, asked to map the
//! answer to an option letter or Z. `evaluate_correct.py` then counts a row correct when the
//! lowercased choice is a substring of the lowercased ground truth (MMIU's `output`, a single
//! letter), per task, and the overall score is the unweighted mean of the per-task accuracies.
//!
//! The GPT step is replaced here by a rule-based parser (no network, deterministic): a leading
//! option label `X:` names option X; otherwise the option whose text the answer contains (the
//! longest such text, so "the first image" beats "image"; a tie between different options is
//! no answer); otherwise Z. Options are read from the prompt's lines `X: text` (MMIU's
//! `context` lists them so). Everything else follows MMIU's code, quirks included.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What MMIU's harness wrote instead of an answer; `evaluate.py` scores them as Z.
const HARNESS_ERRORS: [&str; 4] = [
    "image none",
    "model error or image error",
    "image error",
    "model error",
];

/// The "no option" choice of MMIU's GPT prompt.
pub const NO_CHOICE: &str = "Z";

/// MMIU's `remove_punctuation`: `re.sub(r'^[.,()]+|[.,()]+$', '', text)`.
pub fn remove_punctuation(text: &str) -> &str {
    let is_p = |c: char| matches!(c, '.' | ',' | '(' | ')');
    text.trim_start_matches(is_p).trim_end_matches(is_p)
}

/// The options `X: text` (X in A–N, at the start of a line) of a prompt, first occurrence of
/// each letter, in letter order.
pub fn parse_options(prompt: &str) -> Vec<(char, String)> {
    let mut found: BTreeMap<char, String> = BTreeMap::new();
    for line in prompt.lines() {
        let mut chars = line.chars();
        let (Some(letter), Some(':')) = (chars.next(), chars.next()) else {
            continue;
        };
        if ('A'..='N').contains(&letter) {
            found
                .entry(letter)
                .or_insert_with(|| chars.as_str().trim().to_string());
        }
    }
    found.into_iter().collect()
}

/// The choice MMIU's pipeline assigns to `prediction`: a letter (as the model wrote it when it
/// wrote a single letter, else uppercase) or [`NO_CHOICE`].
pub fn mmiu_choice(prediction: &str, options: &[(char, String)]) -> String {
    let prediction = prediction.trim();
    if prediction.is_empty() || HARNESS_ERRORS.contains(&prediction) {
        return NO_CHOICE.to_string();
    }
    let prediction = prediction.replace('\u{a0}', "");
    let prediction = remove_punctuation(prediction.trim()).trim();
    let lower = prediction.to_lowercase();
    if lower.len() == 1 && ('a'..='n').contains(&lower.chars().next().unwrap()) {
        return prediction.to_string();
    }
    rule_choice(prediction, options)
}

/// Stands in for MMIU's GPT matcher: a leading `X:` label of an existing option, else the
/// option whose text the answer contains (longest text; ties between options are no answer).
fn rule_choice(prediction: &str, options: &[(char, String)]) -> String {
    let mut chars = prediction.chars();
    if let (Some(letter), Some(':')) = (chars.next(), chars.next()) {
        if options.iter().any(|(l, _)| *l == letter) {
            return letter.to_string();
        }
    }
    let answer = prediction.to_lowercase();
    let mut best: Option<(usize, char)> = None;
    let mut tied = false;
    for (letter, text) in options {
        let text = text.trim().to_lowercase();
        if text.is_empty() || !answer.contains(&text) {
            continue;
        }
        match best {
            Some((len, _)) if text.len() < len => {}
            Some((len, l)) if text.len() == len && l != *letter => tied = true,
            _ => {
                best = Some((text.len(), *letter));
                tied = false;
            }
        }
    }
    match best {
        Some((_, letter)) if !tied => letter.to_string(),
        _ => NO_CHOICE.to_string(),
    }
}

/// `evaluate_correct.py`: the lowercased choice is a substring of the lowercased ground truth.
pub fn mmiu_correct(choice: &str, reference: &str) -> bool {
    reference
        .trim()
        .to_lowercase()
        .contains(&choice.trim().to_lowercase())
}

/// Lowercase, whitespace runs collapsed to one space, leading and trailing punctuation and
/// spaces removed: what `metric = "exact"` compares.
pub fn normalize_exact(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let joined = words.join(" ").to_lowercase();
    joined
        .trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .to_string()
}

/// How answers are compared with references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// MMIU's multiple-choice rule (see the module docs).
    Choice,
    /// Normalized exact match ([`normalize_exact`]).
    Exact,
}

impl Metric {
    pub fn parse(name: &str) -> Option<Metric> {
        match name {
            "choice" => Some(Metric::Choice),
            "exact" => Some(Metric::Exact),
            _ => None,
        }
    }
}

/// One generated answer to score.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub row: usize,
    /// MMIU's task (the image folder) or another grouping; see [`task_of`].
    pub task: String,
    pub prompt: String,
    pub reference: Option<String>,
    pub text: String,
}

/// The task of a row: MMIU's task is the folder its images sit in
/// (`./Low-level-semantic/forensic_detection_blink/x_0.jpg` → `forensic_detection_blink`);
/// a row without images belongs to the task `all`.
pub fn task_of(images: &[String]) -> String {
    images
        .first()
        .and_then(|p| {
            let parts: Vec<&str> = p.split(['/', '\\']).filter(|s| !s.is_empty()).collect();
            (parts.len() >= 2).then(|| parts[parts.len() - 2].to_string())
        })
        .unwrap_or_else(|| "all".to_string())
}

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub row: usize,
    pub task: String,
    /// The choice (metric "choice") or the normalized answer (metric "exact").
    pub answer: String,
    pub correct: bool,
}

/// Accuracy of one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskScore {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Answers mapped to no option (metric "choice"): MMIU's Z.
    pub unanswered: usize,
}

/// Everything `scores.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub metric: Metric,
    /// The unweighted mean of the per-task accuracies (MMIU's "Overall").
    pub overall: f64,
    /// Correct answers over all scored rows.
    pub micro_accuracy: f64,
    pub scored: usize,
    /// Rows without a reference answer: not scored (MMIU skips a null `output` too).
    pub without_reference: usize,
    pub tasks: BTreeMap<String, TaskScore>,
    pub rows: Vec<Verdict>,
}

/// Scores answers; `None` when no answer has a reference.
pub fn score(answers: &[Answer], metric: Metric) -> Option<Scores> {
    let mut tasks: BTreeMap<String, TaskScore> = BTreeMap::new();
    let mut rows = Vec::new();
    let mut without_reference = 0;
    for a in answers {
        let Some(reference) = &a.reference else {
            without_reference += 1;
            continue;
        };
        let (answer, correct, unanswered) = match metric {
            Metric::Choice => {
                let choice = mmiu_choice(&a.text, &parse_options(&a.prompt));
                let correct = mmiu_correct(&choice, reference);
                let unanswered = choice == NO_CHOICE;
                (choice, correct, unanswered)
            }
            Metric::Exact => {
                let got = normalize_exact(&a.text);
                let correct = got == normalize_exact(reference);
                (got, correct, false)
            }
        };
        let t = tasks.entry(a.task.clone()).or_default();
        t.total += 1;
        t.correct += usize::from(correct);
        t.unanswered += usize::from(unanswered);
        rows.push(Verdict {
            row: a.row,
            task: a.task.clone(),
            answer,
            correct,
        });
    }
    if rows.is_empty() {
        return None;
    }
    for t in tasks.values_mut() {
        t.accuracy = t.correct as f64 / t.total as f64;
    }
    let overall = tasks.values().map(|t| t.accuracy).sum::<f64>() / tasks.len() as f64;
    let correct: usize = tasks.values().map(|t| t.correct).sum();
    Some(Scores {
        metric,
        overall,
        micro_accuracy: correct as f64 / rows.len() as f64,
        scored: rows.len(),
        without_reference,
        tasks,
        rows,
    })
}

/// The table the op prints: one line per task, then the overall score.
pub fn table(scores: &Scores) -> Vec<String> {
    let width = scores
        .tasks
        .keys()
        .map(|k| k.chars().count())
        .max()
        .unwrap_or(4)
        .max("overall (mean of tasks)".len());
    let mut lines = vec![format!(
        "{:<width$}  {:>8}  {:>7}  {:>10}",
        "task", "accuracy", "correct", "unanswered"
    )];
    for (name, t) in &scores.tasks {
        lines.push(format!(
            "{name:<width$}  {:>7.1}%  {:>3}/{:<3}  {:>10}",
            100.0 * t.accuracy,
            t.correct,
            t.total,
            t.unanswered
        ));
    }
    lines.push(format!(
        "{:<width$}  {:>7.1}%  ({} rows, micro {:.1}%)",
        "overall (mean of tasks)",
        100.0 * scores.overall,
        scores.scored,
        100.0 * scores.micro_accuracy
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MMIU's options for forensic_detection_blink, as its `context` lists them.
    fn blink_options() -> Vec<(char, String)> {
        parse_options(
            "Select from the following choices.\nA: the first image\nB: the second image\n\
             C: the third image\nD: the fourth image\n",
        )
    }

    /// Answer strings through MMIU's `process_data` (evaluate.py): the single-letter path keeps
    /// the letter as written; the strings MMIU's harness writes on failure are Z.
    #[test]
    fn choice_follows_mmiu_evaluate_py() {
        let opts = blink_options();
        let table: &[(&str, &str)] = &[
            // Single letters after strip() and remove_punctuation (`^[.,()]+|[.,()]+$`).
            ("A", "A"),
            ("d", "d"),
            ("  B  ", "B"),
            ("(C)", "C"),
            ("C.", "C"),
            ("(D).", "D"),
            ("..,(A),,", "A"),
            ("\u{a0}B\u{a0}", "B"),
            ("( A )", "A"),
            ("n", "n"),
            // Harness strings and empty answers: Z without the matcher.
            ("", "Z"),
            ("   ", "Z"),
            ("image none", "Z"),
            ("model error or image error", "Z"),
            ("image error", "Z"),
            ("model error", "Z"),
            // Letters outside a–n, and a letter whose trailing ")" sits before a space
            // (remove_punctuation runs once, spaces are not part of a run): the matcher.
            ("O", "Z"),
            ("Z", "Z"),
            // The rule-based stand-in for GPT: `X:` label, then option text in the answer.
            ("A: the first image", "A"),
            ("D: the fourth image.", "D"),
            ("E: something", "Z"),
            ("The answer is the third image", "C"),
            ("I think it's the second image, clearly", "B"),
            ("a cute teddy bear", "Z"),
        ];
        for (prediction, want) in table {
            assert_eq!(
                mmiu_choice(prediction, &opts),
                *want,
                "prediction {prediction:?}"
            );
        }
        // MMIU's remove_punctuation strips only a trailing run: "A) " keeps ")" before the space,
        // so the single-letter path fails and the matcher sees "A)" (no `X:` label): Z.
        assert_eq!(remove_punctuation("(A) ."), "A) ");
        assert_eq!(mmiu_choice(" (A) .", &opts), "Z");
    }

    /// `evaluate_correct.py`: `choice.strip().lower() in gt.strip().lower()`.
    #[test]
    fn correct_is_mmius_substring_test() {
        assert!(mmiu_correct("A", "A"));
        assert!(mmiu_correct("a", " A "));
        assert!(mmiu_correct(" d ", "D"));
        assert!(!mmiu_correct("B", "A"));
        assert!(!mmiu_correct("Z", "A"));
        // A quirk kept on purpose: substring, not equality (a multi-letter ground truth).
        assert!(mmiu_correct("a", "A: the first image"));
    }

    #[test]
    fn longest_option_text_wins_and_ties_are_no_answer() {
        let opts = vec![
            ('A', "image".to_string()),
            ('B', "first image".to_string()),
            ('C', "cat".to_string()),
            ('D', "dog".to_string()),
        ];
        assert_eq!(mmiu_choice("the first image", &opts), "B");
        assert_eq!(mmiu_choice("a cat and a dog", &opts), "Z");
        assert_eq!(mmiu_choice("a dog", &opts), "D");
    }

    #[test]
    fn options_are_read_from_prompt_lines() {
        let opts = parse_options(
            "<start_of_turn>user\nPick.\nA: red\nB:blue\nA: again\nO: out of range\nx: lower\n",
        );
        assert_eq!(
            opts,
            vec![('A', "red".to_string()), ('B', "blue".to_string())]
        );
    }

    #[test]
    fn task_is_the_image_folder() {
        assert_eq!(
            task_of(&["./Low-level-semantic/forensic_detection_blink/f_0_0.jpg".into()]),
            "forensic_detection_blink"
        );
        assert_eq!(task_of(&["x.jpg".into()]), "all");
        assert_eq!(task_of(&[]), "all");
    }

    fn answer(row: usize, task: &str, text: &str, reference: Option<&str>) -> Answer {
        Answer {
            row,
            task: task.into(),
            prompt: "A: yes\nB: no\n".into(),
            reference: reference.map(str::to_string),
            text: text.into(),
        }
    }

    /// MMIU's Overall is the mean of per-task accuracies, not of rows: a task of 1 row weighs as
    /// much as a task of 3.
    #[test]
    fn overall_is_the_unweighted_mean_over_tasks() {
        let answers = vec![
            answer(0, "t1", "A", Some("A")),
            answer(1, "t1", "B", Some("A")),
            answer(2, "t1", "maybe", Some("A")),
            answer(3, "t2", "A: yes", Some("A")),
            answer(4, "t2", "whatever", None),
        ];
        let s = score(&answers, Metric::Choice).unwrap();
        assert_eq!(s.tasks["t1"].correct, 1);
        assert_eq!(s.tasks["t1"].total, 3);
        assert_eq!(s.tasks["t1"].unanswered, 1);
        assert_eq!(s.tasks["t2"].correct, 1);
        assert!((s.overall - (1.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        assert!((s.micro_accuracy - 0.5).abs() < 1e-12);
        assert_eq!(s.without_reference, 1);
        assert_eq!(s.scored, 4);
        assert_eq!(table(&s).len(), 4);
        assert!(score(&[answer(0, "t", "A", None)], Metric::Choice).is_none());
    }

    #[test]
    fn exact_match_normalizes_case_space_and_edge_punctuation() {
        assert_eq!(normalize_exact("  The  Cat\tsat. "), "the cat sat");
        let answers = vec![
            answer(0, "t", "The cat.", Some("the  cat")),
            answer(1, "t", "the cats", Some("the cat")),
        ];
        let s = score(&answers, Metric::Exact).unwrap();
        assert_eq!(s.tasks["t"].correct, 1);
        assert_eq!(s.rows[0].answer, "the cat");
    }
}
