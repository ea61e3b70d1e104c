//! `larslab compare`: finished runs side by side.
//!
//! One row per run (or, with `--group-seeds`, per configuration with mean ±
//! std over its seeds); columns for the config keys that differ between the
//! rows, then the summary figures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::error::UserError;
use crate::run_dir::{self, RunDir};
use crate::train::Summary;

/// One finished (or stopped) run as read from its directory.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub dir: PathBuf,
    pub config: Config,
    pub summary: Summary,
    /// First step at which `accuracy/val` reached the target, if it did.
    pub steps_to_target: Option<u64>,
}

/// The figures compared, in column order: (column name, value of a run).
type Figure = (&'static str, fn(&RunRecord) -> Option<f64>);

const FIGURES: &[Figure] = &[
    ("final_val_acc", |r| r.summary.final_val_accuracy),
    ("best_val_acc", |r| r.summary.best_val_accuracy),
    ("final_train_loss", |r| r.summary.final_train_loss),
    ("final_val_loss", |r| r.summary.final_val_loss),
    ("test_acc", |r| r.summary.test_accuracy),
    ("diverged_at", |r| {
        r.summary.diverged_at_step.map(|s| s as f64)
    }),
    ("steps_to_target", |r| r.steps_to_target.map(|s| s as f64)),
    ("samples_per_s", |r| Some(r.summary.samples_per_second)),
];

/// Finds the runs under `paths`: each path is a run directory, or a
/// directory (a sweep, `runs/`) whose subdirectories are runs.
pub fn collect(paths: &[PathBuf], target: f64) -> Result<Vec<RunRecord>, UserError> {
    let mut dirs = Vec::new();
    for path in paths {
        if path.join(run_dir::SUMMARY).is_file() {
            dirs.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path)
            .map_err(|e| UserError::data(path, format!("cannot read: {e}")))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.join(run_dir::SUMMARY).is_file())
            .collect();
        if found.is_empty() {
            return Err(UserError::data(
                path,
                "is not a finished run and holds none (no summary.json)",
            ));
        }
        found.sort();
        dirs.extend(found);
    }
    dirs.iter().map(|dir| read_run(dir, target)).collect()
}

fn read_run(dir: &Path, target: f64) -> Result<RunRecord, UserError> {
    let run = RunDir::open(dir)?;
    let summary: Summary = run
        .summary()?
        .ok_or_else(|| UserError::data(dir, "has no summary.json"))?;
    let config = Config::load_run(&run.file(run_dir::CONFIG), &[])?;
    let metrics = std::fs::read_to_string(run.file(run_dir::METRICS)).unwrap_or_default();
    let steps_to_target = metrics.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v.get("accuracy/val")?.as_f64()? >= target).then(|| v["step"].as_u64())?
    });
    Ok(RunRecord {
        dir: dir.to_path_buf(),
        config,
        summary,
        steps_to_target,
    })
}

/// A comparison: column names and rows of cells (text, or mean ± std).
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Cell {
    Text(String),
    Number(Option<f64>),
    /// Mean and standard deviation over seeds (with how many had a value).
    Spread {
        mean: f64,
        std: f64,
        n: usize,
    },
}

impl Cell {
    fn sort_key(&self) -> f64 {
        match self {
            Cell::Number(Some(v)) => *v,
            Cell::Spread { mean, .. } => *mean,
            _ => f64::NAN,
        }
    }

    fn render(&self) -> String {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Number(None) => "-".into(),
            Cell::Number(Some(v)) => number(*v),
            Cell::Spread { mean, std, n } => {
                format!("{} ± {} (n={n})", number(*mean), number(*std))
            }
        }
    }
}

fn number(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// Config keys whose values differ between the runs (without `name`, and
/// without `seed` when seeds are grouped), in config order.
fn varying_keys(runs: &[RunRecord], group_seeds: bool) -> Vec<String> {
    let flat: Vec<BTreeMap<String, String>> = runs
        .iter()
        .map(|r| {
            r.config
                .flatten()
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect()
        })
        .collect();
    let order: Vec<String> = runs.first().map_or(Vec::new(), |r| {
        r.config.flatten().into_iter().map(|(k, _)| k).collect()
    });
    order
        .into_iter()
        .filter(|k| k != "name" && !(group_seeds && k == "seed"))
        .filter(|k| flat.iter().any(|f| f.get(k) != flat[0].get(k)))
        .collect()
}

/// Builds the comparison of `runs`.
pub fn table(
    runs: &[RunRecord],
    group_seeds: bool,
    sort: Option<&str>,
) -> Result<Table, UserError> {
    let keys = varying_keys(runs, group_seeds);
    let value_of = |r: &RunRecord, key: &str| {
        r.config
            .flatten()
            .into_iter()
            .find(|(k, _)| k == key)
            .map_or("-".into(), |(_, v)| match v {
                toml::Value::String(s) => s,
                other => other.to_string(),
            })
    };
    let mut columns: Vec<String> = vec![if group_seeds {
        "runs".into()
    } else {
        "run".into()
    }];
    columns.extend(keys.iter().cloned());
    columns.extend(FIGURES.iter().map(|(name, _)| name.to_string()));

    let mut groups: Vec<(Vec<String>, Vec<&RunRecord>)> = Vec::new();
    for run in runs {
        let id: Vec<String> = keys.iter().map(|k| value_of(run, k)).collect();
        match groups
            .iter_mut()
            .find(|(g, members)| g == &id && group_seeds && !members.is_empty())
        {
            Some((_, members)) => members.push(run),
            None => groups.push((id, vec![run])),
        }
    }
    let mut rows: Vec<Vec<Cell>> = groups
        .into_iter()
        .map(|(id, members)| {
            let label = if group_seeds {
                format!("{}", members.len())
            } else {
                members[0]
                    .dir
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned())
            };
            let mut row = vec![Cell::Text(label)];
            row.extend(id.into_iter().map(Cell::Text));
            for (_, figure) in FIGURES {
                let values: Vec<f64> = members.iter().filter_map(|r| figure(r)).collect();
                row.push(if !group_seeds || members.len() == 1 {
                    Cell::Number(values.first().copied())
                } else if values.is_empty() {
                    Cell::Number(None)
                } else {
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                        / values.len() as f64;
                    Cell::Spread {
                        mean,
                        std: var.sqrt(),
                        n: values.len(),
                    }
                });
            }
            row
        })
        .collect();
    if let Some(key) = sort {
        let index = columns.iter().position(|c| c == key).ok_or_else(|| {
            UserError::Usage(format!(
                "--sort `{key}`: no such column (columns: {})",
                columns.join(", ")
            ))
        })?;
        rows.sort_by(|a, b| match (&a[index], &b[index]) {
            (Cell::Text(x), Cell::Text(y)) => x.cmp(y),
            (x, y) => y.sort_key().total_cmp(&x.sort_key()),
        });
    }
    Ok(Table { columns, rows })
}

/// Aligned plain text.
pub fn render_text(t: &Table) -> String {
    let cells: Vec<Vec<String>> = t
        .rows
        .iter()
        .map(|r| r.iter().map(Cell::render).collect())
        .collect();
    let widths: Vec<usize> = (0..t.columns.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([t.columns[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: &[String]| {
        row.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&t.columns) + "\n";
    for row in &cells {
        out += &(line(row) + "\n");
    }
    out
}

/// A Markdown table.
pub fn render_markdown(t: &Table) -> String {
    let mut out = format!("| {} |\n", t.columns.join(" | "));
    out += &format!("|{}\n", " --- |".repeat(t.columns.len()));
    for row in &t.rows {
        let cells: Vec<String> = row.iter().map(|c| c.render().replace('|', "\\|")).collect();
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

/// CSV with a header; a mean ± std cell becomes two columns `<name>` and `<name>_std`.
pub fn render_csv(t: &Table) -> String {
    let spread_columns: Vec<bool> = (0..t.columns.len())
        .map(|i| t.rows.iter().any(|r| matches!(r[i], Cell::Spread { .. })))
        .collect();
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut header = Vec::new();
    for (i, c) in t.columns.iter().enumerate() {
        header.push(quote(c));
        if spread_columns[i] {
            header.push(quote(&format!("{c}_std")));
        }
    }
    let mut out = header.join(",") + "\n";
    for row in &t.rows {
        let mut cells = Vec::new();
        for (i, cell) in row.iter().enumerate() {
            let (value, std) = match cell {
                Cell::Text(s) => (quote(s), String::new()),
                Cell::Number(v) => (v.map_or(String::new(), |v| v.to_string()), String::new()),
                Cell::Spread { mean, std, .. } => (mean.to_string(), std.to_string()),
            };
            cells.push(value);
            if spread_columns[i] {
                cells.push(std);
            }
        }
        out += &(cells.join(",") + "\n");
    }
    out
}

/// JSON: one object per row, column name to value (mean ± std as `{mean, std, n}`).
pub fn render_json(t: &Table) -> String {
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = t
        .rows
        .iter()
        .map(|row| {
            t.columns
                .iter()
                .zip(row)
                .map(|(c, cell)| (c.clone(), serde_json::to_value(cell).unwrap_or_default()))
                .collect()
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n"
}
